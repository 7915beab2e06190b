"""Hugging Face model folders read lazily: which file holds each tensor (single or sharded safetensors), and every
tensor's shape and dtype from the headers alone."""

from __future__ import annotations

from pathlib import Path

from nextrap.core.errors import NextrapError
from nextrap.io.checkpoints import open_weights
from nextrap.io.files import read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def weight_map(base: Path) -> dict[str, Path]:
    """Every tensor name of the base model -> the safetensors file that holds it.

    ``model.safetensors`` wins over an index beside it (a stale one, say), as in transformers' ``from_pretrained``:
    the weights read are the ones the model loads."""
    base = Path(base)
    if (base / SINGLE).is_file():
        with open_weights(base / SINGLE) as f:
            return {k: base / SINGLE for k in f.keys()}
    if (base / INDEX).is_file():
        index = read_json(base / INDEX)
        try:
            return {k: base / f for k, f in index["weight_map"].items()}
        except (KeyError, AttributeError):
            raise NextrapError(f"{base / INDEX}: no weight_map") from None
    raise NextrapError(f"{base}: no {SINGLE} or {INDEX} (a Hugging Face model folder with safetensors weights is needed)")


def read_header(files: set[Path]) -> dict[str, tuple[list[int], str]]:
    """Every tensor's (shape, safetensors dtype) in ``files``, from the headers alone."""
    info = {}
    for path in sorted(files):
        if not path.is_file():
            raise NextrapError(f"{path}: listed in the index but missing")
        with open_weights(path) as f:
            for k in f.keys():
                sl = f.get_slice(k)
                info[k] = (list(sl.get_shape()), sl.get_dtype())
    return info
