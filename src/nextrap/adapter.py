"""Writing a jumped LoRA checkpoint as an exact PEFT adapter.

The jump is a thin product P @ Q.T (rank k: 1 for NExt), so W_c + alpha * P Q^T is itself a LoRA of rank
r + k: the jump's factors are appended to B and A, with the module's scaling s kept (lora_alpha is rescaled
for the new rank). The original r columns are untouched, so training can continue on the same adapter.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoints import ADAPTER_CONFIG, LoraTrajectory, open_weights, relative_name, shape_groups
from .errors import NextrapError
from .files import read_json, write_json
from .methods import Jump


def jumped_factors(b: torch.Tensor, a: torch.Tensor, p: torch.Tensor, q: torch.Tensor, scale: float,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with scale * B' A' = scale * B A + alpha * P Q^T, B' = [B, c P], A' = [A; c' Q^T]."""
    c = math.sqrt(abs(alpha) / scale)
    sign = -1.0 if alpha < 0 else 1.0
    return torch.cat([b, sign * c * p], 1), torch.cat([a, c * q.mT], 0)


def _alpha_for(config: dict[str, Any], scale: float, rank: int) -> float:
    return scale * (math.sqrt(rank) if config.get("use_rslora") else rank)


def jumped_config(config: dict[str, Any], traj: LoraTrajectory, extra_rank: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json for the jumped adapter: per-module rank r + k with the scaling unchanged."""
    new = dict(config)
    ranks = {m.name: m.rank + extra_rank[m.name] for m in traj.modules}
    alphas = {m.name: _alpha_for(config, m.scale, ranks[m.name]) for m in traj.modules}
    (r, alpha), _ = Counter((ranks[n], alphas[n]) for n in ranks).most_common(1)[0]
    new["r"] = r
    new["lora_alpha"] = int(alpha) if float(alpha).is_integer() else alpha
    rank_pattern, alpha_pattern = {}, {}
    for name in ranks:
        relative = relative_name(name)
        if ranks[name] != r:
            rank_pattern[relative] = ranks[name]
        if not math.isclose(alphas[name], alpha, rel_tol=1e-12):
            alpha_pattern[relative] = alphas[name]
    new["rank_pattern"] = rank_pattern
    new["alpha_pattern"] = alpha_pattern
    return new


def write_adapter(out: Path, traj: LoraTrajectory, row: int, j: Jump, alpha: float) -> None:
    """Write the jumped adapter (weights in the source dtype, config, the source's other files) into ``out``."""
    src = traj.checkpoints[row]
    with open_weights(src.weights) as f:  # keep the source's storage dtype (fp32, bf16, ...)
        dtype = f.get_tensor(traj.lora_keys(traj.modules[0].name)[1]).dtype
    tensors: dict[str, torch.Tensor] = {}
    extra_rank: dict[str, int] = {}
    for names in shape_groups(traj.modules).values():
        b, a = traj.factors(row, names)
        for i, name in enumerate(names):
            p, q = j.factors[name]
            nb, na = (t.to(dtype) for t in jumped_factors(b[i], a[i], p, q, traj.module(name).scale, alpha))
            if not (torch.isfinite(nb).all() and torch.isfinite(na).all()):  # checked after the cast: fp16 overflows
                raise NextrapError(f"jumped factors of {name} contain NaN or Inf in {dtype}; refusing to write them")
            a_key, b_key = traj.lora_keys(name)
            tensors[b_key] = nb.contiguous()
            tensors[a_key] = na.contiguous()
            extra_rank[name] = p.shape[1]
    tensors.update(traj.read_extra(row))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(out / ADAPTER_CONFIG, jumped_config(read_json(src.path / ADAPTER_CONFIG), traj, extra_rank))
    for f in src.path.iterdir():  # tokenizer files some trainers save beside the adapter
        if f.is_file() and f.name.startswith(_COPIED_PREFIXES):
            shutil.copy2(f, out / f.name)


def make_appended_rows_trainable(folder: Path, rank: int, seed: int = 0) -> None:
    """Give an alpha-0 jumped adapter's appended rank a PEFT-style start: A rows random (kaiming-uniform bound
    1 / sqrt(in_features)), B columns still zero, so the weights are unchanged but the new rank can learn.

    A zero move written by ``write_adapter`` has zero A rows *and* zero B columns, whose gradients stay zero:
    a no-jump control built that way would train one rank less than a real jump."""
    path = folder / "adapter_model.safetensors"
    with open_weights(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(seed)
    for key, t in tensors.items():
        if ".lora_A." in key and t.shape[0] > rank:
            bound = 1.0 / math.sqrt(t.shape[1])
            fresh = (torch.rand(t.shape[0] - rank, t.shape[1], generator=g) * 2 - 1) * bound
            tensors[key] = torch.cat([t[:rank], fresh.to(t.dtype)], 0).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


_COPIED_PREFIXES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")

