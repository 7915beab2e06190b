"""Full-parameter checkpoints: one Hugging Face model folder per saved step, read lazily, one tensor at a time.

Layouts: plain model folders (``model.safetensors`` or sharded with ``model.safetensors.index.json``, any float
dtype) named ``checkpoint-N``, ``step_N``, ``N`` ... (see ``checkpoints.step_from_path``), and verl's
``global_step_N/actor/huggingface`` with ``latest_checkpointed_iteration.txt`` at the root (saves after that
iteration are still being written and are left out). Only headers are read up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nextrap.io.checkpoints import find_folders, open_weights, read_tensor, step_folders
from nextrap.io.tensorfile import FLOAT_DTYPES
from nextrap.core.errors import NextrapError
from nextrap.io.hfmodel import INDEX, SINGLE, read_header, weight_map


@dataclass(frozen=True)
class Param:
    """A float parameter that moves in the trajectory: 2-D+ ones are decomposed as [shape[0], rest] matrices,
    1-D ones are kept as raw vectors."""

    name: str
    shape: tuple[int, ...]

    @property
    def is_vector(self) -> bool:
        # [1, d] and [d, 1] too: their delta is one vector, exactly (an SVD would give sigma times a unit vector
        # and a sign). The reference code decomposes them instead; its u or v of length 1 joins the sigmas' group
        return len(self.shape) == 1 or (len(self.shape) == 2 and 1 in self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.numel, 1) if self.is_vector else (self.shape[0], math.prod(self.shape[1:]))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FullCheckpoint:
    step: int
    path: Path
    files: dict[str, Path]  # tensor name -> safetensors file


@dataclass
class FullTrajectory:
    """Full checkpoints sorted by step, plus the base model W_0; row -1 means the base."""

    root: Path
    base: Path
    base_files: dict[str, Path]
    checkpoints: list[FullCheckpoint]
    params: list[Param]  # the parameters whose deltas are featurised, in the base's order
    skipped: list[str]  # tensors carried over unchanged (integer buffers, scalars)
    budget: int | None = None  # --max-memory in bytes, for passes started from inside methods (relex)
    device: str = "cpu"

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def files(self, row: int) -> dict[str, Path]:
        return self.base_files if row < 0 else self.checkpoints[row].files

    def read_into(self, row: int, names: list[str], out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` [len(names), *shape] with checkpoint ``row``'s tensors, one tensor in memory at a time."""
        files = self.files(row)
        by_file: dict[Path, list[int]] = {}
        for j, name in enumerate(names):
            by_file.setdefault(files[name], []).append(j)
        for path, idx in by_file.items():
            with open_weights(path) as f:
                for j in idx:
                    t = read_tensor(f, path, names[j])
                    out[j].copy_(t.reshape(out.shape[1:]))  # converts the dtype in place: no float copy of t
                    del t
                    # a NaN would fail the SVD far from its file; the sum needs no copy, isfinite only if it is not
                    if not math.isfinite(float(out[j].sum())) and not bool(torch.isfinite(out[j]).all()):
                        raise NextrapError(f"{path}: parameter {names[j]} contains NaN or Inf")
        return out

    def tensor(self, row: int, name: str) -> torch.Tensor:
        """One tensor of checkpoint ``row`` as stored (dtype and shape)."""
        path = self.files(row)[name]
        with open_weights(path) as f:
            return read_tensor(f, path, name)


def is_model(folder: Path) -> bool:
    """Whether ``folder`` holds Hugging Face safetensors weights (single file or an index)."""
    return (folder / SINGLE).is_file() or (folder / INDEX).is_file()


def discover_full(root: Path | str) -> list[FullCheckpoint]:
    """Every model folder under ``root`` with its step, sorted by step and evenly spaced (verl's partial
    saves past ``latest_checkpointed_iteration.txt`` left out)."""
    root = Path(root)
    if not root.is_dir():
        raise NextrapError(f"{root}: not a folder")
    folders = find_folders(root, is_model)  # never root itself: TRL's final save beside checkpoint-N has no step
    if not folders:
        if is_model(root):
            raise NextrapError(f"{root}: is a single model; pass the folder that holds one model folder per saved step")
        shards = next(root.rglob("model_world_size_*_rank_*.pt"), None)
        if shards is not None:
            raise NextrapError(f"{shards.parent}: verl FSDP shards without Hugging Face weights; merge them first "
                               "(python -m verl.model_merger merge --backend fsdp --local_dir ... --target_dir ...)")
        raise NextrapError(f"{root}: no Hugging Face model folders found ({SINGLE} or {INDEX})")
    return [FullCheckpoint(step, folder, weight_map(folder)) for step, folder in step_folders(root, folders)]


def load_full_trajectory(root: Path | str, base: Path | str) -> FullTrajectory:
    """Discover and validate a full-parameter trajectory against its base model (headers only)."""
    base = Path(base)
    base_files = weight_map(base)
    base_info = read_header(set(base_files.values()))
    ckpts = discover_full(root)
    for c in ckpts:
        info = read_header(set(c.files.values()))
        for name, (shape, _) in base_info.items():
            if name not in info:
                raise NextrapError(f"{c.path}: has no parameter {name} (the base {base} has it)")
            if info[name][0] != shape:
                raise NextrapError(f"{c.files[name]}: {name} has shape {info[name][0]}, but the base has {shape} ({base_files[name]})")
            if base_info[name][1] in FLOAT_DTYPES and info[name][1] not in FLOAT_DTYPES:
                raise NextrapError(f"{c.files[name]}: {name} is stored as {info[name][1]}, not floats like the base ({base_files[name]})")
        extra = sorted(set(info) - set(base_info))
        if extra:
            raise NextrapError(f"{c.files[extra[0]]}: parameter {extra[0]} is not in the base {base}")
    params, skipped = [], []
    for name, (shape, dtype) in base_info.items():
        if dtype in FLOAT_DTYPES and math.prod(shape) > 1 and len(shape) >= 1:
            params.append(Param(name, tuple(shape)))
        else:
            skipped.append(name)  # integer buffers and scalars: copied from the jumped-from checkpoint
    return FullTrajectory(Path(root), base, base_files, ckpts, params, skipped)
