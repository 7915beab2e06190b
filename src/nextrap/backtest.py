"""Backtests on the user's own trajectory: pretend checkpoint c is the future, refit on the checkpoints up to
c - h, jump from c - h, and measure how close the jump lands to the true c.

    error e = ||W_hat - W_c|| / ||W_{c-h} - W_c||     (Frobenius over all LoRA modules together)

e < 1 means the jump lands closer to the future than not jumping (e = 1). ``oracle-rank1`` is the best any
rank-1 jump can do (the true move's own top singular triple), the ceiling for NExt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checkpoints import LoraTrajectory, shape_groups
from .methods import Jump, JumpContext, jump
from .predictor import TrainSettings, train
from .trajectory import Features, pair_factors


@dataclass
class BacktestResult:
    method: str
    alpha: float
    error: float  # ||W_hat - W_true|| / ||W_from - W_true||
    cosine: float  # cosine of the predicted move with the true move, all modules as one vector
    from_step: int
    to_step: int


def evaluate_jump(traj: LoraTrajectory, j: Jump, from_row: int, to_row: int, alpha: float) -> tuple[float, float]:
    """(error e, cosine) of ``W_from + alpha * jump`` against the true ``W_to``, exactly in factor space."""
    miss_sq = true_sq = dot = jump_sq = 0.0
    for names in shape_groups(traj.modules).values():
        scale = traj.scales(names)
        b_to, a_to = traj.factors(to_row, names)
        b_from, a_from = traj.factors(from_row, names)
        tp, tq = pair_factors(b_to, a_to, b_from, a_from, scale)  # true move W_to - W_from
        jp = torch.stack([j.factors[n][0] for n in names])
        jq = torch.stack([j.factors[n][1] for n in names])
        tp_g, tq_g = tp.mT @ tp, tq.mT @ tq
        jp_g, jq_g = jp.mT @ jp, jq.mT @ jq
        cross = ((tp.mT @ jp) * (tq.mT @ jq)).sum()  # <true, jump>
        t_sq = (tp_g * tq_g).sum()
        j_sq = (jp_g * jq_g).sum()
        true_sq += float(t_sq)
        jump_sq += float(j_sq)
        dot += float(cross)
        miss_sq += float(t_sq - 2 * alpha * cross + alpha**2 * j_sq)
    if true_sq == 0:
        return (0.0 if jump_sq == 0 else math.inf), 0.0
    cosine = dot / math.sqrt(true_sq * jump_sq) if jump_sq > 0 else 0.0
    return math.sqrt(max(miss_sq, 0.0) / true_sq), cosine


def oracle_rank1(features: Features, traj: LoraTrajectory, from_row: int) -> tuple[float, float]:
    """(error, cosine) of jumping by the true move's own best rank-1 approximation."""
    sig = torch.stack([features.get(m, "target", "sigma")[from_row].double() for m in features.modules])
    true_sq = 0.0
    to_row = from_row + features.horizon
    for names in shape_groups(traj.modules).values():
        b_to, a_to = traj.factors(to_row, names)
        b_from, a_from = traj.factors(from_row, names)
        p, q = pair_factors(b_to, a_to, b_from, a_from, traj.scales(names))
        true_sq += float(((p.mT @ p) * (q.mT @ q)).sum())
    kept = float((sig**2).sum())
    if true_sq == 0:
        return 0.0, 0.0
    return math.sqrt(max(true_sq - kept, 0.0) / true_sq), math.sqrt(kept / true_sq)


def backtest(features: Features, traj: LoraTrajectory, settings: TrainSettings, methods: tuple[str, ...] = ("next", "linear"),
             alpha: float = 1.0) -> list[BacktestResult]:
    """Refit on checkpoints up to c - h, predict c; one result per method plus the rank-1 oracle."""
    h, c = features.horizon, features.n_rows - 1
    from_row = c - h
    if from_row <= h - 1:
        raise ValueError(f"backtest needs at least {2 * h + 1} checkpoints for horizon {h}; have {features.n_rows}")
    past = features.truncate(from_row + 1)
    predictor = train(past, settings) if any(m == "next" for m in methods) else None
    results = []
    for method in methods:
        j = jump(method, JumpContext(past, traj, from_row, predictor))
        err, cos = evaluate_jump(traj, j, from_row, c, alpha)
        results.append(BacktestResult(method, alpha, err, cos, features.steps[from_row], features.steps[c]))
    err, cos = oracle_rank1(features, traj, from_row)
    results.append(BacktestResult("oracle-rank1", 1.0, err, cos, features.steps[from_row], features.steps[c]))
    return results
