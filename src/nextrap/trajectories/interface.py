"""The one interface every trajectory implements: what fit, extend, inspect, the methods and the backtest ask of
a run's saved checkpoints, whatever kind they are. Two implementations sit above it: ``lora.LoraRun`` (PEFT
adapters, every delta exact in thin factors) and ``full.FullRun`` (Hugging Face model folders against their
base, streamed tensor by tensor); ``opening.open_trajectory`` tells from a folder which one it holds.

Rows are checkpoints in step order; W_row is checkpoint row's weights and the base model is W_0 (row None or
negative). A move is a ``Jump``: explicit thin factors per module plus, optionally, the symbolic checkpoint
difference W_row - W_ref (``difference``), which each implementation reads its own way; ``keep`` leaves a
difference's move to some modules only. Nothing outside the two implementations asks which kind it holds:
``kind`` is for reports and the manifest.

Under ``torchrun`` every streamed pass (features, terms, projections) splits its units across the ranks
(``runtime.distributed``): each rank computes its share, and every rank gets all the results, the same floats as
one process: per-unit results are gathered, and the sums over units are added in the units' order
(``pooled_terms``), whichever rank computed which unit. ``write`` writes a rank's share of the output shards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from nextrap.core.moves import Factors, Jump, Terms
from nextrap.core.features import Features
from nextrap.runtime.distributed import World

Inner = Mapping[tuple[str, str], float]  # one unit's <X, Y> per pair of moves; "" is the true move W_to - W_from


def pooled_terms(per_unit: Mapping[str, Inner], order: Sequence[str], moves: Iterable[str],
                 ranks: World) -> tuple[dict[str, Terms], float]:
    """Per move (t, c, j) and t from every rank's per-unit inner products, summed in ``order`` (all the units, in
    the features' order) on every rank (``World.total``): the same floats however the units were split."""
    totals = ranks.total(per_unit, order)
    t = totals.get(("", ""), 0.0)
    return {m: Terms(t, totals.get(("", m), 0.0), totals.get((m, m), 0.0)) for m in moves}, t


@dataclass(frozen=True)
class Unit:
    """One module (LoRA) or parameter (full) whose deltas are featurised, for reports and shape checks."""

    name: str
    shape: tuple[int, int]  # the [m, n] matrix its deltas are decomposed as ([numel, 1] for a vector)
    rank: int | None = None  # the LoRA rank; None for a full parameter
    vector: bool = False  # a 1-D parameter: its delta is kept as a raw vector, not decomposed


@dataclass(frozen=True)
class Layout:
    """What ``inspect`` reports about the folders themselves."""

    layout: str  # e.g. peft-lora, hf-full
    trainer: str  # the trainer whose folder names (or files) these are
    dtypes: list[str]
    size_bytes: int  # every file in the checkpoint folders
    weights_bytes: int  # their weights files alone
    units_label: str  # how reports name the matrices inspect lists
    weights_label: str  # what the weights files hold (adapter, model)


class Trajectory(ABC):
    """A run's checkpoints behind one interface (see the module's docstring)."""

    kind: str  # "lora" | "full": reports and the manifest only
    units_label: str  # how reports name ``units``
    checkpoint_text: str  # how a model card names one of its checkpoints
    formats: dict[str, str]  # the ``extend --format`` outputs it writes, each with how a model card names it
    root: Path
    budget: int | None  # --max-memory in bytes for every streamed pass (None: unlimited)
    device: str

    @property
    @abstractmethod
    def steps(self) -> list[int]:
        """The checkpoints' steps, in row order."""

    @property
    @abstractmethod
    def units(self) -> list[Unit]:
        """What the features hold one entry per, in the features' order."""

    @abstractmethod
    def folder(self, row: int) -> Path:
        """Checkpoint ``row``'s folder."""

    @abstractmethod
    def preflight(self, horizon: int, backtest: bool) -> None:
        """Raise now, before anything is read, when some pass a fit runs cannot fit the budget."""

    @abstractmethod
    def features(self, horizon: int, progress: Callable[[int], None] | None = None, sign_align: bool = False,
                 project: Sequence[int] = ()) -> Features:
        """Rank-1 features of every unit's global, local and target deltas, streamed under ``budget``;
        ``progress(k)`` after each k units. ``project``: rows whose global directions ``projections`` will be
        asked for (the backtest folds' starts, for relex): computed in this pass, and answered from memory."""

    @abstractmethod
    def terms(self, moves: Mapping[str, Jump], from_row: int, to_row: int) -> tuple[dict[str, Terms], float]:
        """Per move (t, c, j) against the true W_to - W_from, and t = ||W_to - W_from||^2, in one pass."""

    @abstractmethod
    def projections(self, directions: dict[str, Factors], rows: list[int]) -> dict[str, torch.Tensor]:
        """a_i = u^T (W_i - W_0) v per matrix unit in ``directions`` ((u, v)) and row i in ``rows``: from memory where
        the feature pass projected on those directions (``features``' ``project``), else streamed."""

    @property
    @abstractmethod
    def exact_checks(self) -> bool:
        """Whether a method may afford passes of its own (``terms``) to check itself on the true moves, or must
        judge from the stored rank-1 features."""

    @abstractmethod
    def move_factors(self, j: Jump) -> Mapping[str, Factors] | None:
        """The move as thin factors per module (read when asked for), or None when it is never held that way."""

    @abstractmethod
    def output_format(self, fmt: str, base: Path | None) -> str:
        """What ``extend --format fmt`` (with ``--base``) writes from this trajectory; a NextrapError when it cannot."""

    def output_base(self, base: Path | None) -> Path | None:
        """The base model ``extend`` writes on and records (nextrap.json's ``base``): ``--base`` as given, by
        default; a NextrapError when it cannot be the one."""
        return base

    @abstractmethod
    def write(self, out: Path, fmt: str, row: int, j: Jump, alpha: float, base: Path | None, max_shard_bytes: int,
              ranks: World = World()) -> None:
        """Write W_row + alpha * move (``fmt`` as ``output_format`` gave it; base: W_0 + alpha * move) into ``out``;
        with several ``ranks`` (all writing into the same ``out``) this rank's share of the shards, rank 0 the rest."""

    @abstractmethod
    def inputs(self, workers: int = 1) -> list[dict[str, Any]]:
        """Per checkpoint the folder and its files' fingerprints, for the manifest (``fit.check_inputs``), taken
        on up to ``workers`` threads."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """What the streamed passes measured (budget, peak, ...): the manifest's ``streaming``."""

    @abstractmethod
    def layout(self) -> Layout:
        """The facts ``inspect`` reports about the folders."""

    @classmethod
    @abstractmethod
    def reopen(cls, manifest: dict[str, Any]) -> "Trajectory":
        """The trajectory a fit manifest was fitted on, with the fit's memory budget for later passes."""

    @classmethod
    def manifest_problem(cls, manifest: dict[str, Any]) -> str | None:
        """What makes a fit manifest of this kind unreadable, if anything."""
        return None

    def manifest(self) -> dict[str, Any]:
        """The manifest's fields about the trajectory."""
        return {"kind": self.kind, "streaming": self.report()}

    def difference(self, row: int, ref: int | None, method: str) -> Jump:
        """The exact move W_row - W_ref (ref None: the base model), kept symbolic: each implementation reads it."""
        return Jump(method, {}, {}, difference=(row, ref))

    def only(self, j: Jump, keep: set[str]) -> Jump:
        """The same move with a zero move (of the same rank) for the modules outside ``keep``."""
        sigma = {n: s if n in keep else 0.0 for n, s in j.sigma.items()}
        if j.difference is not None:
            return replace(j, sigma=sigma, keep=frozenset(keep) if j.keep is None else j.keep & frozenset(keep))
        factors = {n: (p, q) if n in keep else (torch.zeros_like(p), torch.zeros_like(q)) for n, (p, q) in j.factors.items()}
        return replace(j, factors=factors, sigma=sigma)
