"""The memory budget every streamed pass keeps (``--max-memory``), for LoRA and full-parameter trajectories alike.

Memory is *accounted*, not sampled: every tensor a pass holds is registered with a ``Meter`` (its peak is what
the manifest reports), work is cut into batches of same-shape units sized to what the budget leaves free
(``sized_batches``), and a unit that alone needs more than that is named before the pass reads anything.

For the process's real peak to follow the account, glibc must hand large blocks back to the OS when they are
freed (``heap_hygiene``): its default mmap threshold rises to the largest block freed (up to 32 MB), after which
per-batch stacks come from the heap, which fragments and never shrinks (measured: 444 MB of real growth under a
70 MB budget). ``Prefetcher`` reads the next batch's tensors on a background thread while the current one is
computed (on CUDA into pinned memory, copied with ``non_blocking`` on a side stream), or on a CPU with few
threads in between.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Sequence, TypeVar

import torch

from nextrap.core.errors import NextrapError
from nextrap.runtime.process import cores

DEFAULT_MAX_MEMORY = "8GB"


def device_budget(budget: int, device: str, max_gpu_memory: int | None, free_gpu: Callable[[], int]) -> int:
    """The streamed passes' budget on ``device``: on a GPU every unit's factors are held there too (moved as
    they are read), so the units must also fit ``max_gpu_memory`` (``--max-gpu-memory``), by default 90% of
    the device memory ``free_gpu()`` reports free; on the CPU the host budget alone."""
    if not device.startswith("cuda"):
        return budget
    return min(budget, max_gpu_memory if max_gpu_memory is not None else int(0.9 * free_gpu()))


def parse_size(text: str, option: str = "") -> int:
    """'5GB', '200MB', '500KB' or a byte count -> bytes (decimal units, as transformers uses); ``option`` (e.g.
    ``--max-memory``) names what gave it in the error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise NextrapError(f"{option + ' ' if option else ''}{text!r}: cannot read the size (use e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


class Meter:
    """Thread-safe accounting of the bytes a pass holds; ``peak`` is the high-water mark."""

    def __init__(self, budget: int | None):
        self.budget, self.held, self.peak = budget, 0, 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.held += nbytes
            self.peak = max(self.peak, self.held)

    def sub(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes

    def scratch(self, nbytes: int) -> "_Scratch":
        return _Scratch(self, nbytes)


class _Scratch:
    def __init__(self, meter: Meter, nbytes: int):
        self.meter, self.nbytes = meter, nbytes

    def __enter__(self) -> None:
        self.meter.add(self.nbytes)

    def __exit__(self, *exc: object) -> None:
        self.meter.sub(self.nbytes)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameter numbers
MAP_EVERY_BLOCK = 1 << 16  # blocks above 64 KB are mmapped, and unmapped on free
REUSE_BLOCKS = 32 << 20  # glibc's largest threshold: blocks up to 32 MB come from the heap


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # a value past a C int raises instead of wrapping
    return libc


def heap_hygiene(mmap_above: int = MAP_EVERY_BLOCK) -> None:
    """Fix glibc's mmap threshold (a fixed one also stops its upward adaptation); a no-op off glibc.

    ``MAP_EVERY_BLOCK``: every block above 64 KB is mmapped, so freed blocks leave the process at once, in
    every thread's arena (the full-parameter passes: row chunks of many shapes, which a heap would fragment;
    with glibc's adaptive threshold the same fit once grew past 400 MB at a 70 MB budget).
    ``REUSE_BLOCKS`` (``lorastream``, where ``NEXTRAP_HEAP=reuse``, as the command sets it): blocks up to 32 MB
    come from the heap, which keeps up to two such blocks of free pages at its top (the trim threshold, twice the
    mmap threshold in both modes) and its other free pages until the unit ends (``trim_heap`` returns them all),
    so the next checkpoint's stack and the next product's temporaries take pages the last ones left inside the
    heap instead of mapping fresh ones, each of which faults on first touch (the LoRA passes, whose stacks are at
    most 32 MB, ``lorastream.units``). With a trim threshold of 0 (or 32 MB), frees at the heap's top gave their
    pages back and the next stack faulted them in again: reading the 28-layer 7B-shaped trajectory's factors unit
    by unit took 7.0 s and 2.67M page faults as float32 (14.4 s as float64); it takes 3.2 s and 0.36M (4.5 s) now.
    Threads created from then on share one arena, so that the reader thread's freed stacks serve the main
    thread's temporaries and the other way round (with an arena each, the real-peak test's growth reached 60 MB
    at a 40 MB budget). Measured on the 8-layer 7B-shaped LoRA feature pass: 1.93M page faults and 3.95 s of
    system time with every block mapped, 0.59M and 1.9 s with a trim threshold of 0. The price: the real peak is
    less predictable (the real-peak test's growth 32-46 MB at a 40 MB budget in 10 runs, against 35-43 MB with
    every block mapped; 32-55 MB when the heap never trimmed its top)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_above)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_above)
        if mmap_above > MAP_EVERY_BLOCK:
            libc.mallopt(_M_ARENA_MAX, 1)


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim), after a batch; a no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def item_bytes(item: Any) -> int:
    """Bytes of a tensor or of a tuple of tensors."""
    return sum(nbytes(t) for t in item) if isinstance(item, tuple) else nbytes(item)


_CHUNK_MAX = 1 << 20  # elements of one float64 row chunk (8 MB)
_CHUNK_TEMPS = 5  # float64 chunk temporaries: two converted rows, the true move, the move, a product added into it


def chunk_rows(shape: tuple[int, int], budget: int | None) -> int:
    """Matrix rows per float64 chunk: about budget / 400 elements (so the chunk's temporaries, 40 bytes per
    element, take a tenth of the budget), at most 8 MB, at least one row."""
    m, n = shape
    elems = _CHUNK_MAX if budget is None else min(_CHUNK_MAX, budget // (10 * 8 * _CHUNK_TEMPS))
    return max(1, min(m, elems // n))


def chunk_bytes(shape: tuple[int, int], budget: int | None) -> int:
    return _CHUNK_TEMPS * 8 * chunk_rows(shape, budget) * shape[1]


def row_chunks(shape: tuple[int, int], budget: int | None) -> Iterator[slice]:
    step = chunk_rows(shape, budget)
    return (slice(r, min(r + step, shape[0])) for r in range(0, shape[0], step))


def mb(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / 1e6:.3g} MB"


@dataclass
class StreamStats:
    """What one streaming pass measured."""

    budget: int | None
    peak: int = 0
    batches: int = 0
    reads: int = 0
    svd: str = "exact"
    sigma_error_max: float = 0.0  # fast mode: the largest reported relative sigma error bound (0 for exact)
    seconds_waiting: float = 0.0  # compute time spent waiting for the reader


Unit = TypeVar("Unit")


def sized_batches(groups: Sequence[Sequence[Unit]], per_unit: Callable[[Unit], int], fixed: Callable[[Unit], int],
                  meter: Meter, too_big: Callable[[Unit, int, int | None], str], max_batch: int | None = None) -> Iterator[list[Unit]]:
    """Each group's units (all of one shape) in batches whose ``per_unit`` bytes each, plus the group's ``fixed``
    bytes once, fit what the budget leaves free beside what ``meter`` holds (at most ``max_batch`` units).

    A unit that alone does not fit raises NextrapError with ``too_big(unit, needed, free)`` as its message."""
    for group in groups:
        if not group:
            continue
        per, base = per_unit(group[0]), fixed(group[0])
        free = None if meter.budget is None else meter.budget - meter.held - base
        size = len(group) if free is None else max(free, 0) // max(per, 1)
        if size < 1:
            raise NextrapError(too_big(group[0], per + base, None if free is None else free + base))
        size = min(size, max_batch or size)
        for start in range(0, len(group), size):
            yield list(group[start:start + size])


def preflight(groups: Sequence[Sequence[Unit]], per_unit: Callable[[Unit], int], fixed: Callable[[Unit], int],
              meter: Meter, too_big: Callable[[Unit, int, int | None], str]) -> None:
    """Raise now, before anything is read, when some unit of ``groups`` cannot stream beside ``meter``'s bytes."""
    for _ in sized_batches(groups, per_unit, fixed, meter, too_big):
        pass


Job = TypeVar("Job")
Load = Callable[[Any, Meter, bool], Any]  # (job, meter, pin) -> a tensor or a tuple of tensors, added to the meter


# At most this many torch threads, taking every core of a CPU, a pass reads in between its computations
INLINE_THREADS = 2


def spare_cores(device: torch.device, threads: int, cores: int) -> int:
    """CPU cores a side thread may take without stalling ``threads`` torch threads: on a GPU all of ``cores``
    (``process.cores``) but one, on the CPU those torch leaves. A thread beside as many compute threads as cores
    stalls every parallel operation it preempts (benchmarks/RESULTS.md 4.4)."""
    return max(0, cores - (1 if device.type != "cpu" else threads))


def reads_in_background(device: torch.device, threads: int, cores: int) -> bool:
    """Whether a pass should read on a thread of its own beside ``threads`` torch threads (``Prefetcher``): on a
    GPU always; on the CPU when a core is spare (``spare_cores``), or when there are enough threads that lending
    one to the reader costs less than the reads (more than ``INLINE_THREADS``)."""
    return device.type != "cpu" or spare_cores(device, threads, cores) > 0 or threads > INLINE_THREADS


_LENDING = threading.Lock()
_lent = [0, 0]  # readers holding a lent thread, torch's thread count before the first of them


def _lend_thread() -> None:
    """Take one of torch's threads for the readers: however many run at once (extend's prediction thread beside
    its writer), one in all, given back when the last closes, so that closing out of order cannot leave torch
    with fewer threads than it had."""
    with _LENDING:
        if _lent[0] == 0:
            _lent[1] = torch.get_num_threads()
            torch.set_num_threads(max(1, _lent[1] - 1))
        _lent[0] += 1


def _torch_threads() -> int:
    """torch's thread count, before any reader's lending."""
    with _LENDING:
        return _lent[1] if _lent[0] else torch.get_num_threads()


def _return_thread() -> None:
    with _LENDING:
        _lent[0] -= 1
        if _lent[0] == 0:
            torch.set_num_threads(_lent[1])


class Prefetcher:
    """Loads ``jobs`` in order, one ahead of the consumer on a background thread (or in the consumer's thread,
    ``background``); iterating yields (``key(job)``, item).

    ``load(job, meter, pin)`` returns a tensor or a tuple of tensors (in pinned memory when ``pin``) and adds
    their bytes to ``meter``; the consumer subtracts them when it lets an item go.

    ``background`` (default ``reads_in_background``): where torch's threads take every core, a reader thread
    costs the consumer one of them while it runs, since a reader beside as many compute threads as cores stalls
    them (every parallel operation waits for the thread the reader preempted). On 2 cores, reading in the
    consumer's thread with both threads for torch beats both (benchmarks/RESULTS.md 4.4: the 8-layer feature
    pass in 7.7-7.9 s inline, 11.2-11.5 s beside a reader with one torch thread, 12.8-13.8 s beside a reader
    with two): reading is a tenth of the feature pass, and the reader thread idles the rest. A GPU always reads
    on the thread (its copies to the device are made there)."""

    def __init__(self, jobs: Sequence[Any], load: Load, device: torch.device, meter: Meter,
                 key: Callable[[Any], Any] = lambda job: job, background: bool | None = None):
        self.jobs, self.load, self.device, self.meter, self.key = list(jobs), load, device, meter, key
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self.waited = 0.0  # seconds the consumer spent waiting for a read: I/O the compute did not hide
        threads, n = _torch_threads(), cores()
        if background is None or device.type != "cpu":
            background = reads_in_background(device, threads, n)
        self.background = background
        self._lent = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            if device.type == "cpu" and threads > 1 and not spare_cores(device, threads, n):
                _lend_thread()
                self._lent = True
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            for job in self.jobs:
                item = self.load(job, self.meter, cuda)
                event = None
                if cuda:  # untested here (no GPU): copy on a side stream, the consumer waits on the event
                    with torch.cuda.stream(stream):
                        dev = _apply(item, lambda t: t.to(self.device, non_blocking=True))
                        event = torch.cuda.Event()
                        event.record(stream)
                    event.synchronize()  # the pinned host buffer may be freed only after the copy
                    self.meter.sub(item_bytes(item))
                    self.meter.add(item_bytes(dev))
                    item = dev
                if not self._put((True, job, item, event)):
                    self.meter.sub(item_bytes(item))
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put((False, None, e, None))

    def _put(self, entry: tuple) -> bool:
        """Queue ``entry`` unless the consumer has gone (then False)."""
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if not self.background:
            for job in self.jobs:
                t0 = time.perf_counter()
                item = self.load(job, self.meter, False)
                self.waited += time.perf_counter() - t0
                yield self.key(job), item
            return
        for _ in self.jobs:
            t0 = time.perf_counter()
            ok, job, item, event = self._q.get()
            self.waited += time.perf_counter() - t0
            if not ok:
                raise item
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                _apply(item, lambda t: t.record_stream(current))
            yield self.key(job), item

    def close(self) -> None:
        self._stop.set()
        self._release()
        if self._thread is not None:
            self._thread.join()
            self._release()  # an item the reader put just before it saw the stop
        if self._lent:
            self._lent = False
            _return_thread()

    def _release(self) -> None:
        """Release the items the consumer never took."""
        while True:
            try:
                ok, _, item, _ = self._q.get_nowait()
                if ok:
                    self.meter.sub(item_bytes(item))
            except queue.Empty:
                break

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _apply(item: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    return tuple(fn(t) for t in item) if isinstance(item, tuple) else fn(item)


def group_by(units: Sequence[Unit], key: Callable[[Unit], Hashable]) -> list[list[Unit]]:
    """``units`` grouped by ``key`` (first-seen order of keys, order kept within a group)."""
    groups: dict[Hashable, list[Unit]] = {}
    for u in units:
        groups.setdefault(key(u), []).append(u)
    return list(groups.values())
