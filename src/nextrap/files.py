"""File-level guarantees: outputs appear atomically, inputs are fingerprinted."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import NextrapError


OUTPUT_MARKER = ".nextrap-output.json"  # in every folder nextrap writes: what it wrote there, so --overwrite can prove it
OUTPUT_FORMAT = "nextrap-output/1"
# Fit folders written before the marker existed: replaceable when they hold nothing but these files.
_LEGACY_FIT = ("manifest.json", "trajectory.safetensors", "predictor.safetensors", "predictor.json", "next.json")


def _entries(folder: Path) -> list[str]:
    """Every file, link and folder below ``folder`` as a relative POSIX path (links are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / n).as_posix() for n in dirnames + filenames]
    return sorted(out)


def write_marker(folder: Path, kind: str, trees: tuple[str, ...] = ()) -> None:
    """Record in ``folder`` every path nextrap wrote there (and, for a workspace that grows over time, the
    top-level names it owns whole, as glob patterns ``trees``), so that ``--overwrite`` can later prove the
    folder is ours."""
    files = [e for e in _entries(folder) if e != OUTPUT_MARKER]
    write_json(folder / OUTPUT_MARKER, {"format": OUTPUT_FORMAT, "kind": kind, "trees": sorted(trees), "files": files})


def _not_ours(target: Path) -> str | None:
    """Why ``target`` (an existing, non-empty folder) is not provably a nextrap output, or None if it is."""
    entries = _entries(target)
    marker = target / OUTPUT_MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            assert record["format"] == OUTPUT_FORMAT
            owned, trees = set(record["files"]) | {OUTPUT_MARKER}, tuple(record["trees"])
        except Exception:  # noqa: BLE001 - any unreadable marker means the same: not provably ours
            return f"{marker} is not a valid nextrap output marker"
    elif (target / "manifest.json").is_file() and set(entries) <= set(_LEGACY_FIT):
        try:
            if json.loads((target / "manifest.json").read_text()).get("format") == "nextrap-fit/1":
                return None
        except Exception:  # noqa: BLE001
            pass
        return f"{target / 'manifest.json'} is not a nextrap fit manifest"
    else:
        return f"it has no {OUTPUT_MARKER}"
    folders = {a.as_posix() for f in owned for a in Path(f).parents}
    for e in entries:
        if e in owned or e in folders or any(fnmatch.fnmatchcase(e.split("/")[0], t) for t in trees):
            continue
        return f"{target / e} was not written by nextrap"
    return None


def check_replaceable(target: Path, overwrite: bool) -> None:
    """Refuse an existing ``target`` unless ``overwrite``, and even then unless it is empty or provably an
    output of nextrap (its marker lists everything in it): --overwrite never deletes what nextrap did not write."""
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise NextrapError(f"{target}: already exists (pass --overwrite to replace it)")
    if target.is_symlink() or not target.is_dir():
        raise NextrapError(f"{target}: exists and is not a folder; refusing to replace it")
    if any(target.iterdir()):
        why = _not_ours(target)
        if why:
            raise NextrapError(f"{target}: not an output of nextrap ({why}); refusing to replace it")


def check_apart(out: Path, inputs: dict[str, Path | str | None]) -> None:
    """Refuse an output folder inside one of the ``inputs`` (name -> path) or holding one: nextrap never writes
    into what it reads, and never replaces a folder its inputs live in."""
    o = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if o == p or p in o.parents:
            raise NextrapError(f"--out {out}: is inside {what} {path}; write outputs outside what nextrap reads")
        if o in p.parents:
            raise NextrapError(f"--out {out}: holds {what} {path}; write outputs outside what nextrap reads")


@contextmanager
def atomic_dir(target: Path | str, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it is marked as nextrap's (``write_marker``)
    and renamed to ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was, so a failed or
    interrupted run never leaves a half-written output. An existing ``target`` is refused unless ``overwrite``
    and provably nextrap's (see ``check_replaceable``).
    """
    target = Path(target).absolute()
    check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        yield tmp
        write_marker(tmp, kind)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp is not None:
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
