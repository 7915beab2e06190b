"""Reading a safetensors file's tensors straight into a caller's tensor.

safetensors' ``safe_open`` maps the file and hands out tensors over the mapping, so copying one into a stack
page-faults on the pages of the mapping it touches, beside the copy. Reading the bytes with the file's own read
into the destination (the stack's row, where the stored dtype is the stack's) costs one copy: reading the
28-layer 7B-shaped LoRA trajectory's factors unit by unit as float32 took 3.0-3.3 s through ``safe_open`` and
2.3-2.5 s this way (benchmarks/RESULTS.md 4.4). The format is safetensors': 8 bytes of little-endian header
length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}``, then the data. Everything else (headers for
shapes, conversions, non-LoRA tensors, ``.bin`` files) stays with safetensors and torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from nextrap.core.errors import NextrapError, os_error

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' header names of the float dtypes torch reads
ST_DTYPES = {  # torch dtype -> its safetensors header name
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
TORCH_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items() if name in FLOAT_DTYPES}  # read by ``read_into``


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


MAX_HEADER = 100 << 20  # safetensors' own limit on a header's length


def _parse(path: Path, f: BinaryIO, size: int) -> dict[str, _Entry]:
    """The float tensors of the open file ``f`` of ``size`` bytes, checked against its size."""
    raw = f.read(8)
    if len(raw) < 8:
        raise NextrapError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
        raise NextrapError(f"{path}: not a safetensors file (its header would end past the file's end)")
    if n > MAX_HEADER:
        raise NextrapError(f"{path}: not a safetensors file (its header of {n} bytes is past safetensors' 100 MB limit)")
    try:
        meta = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError):
        raise NextrapError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(meta, dict):
        raise NextrapError(f"{path}: not a safetensors file (its header is not a JSON object)")
    entries = {}
    for key, info in meta.items():
        if key == "__metadata__" or not isinstance(info, dict) or info.get("dtype") not in TORCH_DTYPES:
            continue
        dims, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(dims, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(x) is int for x in [*dims, *offsets])):
            raise NextrapError(f"{path}: tensor {key} has no valid shape and data_offsets in its header")
        shape, (begin, end), dtype = tuple(dims), offsets, TORCH_DTYPES[info["dtype"]]
        expected = dtype.itemsize * int(torch.Size(shape).numel())
        if end - begin != expected or begin < 0 or 8 + n + end > size:
            raise NextrapError(f"{path}: tensor {key}'s data offsets [{begin}, {end}] do not fit its shape "
                               f"{list(shape)} and the file's {size} bytes")
        entries[key] = _Entry(dtype, shape, 8 + n + begin, expected)
    return entries


# A file's header parsed once per version of the file: its identity, size, and modification and change times
# (the change time cannot be set back, as a copy keeping the modification time would set it).
_HEADERS: dict[tuple[int, ...], dict[str, _Entry]] = {}
_KEEP = 64  # headers kept (a 7B-shaped r 64 adapter's is ~150 KB): a few trajectories' checkpoints


class TensorFile:
    """One safetensors file open for ``read_into``; use as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file: BinaryIO = open(path, "rb", buffering=0)
        except OSError as e:
            raise os_error(e) from None
        try:
            st = os.fstat(self._file.fileno())
            version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if version not in _HEADERS:
                if len(_HEADERS) >= _KEEP:
                    _HEADERS.pop(next(iter(_HEADERS)))
                _HEADERS[version] = _parse(path, self._file, st.st_size)
            self.entries = _HEADERS[version]
        except BaseException:
            self._file.close()
            raise

    def stored(self, key: str) -> torch.dtype | None:
        """The dtype tensor ``key`` is stored in (None: no such float tensor)."""
        entry = self.entries.get(key)
        return None if entry is None else entry.dtype

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Tensor ``key``'s bytes into ``out``: a contiguous CPU tensor of its shape and stored dtype (a conversion
        needs a copy anyway, and one from ``safe_open``'s mapping costs less than one from a fresh buffer, whose
        pages fault as they are first written: reading the same factors as float64 took 6.0 s that way against 4.5 s)."""
        entry = self.entries.get(key)
        if entry is None:
            raise NextrapError(f"{self.path}: has no float tensor {key}")
        if entry.shape != tuple(out.shape) or entry.dtype != out.dtype or not out.is_contiguous():
            raise NextrapError(f"{self.path}: tensor {key} is {list(entry.shape)} {entry.dtype}, cannot be read into "
                               f"{'a non-contiguous ' if not out.is_contiguous() else ''}{list(out.shape)} {out.dtype}")
        if not entry.nbytes:
            return
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        self._file.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            got = self._file.readinto(view[done:])
            if not got:
                raise NextrapError(f"{self.path}: ends inside tensor {key} (the file was truncated)")
            done += got

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
