"""Extrapolation from the start (ExPO style): the move is the whole update so far, W_c - W_0, so that
W_hat = W_c + alpha (W_c - W_0). Exact in LoRA factors (rank r)."""

from __future__ import annotations

from nextrap.methods import Jump, JumpContext, difference_jump


def jump(ctx: JumpContext) -> Jump:
    return difference_jump(ctx, None, "expo")
