"""Streamed passes over full-parameter moves: the backtest's terms, relex's projections, and the jumped
tensors ``extend`` writes. A move is a ``methods.Jump``: factors P @ Q^T per parameter and/or a symbolic
checkpoint difference W_row - W_ref, made dense one batch (or one tensor) at a time under the budget."""

from __future__ import annotations

import torch

from .backtest import Terms
from .fullparam import FullTrajectory
from .methods import Jump
from .streaming import Meter, Reader, StreamStats, batches, nbytes

_TERMS_EXTRA = 5  # T, the move and a product added into it, two in the reader's pipeline (besides the rows read)


def _rows_of(j: Jump) -> list[int]:
    if j.difference is None:
        return []
    row, ref = j.difference
    return [row, -1 if ref is None else ref]


def _move(j: Jump, names: list[str], held: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The dense move of a batch [b, m, n]: W_row - W_ref (when symbolic) plus P @ Q^T (when factored)."""
    if j.difference is not None:
        row, ref = _rows_of(j)
        move = held[row] - held[ref]
    else:
        move = torch.zeros_like(like)
    for i, name in enumerate(names):
        if name in j.factors:
            p, q = j.factors[name]
            move[i] += (p.to(like) @ q.to(like).mT).reshape(like.shape[1:])
    return move


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius inner product without a temporary of a's size."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def move_terms(traj: FullTrajectory, jumps: dict[str, Jump], from_row: int, to_row: int, budget: int | None = None,
               device: str = "cpu", dtype: torch.dtype = torch.float64) -> tuple[dict[str, Terms], float, StreamStats]:
    """Backtest terms of each method's move against the true W_to - W_from, and t = ||W_to - W_from||^2,
    streamed in one pass for all methods."""
    rows = sorted({from_row, to_row, *(r for j in jumps.values() for r in _rows_of(j))})
    meter, stats, dev = Meter(budget), StreamStats(budget), torch.device(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    terms = {m: Terms() for m in jumps}
    t_total = 0.0
    for batch in batches(traj.params, len(rows) + _TERMS_EXTRA, itemsize, meter):
        names = [p.name for p in batch]
        reader = Reader(traj, [(r, names) for r in rows], batch[0].matrix_shape, dtype, dev, meter)
        held: dict[int, torch.Tensor] = {}
        try:
            for row, t in reader:
                held[row] = t
            true = held[to_row] - held[from_row]
            meter.add(nbytes(true))
            t_sq = _dot(true, true)
            t_total += t_sq
            for method, j in jumps.items():
                with meter.scratch(2 * nbytes(true)):  # the move and the rank-k product added into it
                    move = _move(j, names, held, true)
                    terms[method] += Terms(t_sq, _dot(true, move), _dot(move, move))
                    del move
            meter.sub(nbytes(true))
        finally:
            reader.close()
            stats.seconds_waiting += reader.waited
            meter.sub(sum(nbytes(t) for t in held.values()))
        stats.batches += 1
        stats.reads += len(rows)
    stats.peak = meter.peak
    return terms, t_total, stats


def jumped_tensor(traj: FullTrajectory, j: Jump, row: int, name: str, alpha: float) -> torch.Tensor:
    """W_row + alpha * move for one tensor, in its stored dtype (a tensor the trajectory does not featurise is W_row)."""
    w = traj.tensor(row, name)
    if name not in j.factors and (j.difference is None or name in traj.skipped):
        return w

    def matrix(t: torch.Tensor) -> torch.Tensor:  # the [1, m, n] view the moves are defined on
        return t.to(torch.float64).reshape(1, w.shape[0], -1)

    held = {r: matrix(traj.tensor(r, name)) for r in _rows_of(j)}
    move = _move(j, [name], held, matrix(w))
    return (w.to(torch.float64) + alpha * move[0].reshape(w.shape)).to(w.dtype)


def projections(traj: FullTrajectory, directions: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: list[int],
                budget: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """a_i = u^T (W_i - W_0) v for every matrix parameter in ``directions`` and every row in ``rows``, streamed:
    the projections relex fits its line to (one read of each row, nothing dense kept)."""
    params = [p for p in traj.params if p.name in directions and not p.is_vector]
    meter, dev = Meter(budget), torch.device(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    out: dict[str, torch.Tensor] = {}
    for batch in batches(params, 3, itemsize, meter):  # the stack in use and two in the reader's pipeline
        names = [p.name for p in batch]
        u = torch.stack([directions[n][0] for n in names]).to(dev, dtype)[:, None, :]  # [b, 1, m]
        v = torch.stack([directions[n][1] for n in names]).to(dev, dtype)[:, :, None]  # [b, n, 1]
        reader = Reader(traj, [(r, names) for r in (-1, *rows)], batch[0].matrix_shape, dtype, dev, meter)
        values = []
        try:
            for _, w in reader:
                values.append((u @ w @ v)[:, 0, 0].cpu())
                meter.sub(nbytes(w))
                del w
        finally:
            reader.close()
        a = torch.stack(values[1:], 1) - values[0][:, None]
        out.update({n: a[i] for i, n in enumerate(names)})
    return out
