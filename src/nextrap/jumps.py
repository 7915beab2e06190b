"""Jumps applied during training, saved as low-rank factors, and folded into a base model afterwards.

A jump made in place at step N (``nextrap.integrations.trl``) adds alpha * P @ Q^T to the frozen base weight of
every LoRA module, so the adapters saved from step N on are relative to W_0 + alpha * P Q^T, not to W_0. Each
jump is saved beside the run's checkpoints as ``nextrap-jumps/step_N/`` (``jump.safetensors``: ``{module}:p``
and ``{module}:q`` in float64; ``jump.json``: step, method, alpha and the LoRA modules' shapes), and
``fold`` (``nextrap fold BASE JUMPS``) writes W_0 + sum_k alpha_k P_k Q_k^T over the jumps saved at steps
<= ``upto``: the base on which checkpoint ``upto`` (or any checkpoint from the last folded jump until the next
jump) loads and resumes as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoints import LoraModule
from .errors import NextrapError
from .files import atomic_dir, check_apart, read_json, write_json
from .hfmodel import module_deltas, parse_size, write_merged
from .methods import Jump

JUMPS = "nextrap-jumps"  # the folder of saved jumps, beside the checkpoints
JUMP_FORMAT = "nextrap-jump/1"
JUMP_INFO = "jump.json"
JUMP_WEIGHTS = "jump.safetensors"
PROVENANCE = "nextrap.json"


@dataclass
class SavedJump:
    """One jump read back: at ``step``, ``alpha`` times ``move`` was added to the base weights of ``modules``."""

    step: int
    method: str
    alpha: float
    modules: list[LoraModule]
    move: Jump
    info: dict[str, Any]


def jump_folder(root: Path | str, step: int) -> Path:
    return Path(root) / f"step_{step}"


def save_jump(root: Path | str, step: int, move: Jump, alpha: float, modules: list[LoraModule],
              info: dict[str, Any]) -> Path:
    """Write the jump made at ``step`` as ``root/step_N`` (atomically, replacing an earlier jump saved at that
    step); ``info`` is added to ``jump.json``."""
    folder = jump_folder(root, step)
    with atomic_dir(folder, overwrite=True, kind="jump") as tmp:  # a step jumped again (after a resume) replaces its jump
        tensors = {}
        for m in modules:
            p, q = move.factors[m.name]
            tensors[f"{m.name}:p"], tensors[f"{m.name}:q"] = p.double().contiguous(), q.double().contiguous()
        save_file(tensors, str(tmp / JUMP_WEIGHTS), metadata={"format": JUMP_FORMAT})
        write_json(tmp / JUMP_INFO, {**info, "format": JUMP_FORMAT, "step": step, "method": move.method, "alpha": alpha,
                                     "modules": [asdict(m) for m in modules]})
    return folder


def load_jump(folder: Path) -> SavedJump:
    info = read_json(folder / JUMP_INFO)
    if info.get("format") != JUMP_FORMAT:
        raise NextrapError(f"{folder / JUMP_INFO}: not a saved nextrap jump (format {info.get('format')!r})")
    if not (folder / JUMP_WEIGHTS).is_file():
        raise NextrapError(f"{folder}: has {JUMP_INFO} but no {JUMP_WEIGHTS}")
    tensors = load_file(str(folder / JUMP_WEIGHTS))
    modules = [LoraModule(**m) for m in info["modules"]]
    factors = {}
    for m in modules:
        try:
            factors[m.name] = (tensors[f"{m.name}:p"], tensors[f"{m.name}:q"])
        except KeyError:
            raise NextrapError(f"{folder / JUMP_WEIGHTS}: no factors for module {m.name}") from None
    return SavedJump(info["step"], info["method"], info["alpha"], modules, Jump(info["method"], factors, {}), info)


def load_jumps(root: Path | str, upto: int | None = None) -> list[SavedJump]:
    """The jumps saved under ``root`` (``step_N`` folders), in step order, those after ``upto`` left out."""
    root = Path(root)
    if not root.is_dir():
        raise NextrapError(f"{root}: no such folder of saved jumps")
    jumps = sorted((load_jump(f) for f in root.iterdir() if f.is_dir() and (f / JUMP_INFO).is_file()),
                   key=lambda j: j.step)
    if not jumps:
        raise NextrapError(f"{root}: holds no saved jumps (step_N folders with {JUMP_INFO})")
    first = jumps[0]
    for j in jumps[1:]:
        if j.modules != first.modules:
            raise NextrapError(f"{jump_folder(root, j.step)}: LoRA modules differ from {jump_folder(root, first.step)}")
    kept = [j for j in jumps if upto is None or j.step <= upto]
    if not kept:
        raise NextrapError(f"{root}: no jump saved at or before step {upto} (steps {', '.join(str(j.step) for j in jumps)})")
    return kept


@dataclass
class FoldResult:
    out: Path
    steps: list[int]  # the jumps folded in
    shards: int

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "steps": self.steps, "shards": self.shards}


def fold(base: Path | str, jumps: Path | str, out: Path | str, upto: int | None = None, max_shard_size: str = "5GB",
         overwrite: bool = False) -> FoldResult:
    """Write ``base`` with every jump saved in ``jumps`` at a step <= ``upto`` added, in step order and rounded
    to the base dtype after each as the live model was (one tensor at a time, sharded as ``extend --format merged``)."""
    out = Path(out)
    check_apart(out, {"the base model": base, "the jumps folder": jumps})
    shard_bytes = parse_size(max_shard_size)
    saved = load_jumps(jumps, upto)
    deltas = module_deltas(saved[0].modules, [(j.move, j.alpha) for j in saved])
    with atomic_dir(out, overwrite=overwrite, kind="fold") as tmp:
        summary = write_merged(tmp, Path(base), deltas, shard_bytes)
        write_json(tmp / PROVENANCE, {
            "tool": "nextrap", "format": "fold", "base": str(Path(base).absolute()), "jumps": str(Path(jumps).absolute()),
            "folded": [{"step": j.step, "method": j.method, "alpha": j.alpha} for j in saved],
            "resume": f"checkpoints saved at steps >= {saved[-1].step}"
                      + ("" if upto is None else f" and <= {upto}") + " load on this model"})
    return FoldResult(out, [j.step for j in saved], summary["shards"])


def apply_in_place(model: torch.nn.Module, move: Jump, alpha: float, modules: list[LoraModule]) -> int:
    """Add alpha * move to the frozen base weight of every LoRA module of a live PEFT model (``base_layer``),
    computed as ``fold`` computes it (``WeightDelta.added_to``); returns the number of weights changed."""
    live = dict(model.named_modules())
    changed = 0
    with torch.no_grad():
        for d in module_deltas(modules, [(move, alpha)]):
            layer = live.get(d.module)
            weight = getattr(getattr(layer, "base_layer", None), "weight", None)
            if weight is None:
                raise NextrapError(f"the model has no LoRA module {d.module} with a base_layer (the checkpoints' "
                                   "modules differ from the model being trained)")
            if list(weight.shape) != d.shape:
                raise NextrapError(f"{d.module}: base weight has shape {list(weight.shape)}, the checkpoints say {d.shape}")
            weight.copy_(d.added_to(weight))
            changed += 1
    return changed
