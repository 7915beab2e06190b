"""Straight-line extrapolation (RL-Extra / AlphaRL style): the move is the last h-checkpoint move,
W_c - W_{c-h} (from the base model when c - h is before the first checkpoint), exact in LoRA factors."""

from __future__ import annotations

from ..checkpoints import shape_groups
from ..lowrank import frobenius_factored
from ..trajectory import pair_factors
from . import Jump, JumpContext


def jump(ctx: JumpContext) -> Jump:
    traj, row, h = ctx.trajectory, ctx.row, ctx.features.horizon
    factors, sizes = {}, {}
    for names in shape_groups(traj.modules).values():
        scale = traj.scales(names)
        b, a = traj.factors(row, names)
        if row - h >= 0:
            b0, a0 = traj.factors(row - h, names)
            p, q = pair_factors(b, a, b0, a0, scale)
        else:
            p, q = pair_factors(b, a, None, None, scale)
        norms = frobenius_factored(p, q)
        for j, name in enumerate(names):
            factors[name] = (p[j], q[j])
            sizes[name] = float(norms[j])
    return Jump("linear", factors, sizes)

