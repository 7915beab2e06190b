"""Opening a trajectory: which implementation of ``interface.Trajectory`` a folder needs. PEFT adapters are a LoRA
run (``lora``); Hugging Face model folders read against the model they started from (``--base``) are a
full-parameter run (``full``). A fit's manifest names its kind, so that ``extend`` reopens the same one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nextrap.engine.budget import DEFAULT_MAX_MEMORY, device_budget, parse_size
from nextrap.io.checkpoints import find_folders, is_adapter
from nextrap.core.errors import NextrapError
from nextrap.trajectories.full import FullRun
from nextrap.io.fullparam import is_model
from nextrap.trajectories.lora import LoraRun
from nextrap.trajectories.interface import Trajectory

KINDS: dict[str, type[Trajectory]] = {"lora": LoraRun, "full": FullRun}  # the manifest's "kind" -> its reader


def _holds(root: Path, is_checkpoint: Any) -> bool:
    return root.is_dir() and bool(find_folders(root, is_checkpoint))


def open_trajectory(ckpts: Path | str, base: Path | str | None = None, max_memory: str | None = None,
                    device: str = "cpu", svd: str = "exact", max_gpu_memory: str | None = None) -> Trajectory:
    """The trajectory under ``ckpts`` (headers only read), streamed under ``max_memory`` (default 8GB) and, on a
    GPU, ``max_gpu_memory`` (default 90% of its free memory) with its math on ``device``: PEFT adapters, or with
    ``base`` Hugging Face model folders (``svd``: their feature pass's top-1 SVD, exact or fast). A folder of the
    other kind is refused with what to do instead."""
    root = Path(ckpts)
    budget = device_budget(parse_size(max_memory or DEFAULT_MAX_MEMORY, "--max-memory"), device,
                           None if max_gpu_memory is None else parse_size(max_gpu_memory, "--max-gpu-memory"),
                           lambda: torch.cuda.mem_get_info(torch.device(device))[0])
    if base is None:
        if not _holds(root, is_adapter) and _holds(root, is_model):
            raise NextrapError(f"{root}: holds Hugging Face model folders, not PEFT adapters; pass --base (the model "
                               "they started from) to read them as a full-parameter trajectory")
        return LoraRun.open(root, budget, device)
    if _holds(root, is_adapter):
        raise NextrapError(f"{root}: holds PEFT adapters; --base is for full-parameter checkpoints (LoRA runs are read "
                           "without it)")
    return FullRun.open(root, base, budget, device, svd)


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a fit manifest's trajectory fields unreadable, if anything (``reopen`` needs none)."""
    kind = manifest.get("kind", "lora")  # fits from before full-parameter support name no kind
    return f"kind {kind!r} is not one of {', '.join(KINDS)}" if kind not in KINDS else KINDS[kind].manifest_problem(manifest)


def reopen(manifest: dict[str, Any]) -> Trajectory:
    """The trajectory a fit was fitted on (its kind and source from a manifest ``manifest_problem`` passed), with
    the fit's budget."""
    return KINDS[manifest.get("kind", "lora")].reopen(manifest)
