"""The budgeted streaming engine for full-parameter trajectories.

Parameters of one shape are processed in batches sized so that everything held at once (the batch's
tensors, the prefetched next read, SVD workspace, the features being built) stays under ``--max-memory``.
Tensors are read one at a time with ``safe_open``; a reader thread reads the next tensor stack while the current
one is computed (on CUDA into pinned memory, copied with ``non_blocking`` on a side stream), or, on a CPU whose
few threads take every core, the stacks are read in between (``budget.Prefetcher``).

Memory is *accounted*, not sampled (``budget``: the meter, batch sizing, glibc's heap hygiene, the reader
thread), and each SVD adds a conservative estimate of LAPACK's workspace.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Sequence

import torch

from nextrap.engine.budget import (Meter, Prefetcher, StreamStats, chunk_rows, group_by, heap_hygiene, mb, nbytes, row_chunks,
                                   sized_batches, trim_heap)
from nextrap.engine.projected import remember
from nextrap.io.checkpoints import require_checkpoints
from nextrap.core.errors import NextrapError
from nextrap.io.fullparam import FullTrajectory, Param
from nextrap.core.lowrank import Rank1, align_signs, top1_dense
from nextrap.core.randsvd import top1_randomized
from nextrap.core.features import KINDS, VEC, Features
from nextrap.engine.lorafeatures import store_rows

SVD_MODES = ("exact", "fast")
# Live [m, n] stacks per parameter in the feature pass: base, previous, current, future, one delta, two in the
# reader's pipeline; the SVD's workspace comes on top (``svd_workspace``).
FEATURE_STACKS = 7


def read_stack(traj: FullTrajectory, shape: tuple[int, int], dtype: torch.dtype, job: tuple[int, list[str]], meter: Meter,
               pin: bool) -> torch.Tensor:
    """``Reader``'s load: row ``job[0]``'s tensors ``job[1]`` as one [len, m, n] stack."""
    row, names = job
    host = torch.empty(len(names), *shape, dtype=dtype, pin_memory=pin)
    meter.add(nbytes(host))
    with meter.scratch(native_bytes(shape)):  # safe_open's copy of one tensor, before conversion
        traj.read_into(row, names, host)
    return host


class Reader(Prefetcher):
    """(row, names) stacks of a full trajectory read in order, one ahead of the consumer on a background thread or
    in between (``Prefetcher``'s ``background``); iterating yields (row, stack)."""

    def __init__(self, traj: FullTrajectory, jobs: list[tuple[int, list[str]]], shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, meter: Meter, background: bool | None = None):
        super().__init__(jobs, partial(read_stack, traj, shape, dtype), device, meter, key=lambda job: job[0],
                         background=background)


def native_bytes(shape: tuple[int, int]) -> int:
    """An upper bound of one stored tensor of ``shape`` (float64 at most), as safe_open returns it."""
    return 8 * shape[0] * shape[1]


def batches(params: list[Param], stacks: int, itemsize: int, meter: Meter, svd: str | None = None,
            scratch: Callable[[tuple[int, int]], int] | None = None) -> Iterator[list[Param]]:
    """Same-shape parameters in batches whose ``stacks`` copies (plus the SVD's workspace, plus one stored tensor
    being read, plus the pass's ``scratch`` for the shape) fit what the budget leaves free."""
    def per(p: Param) -> int:
        return stacks * p.numel * itemsize + (svd_workspace(*p.matrix_shape, svd, itemsize) if svd and not p.is_vector else 0)

    def fixed(p: Param) -> int:
        return native_bytes(p.matrix_shape) + (scratch(p.matrix_shape) if scratch else 0)

    def too_big(p: Param, need: int, free: int | None) -> str:
        return (f"parameter {p.name} {list(p.shape)} needs {mb(need)} to stream ({stacks} copies in float{8 * itemsize}"
                f"{' and SVD workspace' if svd else ''}), more than the --max-memory budget {mb(meter.budget)} leaves "
                f"({mb(free)} after {mb(meter.held)} of features held); raise --max-memory")

    return sized_batches(group_by(params, lambda p: (*p.matrix_shape, p.is_vector)), per, fixed, meter, too_big)


def selected(params: list[Param], names: Sequence[str] | None) -> list[Param]:
    """``params`` (all, or those named in ``names``) in their order."""
    wanted = None if names is None else set(names)
    return [p for p in params if wanted is None or p.name in wanted]


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
                          progress: Callable[[int], None] | None = None, names: Sequence[str] | None = None,
                          project: Sequence[int] = ()) -> tuple[Features, StreamStats]:
    """Rank-1 features of every parameter's (or only those of ``names``: a rank's share under torchrun) global,
    local and target deltas (raw vectors for 1-D parameters), streamed under ``budget`` bytes. A parameter's
    features do not depend on the batch it was computed in.

    ``project``: rows d whose global direction (u_d, v_d, as stored) relex will project every row i <= d on (the
    backtest folds' starts). A batch reads those rows right after the base and takes their global features
    (the same numbers the in-order pass would, which then skips them), and projects every row as it comes
    (``project_matrix``, as ``fullmoves.projections`` does), kept for it (``projected.remember``): one read of
    rows d more, instead of a pass over rows 0..d per fold."""
    if svd not in SVD_MODES:
        raise NextrapError(f"--svd {svd}: use exact or fast")
    n = len(traj.checkpoints)
    require_checkpoints(traj.root, [c.path for c in traj.checkpoints], horizon)
    meter, stats, dev = Meter(budget), StreamStats(budget, svd=svd), torch.device(device)
    heap_hygiene()
    meter.add(feature_bytes(traj))
    tensors: dict[str, torch.Tensor] = {}
    itemsize = torch.empty(0, dtype=dtype).element_size()
    project = sorted(set(project))
    if any(not 0 <= d < n for d in project):
        raise ValueError(f"rows to project on {project}: the trajectory has rows 0..{n - 1}")
    for batch in batches(selected(traj.params, names), FEATURE_STACKS, itemsize, meter, svd):
        names = [p.name for p in batch]
        ahead = [] if batch[0].is_vector else project  # a 1-D parameter has no direction
        jobs = ([(-1, names)] + [(d, names) for d in ahead]
                + [(r, names) for i in range(n) for r in ((i, i + horizon) if i + horizon < n else (i,))])
        reader = Reader(traj, jobs, batch[0].matrix_shape, dtype, dev, meter)
        try:
            rows, values = _feature_rows(iter(reader), n, horizon, svd, batch[0].is_vector, meter, stats, ahead, budget)
        finally:
            reader.close()
            stats.seconds_waiting += reader.waited
        _store(tensors, names, rows, n, sign_align, batch[0].is_vector)
        for d, a in values.items():
            for j, name in enumerate(names):
                remember(traj, name, rows["global"][d].u[j], rows["global"][d].v[j], a[j])
        trim_heap()
        stats.batches += 1
        stats.reads += len(jobs)
        if progress:
            progress(len(batch))
    stats.peak = meter.peak
    return Features(traj.steps, horizon, sign_align, [p.name for p in traj.params], tensors), stats


def _feature_rows(stacks: Iterator[tuple[int, torch.Tensor]], n: int, horizon: int, svd: str, vector: bool,
                  meter: Meter, stats: StreamStats, project: Sequence[int] = (),
                  budget: int | None = None) -> tuple[dict[str, list], dict[int, torch.Tensor]]:
    """Consume base, the rows ``project``, then (W_i, W_{i+h}) for each row i; returns per kind a list of per-row
    results, and per projected row d the projections a_d [b, d + 1] (float64, on the CPU)."""
    out: dict[str, list] = {k: [] for k in KINDS}
    _, w0 = next(stacks)
    early: dict[int, Rank1] = {}
    for d in project:
        _, wd = next(stacks)
        early[d] = _reduce(wd - w0, svd, vector, meter, stats)
        meter.sub(nbytes(wd))
        del wd
    chunk = 8 * chunk_rows(tuple(w0.shape[-2:]), budget) * w0.shape[-1]  # project_matrix's float64 row chunk
    with meter.scratch(chunk if early else 0):
        base = {d: _projections(w0, r1, budget) for d, r1 in early.items()}  # u_d^T W_0 v_d
    values = {d: torch.zeros(w0.shape[0], d + 1, dtype=torch.float64) for d in early}
    prev = w0
    for i in range(n):
        _, cur = next(stacks)
        out["global"].append(early[i] if i in early else _reduce(cur - w0, svd, vector, meter, stats))
        out["local"].append(_reduce(cur - prev, svd, vector, meter, stats))
        with meter.scratch(chunk if any(i <= d for d in early) else 0):
            for d, r1 in early.items():
                if i <= d:  # u^T W_i v - u^T W_0 v, as fullmoves.projections subtracts them
                    values[d][:, i] = _projections(cur, r1, budget) - base[d]
        if i + horizon < n:
            _, fut = next(stacks)
            out["target"].append(_reduce(fut - cur, svd, vector, meter, stats))
            meter.sub(nbytes(fut))
            del fut
        if prev is not w0:
            meter.sub(nbytes(prev))
        prev = cur
    meter.sub(nbytes(prev) + nbytes(w0))
    return out, values


def _projections(w: torch.Tensor, r1: Rank1, budget: int | None) -> torch.Tensor:
    """u^T w v per parameter of a stack w [b, m, n] on its (stored, float32) directions r1.u [b, m], r1.v [b, n]."""
    return torch.stack([project_matrix(w[j], r1.u[j], r1.v[j], budget) for j in range(w.shape[0])]).cpu()


def project_matrix(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, budget: int | None) -> torch.Tensor:
    """u^T w v in float64, accumulated over row chunks (``row_chunks``: the float64 copy of a chunk stays small)."""
    u, v = u.double().to(w.device), v.double().to(w.device)
    return sum((u[rs] @ (w[rs].double() @ v) for rs in row_chunks(tuple(w.shape), budget)),
               torch.zeros((), dtype=torch.float64, device=w.device))


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
