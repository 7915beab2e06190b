"""The ``nextrap`` command's process: how it ends on Ctrl-C or SIGTERM, and how many threads torch may use.

Stdlib only: ``at_import`` runs from ``nextrap/__init__`` before torch is imported.

Interrupts. SIGINT (Ctrl-C) and SIGTERM end a command with one line on stderr, ``interrupted``, exit code 128 +
the signal (130, 143), no traceback, and nothing left beside ``--out``:

- while the command starts (imports: torch and transformers take seconds) nothing has been written, so a signal
  exits at once (``at_import``);
- once a command runs (``command``), a signal raises ``Interrupted``, a BaseException that no ``except Exception``
  swallows, so ``files.atomic_dir`` removes its temporary folder on the way out. Inside ``deferred_interrupts``
  (an output being renamed into place or cleaned up) a signal waits and is raised when the block ends. Native
  code that calls back into Python (safetensors' reader) can turn the exception into an error of its own: the
  signal is remembered, so that error still ends the command as interrupted (``check_interrupted``) and
  nothing is published after it.

A program that imports nextrap as a library keeps Python's own handling (KeyboardInterrupt; SIGTERM kills).

Threads. torch's default intra-op thread count is the machine's physical cores, whatever this process may use.
On an oversubscribed machine OpenMP's spinning threads then wait on each other: batched QR stalled up to 30 s per
call (features 22-78 s instead of 0.8 s with one thread). The command runs torch on ``threads()`` threads, set as
OMP_NUM_THREADS before torch loads. The count depends only on the machine, never on its load, so two runs on one
machine compute bit for bit the same. OpenMP's threads wait as libgomp does by default (spin briefly, then
sleep): made to sleep at once (OMP_WAIT_POLICY=PASSIVE, which a user's environment may still set), they woke for
each of the feature pass's thousands of parallel products, and the 8-layer 7B-shaped fit at 2 threads took
23.3-27.8 s against 17.1-17.7 s (17.4-19.3 s spinning only, ACTIVE; benchmarks/RESULTS.md 4.4).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

THREADS_ENV = "NEXTRAP_THREADS"  # overrides threads(); OMP_NUM_THREADS, if set, is kept otherwise
# "reuse": the LoRA passes keep freed memory for their next blocks, in one malloc arena (``budget.heap_hygiene``).
# The command sets it; a library user's process (a trainer running JumpCallback) keeps glibc's arenas unless it
# asks, since a process-wide arena limit outlives the pass.
HEAP_ENV = "NEXTRAP_HEAP"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached a running command (``command``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_deferring = 0
_pending: list[int] = []
_raised: int | None = None  # the signal an Interrupted was raised for, even if something swallowed it since


def _exit_now(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(128 + signum)


def _raise(signum: int, frame: object) -> None:
    global _raised
    if _deferring:
        _pending.append(signum)
        return
    _raised = signum
    raise Interrupted(signum)


def check_interrupted() -> None:
    """Raise ``Interrupted`` again if a signal already raised it (and something turned it into another error)."""
    if _raised is not None:
        raise Interrupted(_raised)


def _handle(handler) -> None:
    try:
        for s in SIGNALS:
            signal.signal(s, handler)
    except ValueError:  # not the main thread: signals stay as they are
        pass


def is_command() -> bool:
    """Whether this process is the ``nextrap`` command (its console script or ``python -m nextrap.cli``)."""
    argv = getattr(sys, "orig_argv", [])
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    return Path(getattr(sys, "argv", [""])[0] or "").name == "nextrap" or module == "nextrap.cli"


def at_import() -> None:
    """In the command's process only: signals exit at once, and torch's threads are set before torch loads."""
    if not is_command():
        return
    _handle(_exit_now)
    if os.environ.get(THREADS_ENV):
        os.environ["OMP_NUM_THREADS"] = os.environ[THREADS_ENV]
    os.environ.setdefault("OMP_NUM_THREADS", str(threads()))
    os.environ.setdefault(HEAP_ENV, "reuse")


def _affinity() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def cores() -> int:
    """This process's share of ``threads()``: under torchrun, the cores are shared by the node's ranks
    (``LOCAL_WORLD_SIZE``). In physical cores, like torch's threads: a thread on a busy core's hyperthread
    sibling slows that core's thread as one on the core itself would."""
    return max(1, threads() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def threads() -> int:
    """Physical cores this process may run on: its CPU affinity, counting hyperthread siblings once, capped by
    a cgroup CPU quota (containers)."""
    cores = set()
    for cpu in _affinity():
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, min(len(cores), _cpu_quota() or len(cores)))


def _cpu_quota() -> int | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), rounded up; None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


@contextmanager
def command() -> Iterator[None]:
    """Run a command: SIGINT and SIGTERM raise ``Interrupted``, which ends it with ``interrupted`` and 128 + signal."""
    _handle(_raise)
    try:
        yield
    except BaseException as e:
        signum = e.signum if isinstance(e, Interrupted) else _raised
        if signum is None:
            raise
        _handle(_exit_now)  # a second signal while the interpreter shuts down
        sys.stderr.write("interrupted\n")
        sys.exit(128 + signum)
    finally:
        _handle(_exit_now)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold a signal back until this block ends (then raise it): for steps that must not stop half-way."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise(signum, None)


class Background:
    """``fn(*args)`` on a daemon thread (an error or an interrupt never waits for it at exit); ``result()`` joins it
    and returns its value or raises its exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True, name="nextrap-background")
        self._thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
