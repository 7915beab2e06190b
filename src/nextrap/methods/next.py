"""NExt (arXiv 2604.11446): the fitted predictor maps the last checkpoint's global and local rank-1
components to the target one; the move is sigma_hat * u_hat v_hat^T with u_hat, v_hat normalized."""

from __future__ import annotations

import torch

from ..predictor import predict
from . import Jump, JumpContext


def jump(ctx: JumpContext) -> Jump:
    if ctx.predictor is None:
        raise ValueError("the next method needs a fitted predictor")
    pred = predict(ctx.predictor, ctx.features, ctx.row)
    factors, sigmas = {}, {}
    for module, p in pred.items():
        sigma = float(p["sigma"])
        # Split sigma evenly between the two factors (sign on P) so an appended adapter column stays balanced.
        root = abs(sigma) ** 0.5
        sign = -1.0 if sigma < 0 else 1.0
        factors[module] = ((sign * root * p["u"].double())[:, None], (root * p["v"].double())[:, None])
        sigmas[module] = sigma
    return Jump("next", factors, sigmas)
