"""File-level guarantees: outputs appear atomically, inputs are fingerprinted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import NextrapError


def check_replaceable(target: Path, overwrite: bool, markers: tuple[str, ...]) -> None:
    """Refuse an existing ``target`` unless ``overwrite``, and even then unless it is empty or holds one of
    ``markers`` (glob patterns of what nextrap writes): --overwrite never deletes a folder nextrap did not make."""
    if not target.exists():
        return
    if not overwrite:
        raise NextrapError(f"{target}: already exists (pass --overwrite to replace it)")
    if not target.is_dir():
        raise NextrapError(f"{target}: exists and is not a folder; refusing to replace it")
    if any(target.iterdir()) and not any(any(target.glob(m)) for m in markers):
        raise NextrapError(f"{target}: not an output of nextrap (no {' or '.join(markers)}); refusing to replace it")


@contextmanager
def atomic_dir(target: Path | str, overwrite: bool = False, markers: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it is renamed to ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was, so a failed or
    interrupted run never leaves a half-written output. An existing ``target`` is refused unless ``overwrite``
    (see ``check_replaceable``).
    """
    target = Path(target).absolute()
    check_replaceable(target, overwrite, markers)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NextrapError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise NextrapError(f"{path}: not valid JSON ({e})") from None
