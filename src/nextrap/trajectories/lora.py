"""LoRA trajectories behind the ``Trajectory`` interface: a run's PEFT adapters (``checkpoints``), every delta a
product of thin factors, so features, moves and their inner products are exact and streamed by the LoRA
engine (``lorastream``). A move's checkpoint difference becomes a ``LoraMove``, read module by module; the
writers append the move to the adapter (``adapter``) or add it to a base model's weights (``writers.merged``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from nextrap.writers.adapter import write_adapter
from nextrap.engine.budget import chunk_bytes
from nextrap.io.checkpoints import LoraTrajectory, load_trajectory, relative_name
from nextrap.core.errors import NextrapError
from nextrap.io.files import sha256_all
from nextrap.writers.merged import lora_deltas, write_merged
from nextrap.io.hfmodel import DTYPE_BYTES, read_header, weight_map
from nextrap.io.layouts import folder_bytes, trainer_layout, weight_dtypes
from nextrap.engine.lorastream import (LoraMove, explicit_bytes, factor_bytes, feature_bytes, move_rank, move_terms, preflight,
                                       projections)
from nextrap.core.moves import Jump, Terms
from nextrap.core.moves import Factors
from nextrap.runtime.distributed import World, world
from nextrap.trajectories.interface import Layout, Trajectory, Unit, pooled_terms
from nextrap.core.features import Features
from nextrap.engine.lorafeatures import stream_lora_features


@dataclass(eq=False)
class LoraRun(LoraTrajectory, Trajectory):
    """A LoRA trajectory (``checkpoints.LoraTrajectory``) as a ``Trajectory``."""

    feature_batches: int = 0  # units of the last feature pass, for the manifest

    kind = "lora"
    units_label = "LoRA modules"
    checkpoint_text = "LoRA checkpoint"
    formats = {"adapter": "PEFT LoRA adapter (trained rank plus the jump)", "merged": "merged Hugging Face model",
               "base": "base model with the jump folded in (the checkpoint's own adapter resumes on it)"}

    @classmethod
    def open(cls, root: Path | str, budget: int | None, device: str = "cpu") -> "LoraRun":
        """Discover and validate the adapters under ``root`` (headers only)."""
        read = load_trajectory(root)
        return cls(**{**{f.name: getattr(read, f.name) for f in fields(read)}, "budget": budget, "device": device})

    @classmethod
    def reopen(cls, manifest: dict[str, Any]) -> "LoraRun":
        # an older fit recorded no budget: no limit
        return cls.open(manifest["source"], manifest.get("streaming", {}).get("max_memory_bytes"))

    @property
    def units(self) -> list[Unit]:
        return [Unit(m.name, (m.out_features, m.in_features), m.rank) for m in self.modules]

    def folder(self, row: int) -> Path:
        return self.checkpoints[row].path

    def preflight(self, horizon: int, backtest: bool) -> None:
        preflight(self, horizon, self.budget, backtest=backtest)

    def _share(self) -> tuple[World, list[str]]:
        """This rank's modules under torchrun, balanced by their factors' size: the same split for every pass."""
        ranks = world(self.device)
        return ranks, [m.name for m in ranks.mine(self.modules, cost=factor_bytes)]

    def features(self, horizon: int, progress: Callable[[int], None] | None = None, sign_align: bool = False,
                 project: Sequence[int] = ()) -> Features:
        # every rank computes its share of the modules and gets all the rows: the features one process computes; the
        # projections on rows ``project`` stay with the rank that computed them, which ``projections`` asks first
        ranks, mine = self._share()
        features, stats = stream_lora_features(self, horizon, sign_align=sign_align, budget=self.budget, progress=progress,
                                               device=self.device, max_batch=None, names=mine, project=project)
        self.feature_batches = stats.batches
        return replace(features, tensors=ranks.merge(features.tensors))

    def terms(self, moves: Mapping[str, Jump], from_row: int, to_row: int) -> tuple[dict[str, Terms], float]:
        factors = {m: self.move_factors(j) for m, j in moves.items()}
        ranks, mine = self._share()
        per_module, _ = move_terms(self, factors, from_row, to_row, self.budget, mine)
        return pooled_terms(per_module, [m.name for m in self.modules], moves, ranks)

    def projections(self, directions: dict[str, Factors], rows: list[int]) -> dict[str, torch.Tensor]:
        ranks, mine = self._share()  # the features' split: a rank's feature pass projected its own modules
        merged = ranks.merge(projections(self, directions, rows, self.budget, [n for n in mine if n in directions]))
        return {n: merged[n] for n in directions}  # the directions' order, whichever rank computed which

    @property
    def exact_checks(self) -> bool:
        return True  # a pass reads thin factors only

    def move_factors(self, j: Jump) -> Mapping[str, Factors]:
        """Explicit factors as they are; a checkpoint difference as a ``LoraMove`` (exact, read per module)."""
        if j.difference is None:
            return j.factors
        row, ref = j.difference
        return LoraMove(self, row, ref, dict(j.factors), j.keep)

    def output_format(self, fmt: str, base: Path | None) -> str:
        if fmt in ("merged", "base") and base is None:
            raise NextrapError(f"--format {fmt} needs --base (the Hugging Face model folder the adapters were trained on)")
        return fmt

    def write(self, out: Path, fmt: str, row: int, j: Jump, alpha: float, base: Path | None, max_shard_bytes: int,
              ranks: World = World()) -> None:
        move = replace(j, factors=self.move_factors(j))
        self._check_write_budget(move, fmt, base)
        if fmt == "adapter":
            if ranks.is_main:  # one small file: rank 0 writes it
                write_adapter(out, self, row, move, alpha)
            return
        trained = fmt == "merged"
        extra = {relative_name(k): v for k, v in self.read_extra(row).items()} if trained else None  # modules_to_save
        write_merged(out, base, lora_deltas(self, row, move, alpha, trained=trained), max_shard_bytes, extra,
                     self.checkpoints[row].weights, ranks)

    def _check_write_budget(self, move: Jump, fmt: str, base: Path | None) -> None:
        """Writing holds the fit's features, the move's explicit factors and one module's tensors at a time, and
        extend's prediction beside it one module's float32 factors (two checkpoints', their differences, the
        move's P and Q): refuse up front, naming the module, when that exceeds the fit's --max-memory."""
        if self.budget is None:
            return
        predicting = max(4 * (m.out_features + m.in_features) * (3 * m.rank + move_rank(move.factors, m.name))
                         for m in self.modules)
        held = feature_bytes(self) + explicit_bytes(move.factors) + predicting
        weights = read_header(set(weight_map(base).values())) if fmt == "merged" and base is not None else {}
        for m in self.modules:
            k, width = move_rank(move.factors, m.name), m.out_features + m.in_features
            # two checkpoints' factors, the move's (P, Q), the jumped ones, their cast, and the adapter writer's module
            # before this one, still being written (``write_safetensors(overlap=True)``; merged formats write one
            # tensor at a time, so this counts one module more than they hold)
            need = 8 * width * (5 * m.rank + 4 * k)
            if m.base_key in weights:
                shape, dtype = weights[m.base_key]
                rows = (shape[0], math.prod(shape[1:]))
                need += 2 * DTYPE_BYTES.get(dtype, 8) * math.prod(shape) + chunk_bytes(rows, self.budget)
            if held + need > self.budget:
                raise NextrapError(f"writing LoRA module {m.name} needs {need / 1e6:.3g} MB beside {held / 1e6:.3g} MB of "
                                   f"features and moves, more than the fit's --max-memory {self.budget / 1e6:.3g} MB; refit "
                                   "with a larger --max-memory")

    def inputs(self, workers: int = 1) -> list[dict[str, Any]]:
        """Every adapter's config and weights: size, sha256 (provenance), and the modification time with the moment
        it was seen, which lets ``extend`` skip hashing a file whose size and time are unchanged."""
        paths = [f for c in self.checkpoints for f in (c.path / "adapter_config.json", c.weights)]
        seen = [(time.time_ns(), f.stat()) for f in paths]
        digests = dict(zip(paths, sha256_all(paths, workers)))
        records = {f: {"name": f.name, "bytes": st.st_size, "sha256": digests[f], "mtime_ns": st.st_mtime_ns, "seen_ns": t}
                   for f, (t, st) in zip(paths, seen)}
        return [{"step": c.step, "path": str(c.path.absolute()),
                 "files": [records[c.path / "adapter_config.json"], records[c.weights]]} for c in self.checkpoints]

    def report(self) -> dict[str, Any]:
        # the budget extend's writers keep, and the highest memory any streamed pass accounted
        return {"max_memory_bytes": self.budget, "peak_bytes": self.peak, "feature_batches": self.feature_batches}

    def layout(self) -> Layout:
        weights = [c.weights for c in self.checkpoints]
        return Layout("peft-lora", trainer_layout(self.root, self.checkpoints), weight_dtypes(weights),
                      sum(folder_bytes(c.path) for c in self.checkpoints), sum(w.stat().st_size for w in weights),
                      "LoRA modules", "adapter")
