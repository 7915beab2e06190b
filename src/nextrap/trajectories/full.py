"""Full-parameter trajectories behind the ``Trajectory`` interface: one Hugging Face model folder per step read
against its base model (``fullparam``), streamed tensor by tensor under the memory budget by the full engine
(``engine.fullstream`` for the features, ``fullmoves`` for moves). A checkpoint difference is never formed whole: it is
read row chunk by row chunk where a pass or the writer needs it, so it cannot be held as thin factors."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from nextrap.core.errors import NextrapError
from nextrap.engine.fullmoves import factor_bytes, jumped_bytes, jumped_tensor, move_terms, preflight, projections
from nextrap.io.fullparam import FullTrajectory, load_full_trajectory
from nextrap.writers.merged import copy_model_files, write_sharded
from nextrap.io.hfmodel import DTYPE_BYTES, INDEX, read_header
from nextrap.io.layouts import folder_bytes, trainer_layout, weight_dtypes
from nextrap.core.moves import Jump, Terms
from nextrap.core.moves import Factors
from nextrap.runtime.distributed import World, world
from nextrap.trajectories.interface import Layout, Trajectory, Unit, pooled_terms
from nextrap.engine.fullstream import StreamStats, compute_full_features, feature_bytes, heap_hygiene
from nextrap.core.features import Features


@dataclass(eq=False)
class FullRun(FullTrajectory, Trajectory):
    """A full-parameter trajectory (``fullparam.FullTrajectory``) as a ``Trajectory``."""

    svd: str = "exact"  # the feature pass's top-1 SVD: exact or fast (randomized, with an error bound)
    stats: list[StreamStats] = field(default_factory=list)  # the feature pass, then each later pass

    kind = "full"
    units_label = "parameters"
    checkpoint_text = "full-parameter checkpoint"
    formats = {"merged": "merged full-parameter model (Hugging Face)"}

    @classmethod
    def open(cls, root: Path | str, base: Path | str, budget: int | None, device: str = "cpu", svd: str = "exact") -> "FullRun":
        """Discover and validate the model folders under ``root`` against ``base`` (headers only)."""
        read = load_full_trajectory(root, base)
        return cls(**{**{f.name: getattr(read, f.name) for f in fields(read)}, "budget": budget, "device": device, "svd": svd})

    @classmethod
    def reopen(cls, manifest: dict[str, Any]) -> "FullRun":
        return cls.open(manifest["source"], manifest["base"], manifest.get("streaming", {}).get("max_memory_bytes"))

    @classmethod
    def manifest_problem(cls, manifest: dict[str, Any]) -> str | None:
        return None if isinstance(manifest.get("base"), str) else "a full-parameter fit without base"

    def manifest(self) -> dict[str, Any]:
        return {**super().manifest(), "base": str(self.base.absolute())}

    @property
    def units(self) -> list[Unit]:
        return [Unit(p.name, p.matrix_shape, None, p.is_vector) for p in self.params]

    def folder(self, row: int) -> Path:
        return self.checkpoints[row].path

    def preflight(self, horizon: int, backtest: bool) -> None:
        preflight(self, self.budget, self.svd, backtest)

    def _share(self) -> tuple[World, list[str]]:
        """This rank's parameters under torchrun, balanced by their size: the same split for every pass."""
        ranks = world(self.device)
        return ranks, [p.name for p in ranks.mine(self.params, cost=lambda p: p.numel)]

    def features(self, horizon: int, progress: Callable[[int], None] | None = None, sign_align: bool = False,
                 project: Sequence[int] = ()) -> Features:
        # every rank computes its share of the parameters and gets all the rows: the features one process computes
        ranks, mine = self._share()
        features, stats = compute_full_features(self, horizon, svd=self.svd, budget=self.budget, device=self.device,
                                                sign_align=sign_align, progress=progress, names=mine, project=project)
        stats.sigma_error_max = max(ranks.gather(stats.sigma_error_max))
        self.stats = [stats]
        return replace(features, tensors=ranks.merge(features.tensors))

    def terms(self, moves: Mapping[str, Jump], from_row: int, to_row: int) -> tuple[dict[str, Terms], float]:
        ranks, mine = self._share()
        per_param, stats = move_terms(self, dict(moves), from_row, to_row, budget=self.budget, device=self.device, names=mine)
        self.stats.append(stats)
        return pooled_terms(per_param, [p.name for p in self.params], moves, ranks)

    def projections(self, directions: dict[str, Factors], rows: list[int]) -> dict[str, torch.Tensor]:
        ranks, mine = self._share()  # the features' split: a rank's feature pass projected its own parameters
        merged = ranks.merge(projections(self, directions, rows, self.budget, [n for n in mine if n in directions]))
        return {n: merged[n] for n in directions if n in merged}  # the directions' order (1-D parameters have none)

    @property
    def exact_checks(self) -> bool:
        return False  # a pass reads whole models: methods judge from the stored rank-1 features

    def move_factors(self, j: Jump) -> Mapping[str, Factors] | None:
        return None if j.difference is not None else j.factors

    def only(self, j: Jump, keep: set[str]) -> Jump:
        if j.difference is not None:  # a checkpoint difference is read whole per tensor, never dropped per module
            raise ValueError("--min-energy needs a method whose move is explicit per module (not a full-parameter difference)")
        return super().only(j, keep)

    def output_format(self, fmt: str, base: Path | None) -> str:
        if fmt == "base":
            raise NextrapError("--format base folds the jump under a LoRA adapter; a full-parameter fit has none: its "
                               "--format merged output already is the jumped model")
        return "merged"  # the jumped model itself, from checkpoint c: there is no adapter to write

    def output_base(self, base: Path | None) -> Path:
        """The base the fit read the checkpoints against: a --base that is another folder is refused."""
        if base is not None and base.resolve() != self.base.resolve():
            raise NextrapError(f"--base {base}: this full-parameter fit was fitted against the base {self.base}; "
                               "leave --base out (the fit's base is used) or give that folder")
        return self.base

    def write(self, out: Path, fmt: str, row: int, j: Jump, alpha: float, base: Path | None, max_shard_bytes: int,
              ranks: World = World()) -> None:
        """Checkpoint ``row`` + alpha * move as a Hugging Face model folder, one tensor read at a time; every tensor
        without a move, and the config and tokenizer files, come from checkpoint ``row``."""
        ckpt = self.checkpoints[row]
        info = read_header(set(ckpt.files.values()))
        self._check_write_budget(info, j, ckpt.files)
        heap_hygiene()
        write_sharded(out, info, lambda keys: ((k, jumped_tensor(self, j, row, k, alpha)) for k in keys), max_shard_bytes,
                      ranks)
        if ranks.is_main:
            copy_model_files(ckpt.path, out)

    def _check_write_budget(self, info: dict[str, tuple[list[int], str]], j: Jump, files: dict[str, Path]) -> None:
        """Writing holds the features, the move's factors and one jumped tensor (shards are written tensor by
        tensor): refuse up front when that exceeds the fit's --max-memory."""
        if self.budget is None:
            return
        held = feature_bytes(self) + factor_bytes({j.method: j})
        need, name = jumped_bytes(self, {k: DTYPE_BYTES.get(dtype, 8) for k, (_, dtype) in info.items()}, self.budget)
        if held + need > self.budget:
            raise NextrapError(f"{files[name]}: jumping {name} needs {need / 1e6:.3g} MB beside "
                               f"{held / 1e6:.3g} MB of features and moves, more than the fit's --max-memory "
                               f"{self.budget / 1e6:.3g} MB; refit with a larger --max-memory")

    def inputs(self, workers: int = 1) -> list[dict[str, Any]]:
        """Per checkpoint (and the base, step null): path and weight files with sizes and modification times."""
        out = [{"step": None, "path": str(self.base.absolute()), "files": _files(self.base, set(self.base_files.values()))}]
        for c in self.checkpoints:
            out.append({"step": c.step, "path": str(c.path.absolute()), "files": _files(c.path, set(c.files.values()))})
        return out

    def report(self) -> dict[str, Any]:
        first = self.stats[0] if self.stats else StreamStats(self.budget, svd=self.svd)
        return {"svd": self.svd, "max_memory_bytes": self.budget, "peak_bytes": max(s.peak for s in self.stats or [first]),
                "feature_batches": first.batches, "sigma_rel_error_max": first.sigma_error_max, "passes": len(self.stats),
                # fast: sigma_1 over the sum of the 16 Ritz values, an upper bound of the true energy
                "energy": "upper bound" if self.svd == "fast" else "exact"}

    def layout(self) -> Layout:
        files = sorted({f for c in self.checkpoints for f in c.files.values()})
        return Layout("hf-full", trainer_layout(self.root, self.checkpoints, default="hf"), weight_dtypes(files),
                      sum(folder_bytes(c.path) for c in self.checkpoints), sum(f.stat().st_size for f in files),
                      "weight matrices", "model")


def _files(folder: Path, files: set[Path]) -> list[dict[str, Any]]:
    # Size and mtime, not sha256: hashing every checkpoint of a full model (tens of GB) at fit and again at
    # extend would cost more than the fit itself.
    paths = sorted(files | ({folder / INDEX} if (folder / INDEX).is_file() else set()))
    return [{"name": str(p.relative_to(folder)), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
