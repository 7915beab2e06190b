"""io/tensorfile: safetensors tensors read straight into a caller's tensor, and damaged files named."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from nextrap.core.errors import NextrapError
from nextrap.io.tensorfile import TensorFile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_each_tensor_is_read_into_the_callers_tensor_as_saved(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    saved = {"a": torch.randn(7, 3, generator=g).to(dtype), "b": torch.randn(2, 5, generator=g).to(dtype),
             "empty": torch.zeros(0, 4, dtype=dtype), "ids": torch.arange(6)}
    save_file(saved, str(tmp_path / "w.safetensors"))
    with TensorFile(tmp_path / "w.safetensors") as tf:
        assert tf.stored("a") == dtype and tf.stored("ids") is None  # only float tensors are read this way
        stack = torch.full((2, 7, 3), float("nan"), dtype=dtype)
        tf.read_into("a", stack[1])
        out = torch.empty(2, 5, dtype=dtype)
        tf.read_into("b", out)
        tf.read_into("empty", torch.empty(0, 4, dtype=dtype))
    assert torch.equal(stack[1], saved["a"]) and stack[0].isnan().all() and torch.equal(out, saved["b"])


def test_a_tensor_of_another_shape_or_dtype_or_layout_is_refused_naming_the_file(tmp_path):
    save_file({"a": torch.ones(4, 3)}, str(tmp_path / "w.safetensors"))
    with TensorFile(tmp_path / "w.safetensors") as tf:
        for out in (torch.empty(3, 4), torch.empty(4, 3, dtype=torch.float64), torch.empty(3, 4).mT):
            with pytest.raises(NextrapError, match=r"w\.safetensors: tensor a is \[4, 3\] torch.float32, cannot be read"):
                tf.read_into("a", out)
        with pytest.raises(NextrapError, match=r"w\.safetensors: has no float tensor b"):
            tf.read_into("b", torch.empty(4, 3))


def test_a_file_truncated_after_it_was_opened_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64, 64)}, str(path))
    with TensorFile(path) as tf:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
        with pytest.raises(NextrapError, match=r"w\.safetensors: ends inside tensor a \(the file was truncated\)"):
            tf.read_into("a", torch.empty(64, 64))


def _raw(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_a_damaged_header_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    cases = [
        (b"", r"not a safetensors file \(shorter than its 8-byte header length\)"),
        (struct.pack("<Q", 10**9), r"not a safetensors file \(its header would end past the file's end\)"),
    ]
    for raw, message in cases:
        path.write_bytes(raw)
        with pytest.raises(NextrapError, match=r"w\.safetensors: " + message):
            TensorFile(path)
    _raw(path, b"{not json")
    with pytest.raises(NextrapError, match=r"w\.safetensors: not a safetensors file \(its header is not JSON\)"):
        TensorFile(path)
    _raw(path, json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), bytes(8))
    with pytest.raises(NextrapError, match=r"w\.safetensors: tensor a's data offsets \[0, 16\] do not fit"):
        TensorFile(path)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(NextrapError, match="no-such.safetensors"):
        TensorFile(tmp_path / "no-such.safetensors")


def test_a_file_rewritten_at_the_same_size_and_modification_time_is_read_anew(tmp_path):
    """The header is cached per version of the file: a copy keeping the modification time (cp -p, rsync -a)
    still changes the change time, so the tensors' new places are read, not the old ones."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(8), "b": torch.full((8,), 2.0)}, str(path))
    with TensorFile(path) as tf:
        out = torch.empty(8)
        tf.read_into("a", out)
    stamp = path.stat().st_mtime_ns
    raw = path.read_bytes()
    swapped = raw.replace(b'"a"', b'"c"').replace(b'"b"', b'"a"').replace(b'"c"', b'"b"')
    assert len(swapped) == len(raw) and swapped != raw
    path.write_bytes(swapped)
    os.utime(path, ns=(stamp, stamp))
    with TensorFile(path) as tf:
        tf.read_into("a", out)
    assert torch.equal(out, torch.full((8,), 2.0))


@pytest.mark.parametrize("header", [[1, 2], {"a": {"dtype": "F32", "data_offsets": [0, 16]}},
                                    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}},
                                    {"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}},
                                    {"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}},
                                    {"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}])
def test_a_header_without_valid_shapes_and_offsets_is_one_line(tmp_path, header):
    path = tmp_path / "w.safetensors"
    _raw(path, json.dumps(header).encode(), bytes(16))
    with pytest.raises(NextrapError, match=r"w\.safetensors: (not a safetensors file|tensor a has no valid shape)"):
        TensorFile(path)
