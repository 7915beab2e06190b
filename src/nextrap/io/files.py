"""File-level guarantees: outputs appear atomically, inputs are fingerprinted."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from nextrap.core.errors import WRITE_ERRNOS, NextrapError, os_error, os_problem
from nextrap.runtime.process import check_interrupted, deferred_interrupts

if TYPE_CHECKING:  # a type only: the CLI imports this module for --help, which must not load torch
    from nextrap.runtime.distributed import World


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


RUN_KIND = "grpo"  # the marker of a training run's folder (``nextrap grpo``): its checkpoints are a trajectory


def is_marked_output(folder: Path) -> bool:
    """Whether ``folder`` is one of nextrap's outputs (a fit, a jumped checkpoint, a pipeline workspace), never a
    trajectory's checkpoints: it has a marker of any kind but a training run's (``RUN_KIND``)."""
    marker = folder / OUTPUT_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("kind") != RUN_KIND
    except (OSError, ValueError, AttributeError):  # unreadable: as before, whatever wrote it was nextrap
        return True


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


def check_writable(target: Path | str) -> None:
    """Refuse, before any work, an output that cannot be created: a file where a folder must go (``--out
    afile/fit``), or a folder this process may not write in."""
    target = Path(target).absolute()
    parent = target.parent
    while not os.path.exists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NextrapError(f"--out {target}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NextrapError(f"--out {target}: permission denied (cannot write in {parent})")


def check_replaceable(target: Path, overwrite: bool) -> None:
    """Refuse a ``target`` that cannot be written (``check_writable``) or that exists, unless ``overwrite``, and
    even then unless it is empty or provably an output of nextrap (its marker lists everything in it):
    --overwrite never deletes what nextrap did not write."""
    check_writable(target)
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


# Test hook (tests/test_faults.py): seconds atomic_dir waits with the output complete in its temporary folder, so
# that a test can interrupt a run while it writes. Unset outside tests.
PAUSE_ENV = "NEXTRAP_TEST_PAUSE_BEFORE_RENAME"


@contextmanager
def atomic_dir(target: Path | str, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it is made publishable (``publish``) and
    renamed to ``target``.

    On any exception, an interrupt included, the temporary folder is removed and ``target`` is left as it was,
    so a failed or interrupted run never leaves a half-written output, nor anything beside it (the parent folders
    it created for ``target`` included); a full disk is one line naming what was being written. An existing
    ``target`` is refused unless ``overwrite`` and provably nextrap's (see ``check_replaceable``), at the start and
    again at publishing, so a folder that appeared there meanwhile is refused, never deleted.
    """
    target = Path(target).absolute()
    check_replaceable(target, overwrite)
    created = _missing_folders(target.parent)
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"  # named before it exists: always cleaned
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        time.sleep(float(os.environ.get(PAUSE_ENV) or 0))
        check_interrupted()  # a signal that native code swallowed while writing: publish nothing
        with deferred_interrupts():
            # a long run: someone (another run, a user) may have made ``target`` since the check at the start
            check_replaceable(target, overwrite)
            publish(tmp, kind)
            if target.exists():
                old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    except BaseException as e:
        with deferred_interrupts():
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(created)
        code = write_errno(e)
        if code in WRITE_ERRNOS:
            where = getattr(e, "filename", None)
            where = str(where).replace(str(tmp), str(target)) if where else target
            raise NextrapError(f"{os_problem(code)} writing {where}") from None
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first: what ``mkdir(parents=True)`` creates."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a folder something else has written in since, and
    so its ancestors, is kept."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # never made: the run failed before its mkdir
        except OSError:
            return


@contextmanager
def shared_atomic_dir(target: Path | str, ranks: World, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """``atomic_dir`` for cooperating ranks (torchrun): rank 0 makes the temporary folder and tells the others its
    name, every rank writes its part into it, and once every rank has finished, rank 0 publishes it and renames it
    to ``target``; the others return after that. An error on any rank (rank 0's refusal of ``target`` included)
    is raised on every rank and nothing is published. Several nodes need ``target`` on a filesystem they all see."""
    if ranks.size == 1:
        with atomic_dir(target, overwrite, kind) as tmp:
            yield tmp
        return
    if not ranks.is_main:
        tmp, refused = ranks.broadcast(None)
        if refused:
            raise NextrapError(refused)
        error = None
        try:
            yield Path(tmp)
        except BaseException as e:  # noqa: BLE001 - told to every rank, then raised
            error = e
        failed = [why for why in ranks.gather(_why(ranks, error)) if why]
        published = ranks.gather(None)[0]  # rank 0's outcome: None once the folder is published
        if error is not None:
            raise error
        if failed or published:
            raise NextrapError((failed or [published])[0])
        return
    entered, published = False, f"rank 0 failed before publishing {target}"
    try:
        with atomic_dir(target, overwrite, kind) as tmp:
            entered = True
            ranks.broadcast((str(tmp), None))
            error = None
            try:
                yield tmp
            except BaseException as e:  # noqa: BLE001 - told to every rank, then raised
                error = e
            failed = [why for why in ranks.gather(_why(ranks, error)) if why]
            if error is not None:
                raise error
            if failed:
                raise NextrapError(failed[0])
        published = None
    except BaseException as e:
        if not entered:  # target refused: the others have not started
            ranks.broadcast((None, _why(ranks, e)))
        raise
    finally:
        if entered:
            ranks.gather(published)


def _why(ranks: World, e: BaseException | None) -> str | None:
    """What the other ranks report of this rank's error (None: none)."""
    if e is None:
        return None
    return str(e) if isinstance(e, NextrapError) else f"rank {ranks.rank} failed: {type(e).__name__}: {e}"


def write_errno(e: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors' writer puts in its message."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return int(m.group(1)) if m else None


def publish(folder: Path, kind: str) -> None:
    """What every output gets before it appears: safetensors headers in one canonical form, the permissions a
    fresh file gets under the umask (safetensors writes 0600 files, as ``mkstemp`` does), and nextrap's marker."""
    for path in sorted(folder.rglob("*.safetensors")):
        if path.is_file() and not path.is_symlink():
            canonical_header(path)
    write_marker(folder, kind)
    apply_umask(folder)


def canonical_header(path: Path) -> None:
    """Sort a safetensors header's ``__metadata__`` keys in place (the header keeps its length): safetensors
    serializes them from a hash map, in an order that changes from run to run, so equal files differed in bytes."""
    with open(path, "r+b") as f:
        size = f.read(8)
        n = struct.unpack("<Q", size)[0] if len(size) == 8 else 0
        if not 0 < n <= os.fstat(f.fileno()).st_size - 8:
            return  # not a safetensors file: nothing to put in order
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or list(meta) == sorted(meta):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) <= n:  # always, as serde_json escapes like json.dumps: the same keys, in another order
            f.seek(8)
            f.write(raw + b" " * (n - len(raw)))


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything below it (links aside) the mode a fresh folder or file gets under the
    process's umask, as ``save_pretrained`` leaves them: readable by the group when the umask says so."""
    mask = umask()
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256, read into one reused buffer (1.44 GB/s here, against 1.01 GB/s for reads that each make
    a new bytes object; what Python 3.11's hashlib.file_digest does)."""
    h, buf = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_all(paths: Sequence[Path], workers: int = 1) -> list[str]:
    """``sha256`` of each file, ``workers`` files at a time (hashlib and file reads release the GIL); one worker
    hashes in the calling thread (a pool's threads are joined at exit, so an error would wait for them)."""
    if workers <= 1:
        return [sha256(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256, paths))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise os_error(e) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NextrapError(f"{path}: not valid JSON ({e})") from None
