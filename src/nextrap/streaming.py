"""The budgeted streaming engine for full-parameter trajectories.

Parameters of one shape are processed in batches sized so that everything held at once (the batch's
tensors, the prefetched next read, SVD workspace, the features being built) stays under ``--max-memory``.
Tensors are read one at a time with ``safe_open``; a reader thread reads the next tensor stack while the current
one is computed (on CUDA into pinned memory, copied with ``non_blocking`` on a side stream).

Memory is *accounted*, not sampled: every tensor the engine holds is registered with a ``Meter`` (its peak is
what the manifest reports), and each SVD adds a conservative estimate of LAPACK's workspace. For the process's
real peak to follow the account, glibc must hand large blocks back to the OS when they are freed (``heap_hygiene``):
its default mmap threshold rises to the largest block freed (up to 32 MB), after which the per-batch stacks come
from the heap, which fragments and never shrinks (measured: 444 MB of real growth under a 70 MB budget).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .checkpoints import require_checkpoints
from .errors import NextrapError
from .fullparam import FullTrajectory, Param
from .lowrank import Rank1, align_signs, top1_dense
from .randsvd import top1_randomized
from .trajectory import KINDS, VEC, Features, store_rows

SVD_MODES = ("exact", "fast")
# Live [m, n] stacks per parameter in the feature pass: base, previous, current, future, one delta, two in the
# reader's pipeline; the SVD's workspace comes on top (``svd_workspace``).
FEATURE_STACKS = 7


class Meter:
    """Thread-safe accounting of the bytes the engine holds; ``peak`` is the high-water mark."""

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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD = 1 << 16  # blocks above 64 KB (every stack of a real model) are mmapped and unmapped on free


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def heap_hygiene() -> None:
    """Fix glibc's mmap threshold at 64 KB (a fixed threshold also stops its upward adaptation), so that freed
    stacks leave the process at once in every thread's arena; a no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim), after a batch; a no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class StreamStats:
    """What one streaming run measured."""

    budget: int | None
    peak: int = 0
    batches: int = 0
    reads: int = 0
    svd: str = "exact"
    sigma_error_max: float = 0.0  # fast mode: the largest reported relative sigma error bound (0 for exact)
    seconds_waiting: float = 0.0  # compute time spent waiting for the reader


class Reader:
    """Reads (row, names) stacks in order on a background thread, one ahead of the consumer."""

    def __init__(self, traj: FullTrajectory, jobs: list[tuple[int, list[str]]], shape: tuple[int, int],
                 dtype: torch.dtype, device: torch.device, meter: Meter):
        self.traj, self.jobs, self.shape, self.dtype, self.device, self.meter = traj, jobs, shape, dtype, device, meter
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self.waited = 0.0  # seconds the consumer spent waiting for a read: I/O the compute did not hide
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            for row, names in self.jobs:
                host = torch.empty(len(names), *self.shape, dtype=self.dtype, pin_memory=cuda)
                self.meter.add(nbytes(host))
                with self.meter.scratch(native_bytes(self.shape)):  # safe_open's copy of one tensor, before conversion
                    self.traj.read_into(row, names, host)
                event = None
                if cuda:  # untested here (no GPU): copy on a side stream, the consumer waits on the event
                    with torch.cuda.stream(stream):
                        dev = host.to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                    event.synchronize()  # the pinned host buffer may be freed only after the copy
                    self.meter.sub(nbytes(host))
                    self.meter.add(nbytes(dev))
                    host = dev
                if not self._put((row, host, event)):
                    self.meter.sub(nbytes(host))
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put((None, e, None))

    def _put(self, item: tuple) -> bool:
        """Queue ``item`` unless the consumer has gone (then False)."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for _ in self.jobs:
            t0 = time.perf_counter()
            row, t, event = self._q.get()
            self.waited += time.perf_counter() - t0
            if row is None:
                raise t
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                t.record_stream(torch.cuda.current_stream(self.device))
            yield row, t

    def close(self) -> None:
        self._stop.set()
        while True:  # release a stack the consumer never took
            try:
                row, t, _ = self._q.get_nowait()
                if row is not None:
                    self.meter.sub(nbytes(t))
            except queue.Empty:
                break
        self._thread.join()


def _param_groups(params: list[Param]) -> dict[tuple[int, int, bool], list[Param]]:
    groups: dict[tuple[int, int, bool], list[Param]] = {}
    for p in params:
        groups.setdefault((*p.matrix_shape, p.is_vector), []).append(p)
    return groups


def native_bytes(shape: tuple[int, int]) -> int:
    """An upper bound of one stored tensor of ``shape`` (float64 at most), as safe_open returns it."""
    return 8 * shape[0] * shape[1]


def batches(params: list[Param], stacks: int, itemsize: int, meter: Meter, svd: str | None = None,
            scratch: Callable[[tuple[int, int]], int] | None = None) -> Iterator[list[Param]]:
    """Same-shape parameters in batches whose ``stacks`` copies (plus the SVD's workspace, plus one stored tensor
    being read, plus the pass's ``scratch`` for the shape) fit what the budget leaves free."""
    for group in _param_groups(params).values():
        m, n = shape = group[0].matrix_shape
        per = stacks * group[0].numel * itemsize + (svd_workspace(m, n, svd, itemsize) if svd and not group[0].is_vector else 0)
        fixed = native_bytes(shape) + (scratch(shape) if scratch else 0)
        free = None if meter.budget is None else meter.budget - meter.held - fixed
        size = len(group) if free is None else max(free, 0) // per
        if size < 1:
            raise NextrapError(f"parameter {group[0].name} {list(group[0].shape)} needs {_mb(per + fixed)} to stream "
                               f"({stacks} copies in float{8 * itemsize}{' and SVD workspace' if svd else ''}), more than the --max-memory budget "
                               f"{_mb(meter.budget)} leaves ({_mb(None if free is None else free + fixed)} after {_mb(meter.held)} of features held); raise --max-memory")
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _mb(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / 1e6:.3g} MB"


def svd_workspace(m: int, n: int, svd: str, itemsize: int) -> int:
    """Conservative bytes the top-1 SVD of one m x n matrix allocates besides its input (checked against the
    process's measured peak for square, 128:1 tall and wide, and small shapes: 1.0-1.6x the measured exact
    workspace, 1.2-2.3x the fast one)."""
    k = min(m, n)
    if svd == "exact":  # torch's copy of A, U [m,k] and V^T [k,n]; gesdd's work holds another max(m,n) x k
        return itemsize * (m * n + max(m, n) * k + (m + n) * k + 4 * k * k + 3 * max(m, n))  # block and 4k^2 + 3max
    return itemsize * (16 * (m + n) * 12 + 16 * n)  # blocks of k = 16 columns, their products and QRs' work


def top1(x: torch.Tensor, svd: str) -> tuple[Rank1, torch.Tensor]:
    """(top singular triple, relative sigma error bound) of dense matrices x [b, m, n]; zero deltas give zeros."""
    if svd == "fast":
        return top1_randomized(x)
    r1 = top1_dense(x)
    zero = (r1.sigma == 0)[..., None]
    r1.u, r1.v = r1.u.masked_fill(zero, 0.0), r1.v.masked_fill(zero, 0.0)
    return r1, torch.zeros_like(r1.sigma)


def feature_bytes(traj: FullTrajectory) -> int:
    """Bytes of the float32 features of every parameter (they are held until written)."""
    rows = len(traj.checkpoints)
    per = sum((sum(p.matrix_shape) + 2 if not p.is_vector else p.numel) for p in traj.params)
    return 4 * rows * len(KINDS) * per + 4 * rows * len(traj.params)


def compute_full_features(traj: FullTrajectory, horizon: int, svd: str = "exact", budget: int | None = None,
                          device: str = "cpu", sign_align: bool = True, dtype: torch.dtype = torch.float32,
                          progress: Callable[[int], None] | None = None) -> tuple[Features, StreamStats]:
    """Rank-1 features of every parameter's global, local and target deltas (raw vectors for 1-D parameters),
    streamed under ``budget`` bytes."""
    if svd not in SVD_MODES:
        raise NextrapError(f"--svd {svd}: use exact or fast")
    n = len(traj.checkpoints)
    require_checkpoints(traj.root, [c.path for c in traj.checkpoints], horizon)
    meter, stats, dev = Meter(budget), StreamStats(budget, svd=svd), torch.device(device)
    heap_hygiene()
    meter.add(feature_bytes(traj))
    tensors: dict[str, torch.Tensor] = {}
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for batch in batches(traj.params, FEATURE_STACKS, itemsize, meter, svd):
        names = [p.name for p in batch]
        jobs = [(-1, names)] + [(r, names) for i in range(n) for r in ((i, i + horizon) if i + horizon < n else (i,))]
        reader = Reader(traj, jobs, batch[0].matrix_shape, dtype, dev, meter)
        try:
            rows = _feature_rows(iter(reader), n, horizon, svd, batch[0].is_vector, meter, stats)
        finally:
            reader.close()
            stats.seconds_waiting += reader.waited
        _store(tensors, names, rows, n, sign_align, batch[0].is_vector)
        trim_heap()
        stats.batches += 1
        stats.reads += len(jobs)
        if progress:
            progress(len(batch))
    stats.peak = meter.peak
    return Features(traj.steps, horizon, sign_align, [p.name for p in traj.params], tensors), stats


def _feature_rows(stacks: Iterator[tuple[int, torch.Tensor]], n: int, horizon: int, svd: str, vector: bool,
                  meter: Meter, stats: StreamStats) -> dict[str, list]:
    """Consume base, then (W_i, W_{i+h}) for each row i; returns per kind a list of per-row results."""
    out: dict[str, list] = {k: [] for k in KINDS}
    _, w0 = next(stacks)
    prev = w0
    for i in range(n):
        _, cur = next(stacks)
        for kind, other in (("global", w0), ("local", prev)):
            out[kind].append(_reduce(cur - other, svd, vector, meter, stats))
        if i + horizon < n:
            _, fut = next(stacks)
            out["target"].append(_reduce(fut - cur, svd, vector, meter, stats))
            meter.sub(nbytes(fut))
            del fut
        if prev is not w0:
            meter.sub(nbytes(prev))
        prev = cur
    meter.sub(nbytes(prev) + nbytes(w0))
    return out


def _reduce(delta: torch.Tensor, svd: str, vector: bool, meter: Meter, stats: StreamStats):
    """A delta stack [b, m, n] -> its raw vectors (1-D parameters) or its top singular triple."""
    meter.add(nbytes(delta))
    try:
        if vector:
            return delta[..., 0].float().cpu()
        with meter.scratch(delta.shape[0] * svd_workspace(*delta.shape[-2:], svd, delta.element_size())):
            r1, err = top1(delta, svd)
        if err.numel():
            stats.sigma_error_max = max(stats.sigma_error_max, float(err.max()))
        return Rank1(r1.sigma.float().cpu(), r1.u.float().cpu(), r1.v.float().cpu(), r1.energy.float().cpu())
    finally:
        meter.sub(nbytes(delta))


def _store(tensors: dict[str, torch.Tensor], names: list[str], rows: dict[str, list], n_rows: int, sign_align: bool,
           vector: bool) -> None:
    for kind, per_row in rows.items():
        if vector:
            parts = {VEC: torch.stack(per_row, 1)}  # [b, rows, n]
        else:
            sigma = torch.stack([r.sigma for r in per_row], 1)
            u, v = torch.stack([r.u for r in per_row], 1), torch.stack([r.v for r in per_row], 1)
            u, v = align_signs(u, v) if sign_align else (u, v)
            parts = {"sigma": sigma, "u": u, "v": v}
            if kind == "global":
                parts["energy"] = torch.stack([r.energy for r in per_row], 1)
        store_rows(tensors, names, kind, parts, n_rows)
