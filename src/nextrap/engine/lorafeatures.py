"""The LoRA feature pass: the rank-1 ``Features`` (``core.features``) of every module's global, local and target
deltas. Each is a thin product of LoRA factors, so its top singular triple is exact and cheap (``lowrank``); the
checkpoints are streamed unit by unit under a memory budget, each read once (a backtest fold's start twice, when
relex's projections are computed on the way: ``lorastream.stream_features``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from nextrap.engine.budget import DEFAULT_MAX_MEMORY, StreamStats, parse_size
from nextrap.io.checkpoints import LoraTrajectory, require_checkpoints
from nextrap.engine.lorastream import stream_features
from nextrap.core.features import Features
from nextrap.core.lowrank import align_signs

Progress = Callable[[int], None]  # called with the number of modules just finished
DEFAULT_BUDGET = parse_size(DEFAULT_MAX_MEMORY)


def pair_factors(b_new: torch.Tensor, a_new: torch.Tensor, b_old: torch.Tensor | None, a_old: torch.Tensor | None,
                 scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors (P, Q) of s * (B_new A_new - B_old A_old) (or of s * B_new A_new when old is None), batched."""
    s = scale.reshape(-1, *([1] * (b_new.dim() - 1)))
    if b_old is None:
        return s * b_new, a_new.mT
    return torch.cat([s * b_new, -s * b_old], -1), torch.cat([a_new.mT, a_old.mT], -1)


def compute_features(traj: LoraTrajectory, horizon: int, sign_align: bool = True, chunk_modules: int = 64,
                     progress: Progress | None = None, device: str = "cpu", budget: int | None = DEFAULT_BUDGET) -> Features:
    """Exact rank-1 features of every module, streamed in batches of at most ``chunk_modules`` modules of equal
    shape under ``budget`` bytes (``lorastream``; the math on ``device``)."""
    return stream_lora_features(traj, horizon, sign_align, budget, progress, device, chunk_modules)[0]


def stream_lora_features(traj: LoraTrajectory, horizon: int, sign_align: bool = True, budget: int | None = DEFAULT_BUDGET,
                         progress: Progress | None = None, device: str = "cpu",
                         max_batch: int | None = 64, names: list[str] | None = None,
                         project: Sequence[int] = ()) -> tuple[Features, StreamStats]:
    """``compute_features`` and what its pass measured (accounted peak, batches, reads); ``names``: the features
    of these modules only (a rank's share under torchrun, ``LoraRun.features``); ``project``: rows whose global
    directions relex's projections are computed on in the same pass (``lorastream.stream_features``)."""
    n = len(traj.checkpoints)
    require_checkpoints(traj.root, [c.path for c in traj.checkpoints], horizon)
    tensors: dict[str, torch.Tensor] = {}

    def sink(names: list[str], kind: str, parts: dict[str, torch.Tensor]) -> None:
        if sign_align:
            parts["u"], parts["v"] = align_signs(parts["u"], parts["v"])
        store_rows(tensors, names, kind, parts, n)

    stats = stream_features(traj, horizon, sink, budget, device, progress, max_batch, names, project)
    return Features(traj.steps, horizon, sign_align, [m.name for m in traj.modules], tensors), stats


def store_rows(tensors: dict[str, torch.Tensor], names: list[str], kind: str, parts: dict[str, torch.Tensor], n_rows: int) -> None:
    """Write ``parts`` ([modules, rows, ...] each) as ``{name}:{kind}:{part}`` float32 tensors of ``n_rows``
    rows, the rows past the computed ones NaN (targets without a future)."""
    for part, t in parts.items():
        for j, name in enumerate(names):
            full = torch.full((n_rows, *t.shape[2:]), float("nan"), dtype=torch.float32)
            full[:t.shape[1]] = t[j].to(torch.float32)
            tensors[f"{name}:{kind}:{part}"] = full
