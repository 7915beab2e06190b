"""The extrapolation methods as the rest of nextrap names them, in one place and with no torch import: each one's
name, one-line summary (the model card, ``--help``) and whether it learns a model from the trajectory. ``methods``
implements them; every entry point checks a name with ``check_method(s)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from nextrap.core.errors import NextrapError

AUTO = "auto"  # the method (or alpha) the fit's backtest chooses


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    learns: bool = False


REGISTRY: tuple[MethodInfo, ...] = (
    MethodInfo("next", "our NExt variant: the straight line W_c - W_{c-h} with its dominant rank-1 part replaced by "
                       "a predicted one, as far as a held-out pair says it helps", learns=True),
    MethodInfo("next-paper", "NExt as published (Chen et al., arXiv 2604.11446): a learned predictor of the rank-1 "
                             "trajectory, the reference code's settings", learns=True),
    MethodInfo("linear", "linear extrapolation, W_c + alpha (W_c - W_{c-h})"),
    MethodInfo("expo", "extrapolation from the start, W_c + alpha (W_c - W_0)"),
    MethodInfo("relex", "rank-1 linear extrapolation: a straight-line fit of each module's projection on its "
                        "dominant direction"),
)
METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY)
FITTED: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.learns)  # methods that learn a model
SUMMARY: dict[str, str] = {m.name: m.summary for m in REGISTRY}


def check_method(name: str, option: str = "--method", auto: bool = True) -> str:
    """``name`` if it is a method (or ``auto`` where allowed); else the one-line error naming ``option``."""
    if name in METHODS or (auto and name == AUTO):
        return name
    choices = ", ".join(METHODS) + (f" or {AUTO}" if auto else "")
    raise NextrapError(f"{option} {name}: use one of {choices}")


def check_methods(names: Iterable[str], option: str = "--methods") -> tuple[str, ...]:
    """``names`` as a tuple, if it is a non-empty list of methods; else the one-line error naming ``option``."""
    names = tuple(names)
    if not names or any(n not in METHODS for n in names):
        raise NextrapError(f"{option} {','.join(names)}: choose from {', '.join(METHODS)}")
    return names
