"""Extrapolation from the start (ExPO style): the move is the whole update so far, W_c - W_0, so that
W_hat = W_c + alpha (W_c - W_0). Exact in LoRA factors (rank r)."""

from __future__ import annotations

from ..checkpoints import shape_groups
from ..lowrank import frobenius_factored
from ..trajectory import pair_factors
from . import Jump, JumpContext


def jump(ctx: JumpContext) -> Jump:
    traj = ctx.trajectory
    factors, sizes = {}, {}
    for names in shape_groups(traj.modules).values():
        b, a = traj.factors(ctx.row, names)
        p, q = pair_factors(b, a, None, None, traj.scales(names))
        norms = frobenius_factored(p, q)
        for j, name in enumerate(names):
            factors[name] = (p[j], q[j])
            sizes[name] = float(norms[j])
    return Jump("expo", factors, sizes)
