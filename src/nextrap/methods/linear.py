"""Straight-line extrapolation (RL-Extra / AlphaRL style): the move is the last h-checkpoint move,
W_c - W_{c-h} (from the base model when c - h is before the first checkpoint), exact in LoRA factors."""

from __future__ import annotations

from nextrap.methods import Jump, JumpContext, difference_jump


def jump(ctx: JumpContext) -> Jump:
    return difference_jump(ctx, ctx.row - ctx.features.horizon, "linear")
