"""Streamed passes over full-parameter moves: the backtest's terms, relex's projections, and the jumped
tensors ``extend`` writes. A move is a ``methods.Jump``: factors P @ Q^T per parameter and/or a symbolic
checkpoint difference W_row - W_ref, made dense one row chunk at a time under the budget.

Stacks are read in float32 (exact for bf16, fp16 and fp32 checkpoints); differences, products and sums are
formed in float64 on row chunks of a few MB, so the terms match a float64 computation at a quarter of its memory.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from nextrap.io.fullparam import FullTrajectory
from nextrap.core.moves import Jump
from nextrap.engine.budget import Meter, StreamStats, chunk_bytes, heap_hygiene, nbytes, row_chunks, trim_heap
from nextrap.engine.fullstream import FEATURE_STACKS, Reader, batches, feature_bytes, project_matrix, selected
from nextrap.engine.projected import held_bytes, recall_all

STACK_DTYPE = torch.float32
_ITEMSIZE = 4
_TERMS_EXTRA = 2  # two stacks in the reader's pipeline (besides the rows read)
_PROJECTION_STACKS = 3  # the stack in use and two in the reader's pipeline
_METHODS_BOUND = 4  # factored moves held at once in a backtest pass (next, next-paper, relex, the oracle), for the preflight


def _rows_of(j: Jump) -> list[int]:
    if j.difference is None:
        return []
    row, ref = j.difference
    return [row, -1 if ref is None else ref]


def factor_bytes(jumps: dict[str, Jump]) -> int:
    return sum(nbytes(p) + nbytes(q) for j in jumps.values() for p, q in j.factors.values())


def _move_rows(j: Jump, name: str, i: int, held: dict[int, torch.Tensor], rows: slice, shape: tuple[int, int]) -> torch.Tensor:
    """Rows ``rows`` of the dense move of batch member i (parameter ``name``) in float64: W_row - W_ref (when
    symbolic) plus P @ Q^T (when factored)."""
    if j.difference is not None:
        row, ref = _rows_of(j)
        move = held[row][i, rows].double() - held[ref][i, rows].double()
    else:
        move = torch.zeros(rows.stop - rows.start, shape[1], dtype=torch.float64)
    if name in j.factors:
        p, q = (f.double() for f in j.factors[name])
        if p.shape[0] == shape[0] and q.shape[0] == shape[1]:
            move += p[rows] @ q.mT
        else:  # a 1-D parameter's factors may be laid out as [1, d]: tiny, formed whole
            move += (p @ q.mT).reshape(shape)[rows]
    return move


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _pass_meter(traj: FullTrajectory, budget: int | None, held: int = 0) -> Meter:
    """A meter that starts with what the process already holds: the features, the projections the feature pass
    kept (``projected``) and the moves' factors."""
    heap_hygiene()
    meter = Meter(budget)
    meter.add(feature_bytes(traj) + held_bytes(traj) + held)
    return meter


def move_terms(traj: FullTrajectory, jumps: dict[str, Jump], from_row: int, to_row: int, budget: int | None = None,
               device: str = "cpu", names: Sequence[str] | None = None) -> tuple[dict[str, dict[tuple[str, str], float]], StreamStats]:
    """Per parameter (all, or those of ``names``) the inner products of each method's move against the true
    W_to - W_from, keyed ("", "") = ||true||^2 (t), ("", method) = <true, move> (c), (method, method) = ||move||^2
    (j), streamed in one pass for all methods. Each parameter's row chunks are summed on their own, so that the
    caller adds the parameters in one fixed order however they were split (``World.total``)."""
    rows = sorted({from_row, to_row, *(r for j in jumps.values() for r in _rows_of(j))})
    meter, stats = _pass_meter(traj, budget, factor_bytes(jumps)), StreamStats(budget)
    per_param: dict[str, dict[tuple[str, str], float]] = {}
    scratch = partial(chunk_bytes, budget=budget)
    for batch in batches(selected(traj.params, names), len(rows) + _TERMS_EXTRA, _ITEMSIZE, meter, scratch=scratch):
        batch_names = [p.name for p in batch]
        shape = batch[0].matrix_shape
        reader = Reader(traj, [(r, batch_names) for r in rows], shape, STACK_DTYPE, torch.device("cpu"), meter)
        held: dict[int, torch.Tensor] = {}
        try:
            for row, t in reader:
                held[row] = t
            with meter.scratch(scratch(shape)):
                for i, name in enumerate(batch_names):
                    sums = dict.fromkeys([("", ""), *((p, q) for m in jumps for p, q in (("", m), (m, m)))], 0.0)
                    for rs in row_chunks(shape, budget):
                        true = held[to_row][i, rs].double() - held[from_row][i, rs].double()
                        sums[("", "")] += _dot(true, true)
                        for method, j in jumps.items():
                            move = _move_rows(j, name, i, held, rs, shape)
                            sums[("", method)] += _dot(true, move)
                            sums[(method, method)] += _dot(move, move)
                    per_param[name] = sums
        finally:
            reader.close()
            stats.seconds_waiting += reader.waited
            meter.sub(sum(nbytes(t) for t in held.values()))
            held.clear()
            trim_heap()
        stats.batches += 1
        stats.reads += len(rows)
    stats.peak = meter.peak
    return per_param, stats


def jumped_tensor(traj: FullTrajectory, j: Jump, row: int, name: str, alpha: float) -> torch.Tensor:
    """W_row + alpha * move for one tensor, in its stored dtype (a tensor the trajectory does not featurise is
    W_row). Holds the tensors read in their stored dtype and float64 row chunks (``chunk_bytes``)."""
    w = traj.tensor(row, name)
    if name not in j.factors and (j.difference is None or name in traj.skipped):
        return w
    shape = (w.shape[0], w.numel() // w.shape[0])
    held = {r: traj.tensor(r, name).reshape(1, *shape) for r in _rows_of(j)}
    out = torch.empty_like(w)
    flat_w, flat_out = w.reshape(shape), out.view(shape)
    for rs in row_chunks(shape, traj.budget):
        flat_out[rs] = (flat_w[rs].double() + alpha * _move_rows(j, name, 0, held, rs, shape)).to(w.dtype)
    return out


def jumped_bytes(traj: FullTrajectory, itemsize: dict[str, int], budget: int | None) -> tuple[int, str]:
    """(bytes, parameter) of the most ``jumped_tensor`` holds for one tensor: W_row, two rows of a difference and
    the output in their stored dtype (``itemsize`` per name), plus the float64 chunk temporaries."""
    return max(((4 * itemsize[p.name] * p.numel + chunk_bytes(p.matrix_shape, budget), p.name) for p in traj.params),
               default=(0, ""))


def projections(traj: FullTrajectory, directions: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: list[int],
                budget: int | None = None, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """a_i = u^T (W_i - W_0) v for every matrix parameter in ``directions`` (or in ``names`` too) and every row in
    ``rows``: the projections relex fits its line to, as the feature pass computed them where it did
    (``compute_full_features``' ``project``), else streamed (one read of each row, nothing dense kept)."""
    out = recall_all(traj, directions, [p.name for p in selected(traj.params, names)], rows)
    params = [p for p in selected(traj.params, names) if p.name in directions and not p.is_vector and p.name not in out]
    held = sum(nbytes(u) + nbytes(v) for u, v in directions.values())
    meter = _pass_meter(traj, budget, held)
    scratch = partial(chunk_bytes, budget=budget)
    for batch in batches(params, _PROJECTION_STACKS, _ITEMSIZE, meter, scratch=scratch):
        batch_names = [p.name for p in batch]
        shape = batch[0].matrix_shape
        reader = Reader(traj, [(r, batch_names) for r in (-1, *rows)], shape, STACK_DTYPE, torch.device("cpu"), meter)
        values = []
        try:
            with meter.scratch(scratch(shape)):
                for _, w in reader:
                    values.append(torch.stack([project_matrix(w[i], *directions[n], budget) for i, n in enumerate(batch_names)]))
                    meter.sub(nbytes(w))
                    del w
        finally:
            reader.close()
            trim_heap()
        # u^T W_i v - u^T W_0 v in float64: each term is exact to ~1e-16 relative, the difference keeps the small move
        a = torch.stack(values[1:], 1) - values[0][:, None]
        out.update({n: a[i] for i, n in enumerate(batch_names)})
    return out


def preflight(traj: FullTrajectory, budget: int | None, svd: str, backtest: bool) -> None:
    """Check up front that every pass a fit will run fits the budget beside the features it holds, so that a
    too-small budget fails now with the one-line error rather than after the feature pass."""
    list(batches(traj.params, FEATURE_STACKS, _ITEMSIZE, _pass_meter(traj, budget), svd))
    if not backtest:
        return
    factored = _METHODS_BOUND * sum(8 * 2 * sum(p.matrix_shape) for p in traj.params)  # rank-2 float64 factors
    scratch = partial(chunk_bytes, budget=budget)
    list(batches(traj.params, 4 + _TERMS_EXTRA, _ITEMSIZE, _pass_meter(traj, budget, factored), scratch=scratch))
    matrices = [p for p in traj.params if not p.is_vector]
    directions = 8 * sum(sum(p.matrix_shape) for p in matrices)
    list(batches(matrices, _PROJECTION_STACKS, _ITEMSIZE, _pass_meter(traj, budget, directions), scratch=scratch))
