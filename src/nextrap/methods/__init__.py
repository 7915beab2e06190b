"""Extrapolation methods behind one interface: given the trajectory up to checkpoint ``row``, each returns a
``Jump`` (the predicted move per module) and the jumped weights are W_row + alpha * move.

A method is one module here with ``jump(ctx) -> Jump``; a method that learns from the trajectory also has
``fit(features, settings, on_epoch, trajectory) -> model``, ``save(model, folder)``, ``saved_in(folder)`` and
``load(folder, settings) -> model``. Adding a method means adding its module to ``_modules`` and its
``MethodInfo`` (name, one-line summary, whether it learns) to ``core.registry.REGISTRY``, which the command line,
the model card and every name check read; ``tests/test_registry.py`` checks that the two agree.

A move is low-rank factors per module (P [m, k], Q [n, k], move = P @ Q.T) plus, optionally, a checkpoint
difference W_row - W_ref (``Trajectory.difference``), which the trajectory reads its own way
(``trajectories.interface.Trajectory``): methods never ask which kind of trajectory they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from nextrap.core.moves import Jump
from nextrap.core.registry import FITTED, METHODS, check_method  # noqa: F401 - METHODS, FITTED re-exported
from nextrap.trajectories.interface import Trajectory
from nextrap.core.features import Features


@dataclass
class JumpContext:
    features: Features
    trajectory: Trajectory | None  # None: methods that need no more than the features only
    row: int  # the checkpoint the jump starts from
    models: dict[str, Any] = field(default_factory=dict)  # fitted model per method name, for methods that learn


def difference_jump(ctx: JumpContext, ref_row: int | None, name: str) -> Jump:
    """The move W_row - W_ref (W_ref = the base model when ``ref_row`` is None or negative), as the trajectory
    gives it."""
    ref = ref_row if ref_row is not None and ref_row >= 0 else None
    if ctx.trajectory is None:
        raise ValueError(f"method {name} moves by a checkpoint difference: it needs the trajectory")
    return ctx.trajectory.difference(ctx.row, ref, name)


def rank1_factors(sigma: float, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with P Q^T = sigma u v^T, sigma split evenly so an appended adapter column stays balanced."""
    root = abs(sigma) ** 0.5
    sign = -1.0 if sigma < 0 else 1.0
    return (sign * root * u.double())[:, None], (root * v.double())[:, None]


def combine(name: str, first: Jump, second: Jump) -> Jump:
    """The sum of two moves (factors concatenated per module, the difference's columns first; at most one may carry
    a checkpoint difference, and neither a ``keep``)."""
    if first.difference is not None and second.difference is not None:
        raise ValueError("cannot add two symbolic checkpoint differences")
    if first.keep is not None or second.keep is not None:
        raise ValueError("cannot add moves made for some modules only")
    sigma = {**first.sigma, **second.sigma}
    factors = {}
    for module in {**first.factors, **second.factors}:
        parts = [j.factors[module] for j in (first, second) if module in j.factors]
        factors[module] = (torch.cat([p for p, _ in parts], -1), torch.cat([q for _, q in parts], -1))
    return Jump(name, factors, sigma, first.difference or second.difference)


def _modules() -> dict[str, ModuleType]:
    from nextrap.methods import expo, linear, next as next_method, next_paper, relex
    return {"next": next_method, "next-paper": next_paper, "linear": linear, "expo": expo, "relex": relex}


def _module(method: str) -> ModuleType:
    return _modules()[check_method(method, auto=False)]


def fit_models(features: Features, methods: tuple[str, ...] | list[str], settings: Any,
               on_epoch: Callable[[str, int, int], None] | None = None,
               trajectory: Trajectory | None = None) -> dict[str, Any]:
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
    # a checkpoint difference is checked when the trajectory reads it: only what the method computed is checked here
    for name, (p, q) in result.factors.items():
        if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
            raise FloatingPointError(f"method {method} predicted NaN or Inf for module {name}")
    return result
