"""Full-parameter mode glue for ``fit`` and ``extend``: input fingerprints, the streamed backtest measure,
and the jumped model folder (W_c + alpha * move, sharded the Hugging Face way)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .backtest import Measure, Terms
from .budget import DEFAULT_MAX_MEMORY
from .fullparam import FullTrajectory, load_full_trajectory
from .errors import NextrapError
from .hfmodel import DTYPE_BYTES, INDEX, copy_model_files, parse_size, read_header, write_sharded
from .methods import Jump
from .fullmoves import factor_bytes, jumped_bytes, jumped_tensor, move_terms, preflight
from .streaming import StreamStats, compute_full_features, feature_bytes, heap_hygiene
from .trajectory import Features

def _files(folder: Path, files: set[Path]) -> list[dict[str, Any]]:
    # Size and mtime, not sha256: hashing every checkpoint of a full model (tens of GB) at fit and again at
    # extend would cost more than the fit itself.
    paths = sorted(files | ({folder / INDEX} if (folder / INDEX).is_file() else set()))
    return [{"name": str(p.relative_to(folder)), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]


def full_inputs(traj: FullTrajectory) -> list[dict[str, Any]]:
    """Per checkpoint (and the base, step null): path and weight files with sizes and modification times."""
    out = [{"step": None, "path": str(traj.base.absolute()), "files": _files(traj.base, set(traj.base_files.values()))}]
    for c in traj.checkpoints:
        out.append({"step": c.step, "path": str(c.path.absolute()), "files": _files(c.path, set(c.files.values()))})
    return out


def reopen(manifest: dict[str, Any]) -> FullTrajectory:
    """The fitted trajectory re-opened from a fit manifest, with the fit's memory budget for later passes."""
    traj = load_full_trajectory(manifest["source"], manifest["base"])
    traj.budget = manifest.get("streaming", {}).get("max_memory_bytes")
    return traj


def streamed_measure(traj: FullTrajectory, budget: int | None, device: str, stats: list[StreamStats]) -> Measure:
    """The backtest's terms computed by streaming the checkpoints (each pass's stats appended to ``stats``)."""
    def measure(jumps: dict[str, Jump], from_row: int, to_row: int) -> tuple[dict[str, Terms], float]:
        terms, t, st = move_terms(traj, jumps, from_row, to_row, budget=budget, device=device)
        stats.append(st)
        return terms, t
    return measure


def write_full_merged(out: Path, traj: FullTrajectory, row: int, j: Jump, alpha: float, max_shard_bytes: int) -> dict[str, Any]:
    """Write checkpoint ``row`` + alpha * move as a Hugging Face model folder, one tensor read at a time; every
    tensor without a move, and the config and tokenizer files, come from checkpoint ``row``."""
    ckpt = traj.checkpoints[row]
    info = read_header(set(ckpt.files.values()))
    _check_extend_budget(traj, info, j, ckpt.files)
    heap_hygiene()
    shards, total = write_sharded(out, info, lambda keys: ((k, jumped_tensor(traj, j, row, k, alpha)) for k in keys), max_shard_bytes)
    copy_model_files(ckpt.path, out)
    return {"shards": shards, "total_bytes": total, "modules_merged": len(traj.params)}


def _check_extend_budget(traj: FullTrajectory, info: dict[str, tuple[list[int], str]], j: Jump, files: dict[str, Path]) -> None:
    """Writing holds the features, the move's factors and one jumped tensor (shards are written tensor by tensor):
    refuse up front when that exceeds the fit's --max-memory."""
    if traj.budget is None:
        return
    held = feature_bytes(traj) + factor_bytes({j.method: j})
    need, name = jumped_bytes(traj, {k: DTYPE_BYTES.get(dtype, 8) for k, (_, dtype) in info.items()}, traj.budget)
    if held + need > traj.budget:
        raise NextrapError(f"{files[name]}: jumping {name} needs {need / 1e6:.3g} MB beside "
                           f"{held / 1e6:.3g} MB of features and moves, more than the fit's --max-memory "
                           f"{traj.budget / 1e6:.3g} MB; refit with a larger --max-memory")


@dataclass
class FullFit:
    """What ``fit`` needs from a full-parameter trajectory: features, fingerprints, the streamed backtest."""

    trajectory: FullTrajectory
    inputs: list[dict[str, Any]]
    features: Features
    measure: Measure
    budget: int
    svd: str
    stats: list[StreamStats] = field(default_factory=list)  # the feature pass, then each backtest pass

    def manifest(self) -> dict[str, Any]:
        """The manifest fields of a full fit: kind, base, and what the streaming measured."""
        first = self.stats[0]
        return {"kind": "full", "base": str(self.trajectory.base.absolute()),
                "streaming": {"svd": self.svd, "max_memory_bytes": self.budget,
                              "peak_bytes": max(s.peak for s in self.stats), "feature_batches": first.batches,
                              "sigma_rel_error_max": first.sigma_error_max, "passes": len(self.stats),
                              # fast: sigma_1 over the sum of the 16 Ritz values, an upper bound of the true energy
                              "energy": "upper bound" if self.svd == "fast" else "exact"}}


def prepare_full(ckpts: Path | str, base: Path | str, horizon: int, svd: str = "exact", max_memory: str | None = None,
                 device: str = "cpu", progress: Callable[[str, int, int], None] | None = None,
                 backtest: bool = True) -> FullFit:
    """Read and fingerprint a full-parameter trajectory and stream its rank-1 features under ``max_memory``
    (every later pass, the ``backtest``'s included, is checked against the budget first)."""
    budget = parse_size(max_memory or DEFAULT_MAX_MEMORY)
    traj = load_full_trajectory(ckpts, base)
    traj.budget, traj.device = budget, device
    inputs = full_inputs(traj)
    preflight(traj, budget, svd, backtest)
    done = 0

    def on_params(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress("rank-1 features", done, len(traj.params))

    # Stored as the SVD gives them, as for LoRA fits: methods that align signs do it on the fly.
    features, stats = compute_full_features(traj, horizon, svd=svd, budget=budget, device=device, sign_align=False,
                                            progress=on_params)
    collected = [stats]
    return FullFit(traj, inputs, features, streamed_measure(traj, budget, device, collected), budget, svd, collected)
