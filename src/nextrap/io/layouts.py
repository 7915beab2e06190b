"""The facts ``inspect`` reports about checkpoint folders of either kind: which trainer laid them out, the dtypes
their weights are stored in, and their sizes on disk."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from nextrap.io.checkpoints import LATEST_ITERATION, open_weights

_TRAINERS = (  # trainer layouts recognisable from the folders between CKPTS and a checkpoint
    ("verl", re.compile(r"(^|/)global_step_\d+/actor(/|$)")),
    ("openrlhf", re.compile(r"(^|/)global_step\d+(_hf)?(/|$)")),
    ("trl", re.compile(r"(^|/)checkpoint-\d+(/|$)")),
)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                       "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


def trainer_layout(root: Path, checkpoints: Sequence[Any], default: str = "peft") -> str:
    """The trainer that wrote the folders: ``trl`` (checkpoint-N), ``verl`` (global_step_N/actor/...),
    ``openrlhf`` (global_stepN[_hf]), else ``default`` (``peft``; ``hf`` for model folders).

    Folder names decide; failing them, the trainers' own files: verl's ``latest_checkpointed_iteration.txt`` at
    the root, or a ``trainer_state.json`` (HF Trainer / TRL) in every checkpoint folder.
    """
    for name, pattern in _TRAINERS:
        if all(pattern.search(c.path.relative_to(root).as_posix()) for c in checkpoints):
            return name
    if (root / LATEST_ITERATION).is_file():
        return "verl"
    if checkpoints and all((c.path / "trainer_state.json").is_file() for c in checkpoints):
        return "trl"
    return default


def dtype_name(stored: str) -> str:
    """A safetensors header dtype (``BF16``) as torch names it (``bfloat16``)."""
    return _SAFETENSORS_DTYPES.get(stored, stored.lower())


def _dtype_name(f: Any, key: str) -> str:
    sl = f.get_slice(key)
    if hasattr(sl, "get_dtype"):
        return dtype_name(sl.get_dtype())
    return str(sl.dtype).removeprefix("torch.")


def weight_dtypes(files: Sequence[Path]) -> list[str]:
    """The dtypes of every tensor in the weights ``files`` (headers only for safetensors)."""
    found: set[str] = set()
    for path in files:
        with open_weights(path) as f:
            found.update(_dtype_name(f, k) for k in f.keys())
    return sorted(found)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
