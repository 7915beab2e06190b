"""The value types every layer passes around: a predicted move (``Jump``) and the backtest's three numbers for
one (``Terms``). They sit at the bottom of the package so that readers, streamed passes, methods, the backtest
and the writers can all use them without importing each other."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (P [m, k], Q [n, k]): the move P @ Q^T
ALPHA_MAX = 4.0  # the paper tested 0.5..4.0 and saw overshoot beyond ~2.5


@dataclass
class Jump:
    """The move: per module thin factors (P [m, k], Q [n, k]) with delta = P @ Q.T, plus W_row - W_ref when
    ``difference`` = (row, ref) is set (ref None = the base model), read by the trajectory
    (``trajectories.interface.Trajectory``); ``keep``: the modules the move is made for (None: all), the others' is zero.
    ``sigma``: a size per module, for reports."""

    method: str
    factors: Mapping[str, Factors]
    sigma: dict[str, float]
    difference: tuple[int, int | None] | None = None
    keep: frozenset[str] | None = None


@dataclass
class Terms:
    """Pooled squared norms: t = ||true move||^2, c = <true move, predicted move>, j = ||predicted move||^2."""

    t: float = 0.0
    c: float = 0.0
    j: float = 0.0

    def __iadd__(self, other: "Terms") -> "Terms":
        self.t, self.c, self.j = self.t + other.t, self.c + other.c, self.j + other.j
        return self

    def error(self, alpha: float) -> float:
        if self.t == 0:
            return 0.0 if alpha * self.j == 0 else math.inf
        return math.sqrt(max(1 - 2 * alpha * self.c / self.t + alpha**2 * self.j / self.t, 0.0))

    def cosine(self) -> float:
        return self.c / math.sqrt(self.t * self.j) if self.t > 0 and self.j > 0 else 0.0

    def best_alpha(self, alpha_max: float = ALPHA_MAX) -> float:
        return round(min(max(self.c / self.j, 0.0), alpha_max), 3) if self.j > 0 else 0.0
