"""Rank-1 linear extrapolation (RelEx style, arXiv 2605.21468): fix each module's dominant direction
u v^T (the top singular pair of its latest global delta), project every checkpoint's global delta onto it,
a_i = u^T G_i v, fit a straight line a(step) by least squares on the checkpoints up to ``row`` (from the
first one with a nonzero delta), and move by (a_hat(step_row + h steps) - a_row) u v^T."""

from __future__ import annotations

import torch

from nextrap.methods import Jump, JumpContext, rank1_factors


def jump(ctx: JumpContext) -> Jump:
    if ctx.trajectory is None:
        raise ValueError("the relex method projects the checkpoints: it needs the trajectory")
    feats, row, h = ctx.features, ctx.row, ctx.features.horizon
    steps = torch.tensor(feats.steps[: row + 1], dtype=torch.float64)
    # the step h checkpoints ahead, assuming the run keeps its saving interval
    interval = float(steps[-1] - steps[-2]) if row >= 1 else 1.0
    target_step = float(steps[-1]) + h * interval
    # 1-D parameters of a full-parameter fit have no direction to fix: they keep their last value
    directions = {m: (feats.get(m, "global", "u")[row].double(), feats.get(m, "global", "v")[row].double())
                  for m in feats.modules if not feats.is_vector(m)}
    factors, coeffs = {}, {}
    # a_i = u^T G_i v for every checkpoint i <= row, streamed by the trajectory
    for name, a in ctx.trajectory.projections(directions, list(range(row + 1))).items():
        u, v = directions[name]
        start = int((a != 0).nonzero()[0]) if (a != 0).any() else row
        x, y = steps[start:], a[start:]
        if len(x) >= 2:
            xm, ym = x.mean(), y.mean()
            slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
            predicted = ym + slope * (target_step - xm)
        else:
            predicted = a[-1]
        delta = float(predicted - a[-1])
        factors[name] = rank1_factors(delta, u, v)
        coeffs[name] = delta
    return Jump("relex", factors, coeffs)
