"""Extrapolation methods behind one interface: given the trajectory up to checkpoint ``row``, each returns a
``Jump`` (the predicted move per module, as thin factors) and the jumped weights are W_row + alpha * P @ Q.T.
Adding a method means adding one module here and one line to ``METHODS``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..checkpoints import LoraTrajectory
from ..predictor import Predictor
from ..trajectory import Features


@dataclass
class JumpContext:
    features: Features
    trajectory: LoraTrajectory
    row: int  # the checkpoint the jump starts from
    predictor: Predictor | None = None  # the fitted NExt predictor, for methods that need one


@dataclass
class Jump:
    """Per module: thin factors (P [m, k], Q [n, k]) of the move, so that delta = P @ Q.T; ``sigma`` for reports."""

    method: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sigma: dict[str, float]


def difference_jump(ctx: JumpContext, ref_row: int | None, name: str) -> Jump:
    """The move W_row - W_ref (W_ref = the base model when ``ref_row`` is None or negative), exact in factors."""
    from ..checkpoints import shape_groups
    from ..lowrank import frobenius_factored
    from ..trajectory import pair_factors

    traj = ctx.trajectory
    factors, sizes = {}, {}
    for names in shape_groups(traj.modules).values():
        b, a = traj.factors(ctx.row, names)
        b0, a0 = traj.factors(ref_row, names) if ref_row is not None and ref_row >= 0 else (None, None)
        p, q = pair_factors(b, a, b0, a0, traj.scales(names))
        norms = frobenius_factored(p, q)
        for j, module in enumerate(names):
            factors[module] = (p[j], q[j])
            sizes[module] = float(norms[j])
    return Jump(name, factors, sizes)


def _registry() -> dict[str, Callable[[JumpContext], Jump]]:
    from . import expo, linear, next as next_method, relex
    return {"next": next_method.jump, "linear": linear.jump, "expo": expo.jump, "relex": relex.jump}


METHODS: tuple[str, ...] = ("next", "linear", "expo", "relex")
NEEDS_PREDICTOR = {"next"}


def jump(method: str, ctx: JumpContext) -> Jump:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    result = _registry()[method](ctx)
    for name, (p, q) in result.factors.items():
        if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
            raise FloatingPointError(f"method {method} predicted NaN or Inf for module {name}")
    return result
