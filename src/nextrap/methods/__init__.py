"""Extrapolation methods behind one interface: given the trajectory up to checkpoint ``row``, each returns a
``Jump`` (the predicted move per module) and the jumped weights are W_row + alpha * move.

A method is one module here with ``jump(ctx) -> Jump``; a method that learns from the trajectory also has
``fit(features, settings, on_epoch, trajectory) -> model``, ``save(model, folder)``, ``saved_in(folder)`` and
``load(folder, settings) -> model``. Adding a method means adding its module to ``_modules`` and its name to
``METHODS`` (and ``FITTED`` when it learns).

A move is low-rank factors per module (P [m, k], Q [n, k], move = P @ Q.T) plus, optionally, a checkpoint
difference W_row - W_ref. On a LoRA trajectory the difference is exact in factors and folded into them
(``Jump.factors`` is then a ``lorastream.LoraMove``, which reads a module's checkpoint factors when they are
asked for and lets the streamed passes read them unit by unit); on a full-parameter trajectory
(``ctx.trajectory`` is not a ``LoraTrajectory``) it stays symbolic in ``Jump.difference`` and the readers stream
it tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from ..checkpoints import LoraTrajectory
from ..lorastream import LoraMove
from ..moves import Jump
from ..registry import FITTED, METHODS
from ..trajectory import Features


@dataclass
class JumpContext:
    features: Features
    trajectory: Any  # a LoraTrajectory; None or another trajectory type in full-parameter mode
    row: int  # the checkpoint the jump starts from
    models: dict[str, Any] = field(default_factory=dict)  # fitted model per method name, for methods that learn


def difference_jump(ctx: JumpContext, ref_row: int | None, name: str) -> Jump:
    """The move W_row - W_ref (W_ref = the base model when ``ref_row`` is None or negative): exact LoRA factors
    read per module when asked for (``LoraMove``), or a symbolic ``difference`` for a full-parameter trajectory."""
    ref = ref_row if ref_row is not None and ref_row >= 0 else None
    traj = ctx.trajectory
    if not isinstance(traj, LoraTrajectory):
        return Jump(name, {}, {}, difference=(ctx.row, ref))
    return Jump(name, LoraMove(traj, ctx.row, ref), {})


def rank1_factors(sigma: float, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with P Q^T = sigma u v^T, sigma split evenly so an appended adapter column stays balanced."""
    root = abs(sigma) ** 0.5
    sign = -1.0 if sigma < 0 else 1.0
    return (sign * root * u.double())[:, None], (root * v.double())[:, None]


def combine(name: str, first: Jump, second: Jump) -> Jump:
    """The sum of two moves (factors concatenated per module; at most one may carry a symbolic difference)."""
    if first.difference is not None and second.difference is not None:
        raise ValueError("cannot add two symbolic checkpoint differences")
    sigma = {**first.sigma, **second.sigma}
    if isinstance(first.factors, LoraMove):
        return Jump(name, first.factors.plus(second.factors), sigma)
    factors = {}
    for module in {**first.factors, **second.factors}:
        parts = [j.factors[module] for j in (first, second) if module in j.factors]
        factors[module] = (torch.cat([p for p, _ in parts], -1), torch.cat([q for _, q in parts], -1))
    return Jump(name, factors, sigma, first.difference or second.difference)


def only_modules(j: Jump, keep: set[str]) -> Jump:
    """The same jump with a zero move (of the same rank) for the modules outside ``keep``."""
    if isinstance(j.factors, LoraMove):
        return Jump(j.method, j.factors.only(keep), {n: s if n in keep else 0.0 for n, s in j.sigma.items()})
    if j.difference is not None:  # a symbolic checkpoint difference cannot be dropped per module
        raise ValueError("--min-energy needs a method whose move is explicit per module (not a full-parameter difference)")
    factors = {n: (p, q) if n in keep else (torch.zeros_like(p), torch.zeros_like(q)) for n, (p, q) in j.factors.items()}
    return Jump(j.method, factors, {n: s if n in keep else 0.0 for n, s in j.sigma.items()})


def _modules() -> dict[str, ModuleType]:
    from . import expo, linear, next as next_method, next_paper, relex
    return {"next": next_method, "next-paper": next_paper, "linear": linear, "expo": expo, "relex": relex}




def _module(method: str) -> ModuleType:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return _modules()[method]


def fit_models(features: Features, methods: tuple[str, ...] | list[str], settings: Any,
               on_epoch: Callable[[str, int, int], None] | None = None, trajectory: Any = None) -> dict[str, Any]:
    """Fit the model of every method in ``methods`` that learns one, on the rows of ``features`` only (a
    ``trajectory`` lets a method measure those rows exactly). ``on_epoch(method, done, total)``."""
    models = {}
    for method in methods:
        if method in FITTED:
            report = (lambda e, total, m=method: on_epoch(m, e, total)) if on_epoch else None
            models[method] = _module(method).fit(features, settings, report, trajectory)
    return models


def save_models(models: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write each fitted model into ``folder``; returns a JSON-able summary per method."""
    return {method: _module(method).save(model, folder) for method, model in models.items()}


def load_models(folder: Path, methods: tuple[str, ...] | list[str], settings: Any) -> dict[str, Any]:
    """The fitted models saved in ``folder``; a method whose files are absent (an older fit) is left out."""
    return {m: _module(m).load(folder, settings) for m in methods if m in FITTED and _module(m).saved_in(folder)}


def jump(method: str, ctx: JumpContext) -> Jump:
    result = _module(method).jump(ctx)
    # a LoraMove's checkpoint factors were checked when read: only what the method computed is checked here
    explicit = result.factors.explicit if isinstance(result.factors, LoraMove) else result.factors
    for name, (p, q) in explicit.items():
        if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
            raise FloatingPointError(f"method {method} predicted NaN or Inf for module {name}")
    return result
