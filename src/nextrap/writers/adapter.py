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
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from nextrap.io.checkpoints import ADAPTER_CONFIG, LoraTrajectory, open_weights, relative_name
from nextrap.io.tensorfile import ST_DTYPES
from nextrap.io.files import read_json, write_json
from nextrap.writers.merged import write_safetensors
from nextrap.engine.lorastream import fill_factors, move_rank
from nextrap.core.moves import Jump


def scale_appended(nb: torch.Tensor, na: torch.Tensor, rank: int, scale: float, alpha: float) -> None:
    """In place: (B', A') = ([B, P], [A; Q^T]), their columns and rows past ``rank`` a move's factors, become
    ([B, c P], [A; c' Q^T]) with scale * B' A' = scale * B A + alpha * P Q^T."""
    c = math.sqrt(abs(alpha) / scale)
    nb[:, rank:].mul_(-c if alpha < 0 else c)
    na[rank:].mul_(c)


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
    """Write the jumped adapter (weights in the source dtype, config, the source's other files) into ``out``,
    module by module: each module's factors are read, jumped and written before the next one's are read."""
    src = traj.checkpoints[row]
    source = traj.tensor_info(row, [*traj.lora_keys(traj.modules[0].name), *traj.extra_keys])
    dtype_name = source[traj.lora_keys(traj.modules[0].name)[1]][1]  # keep the source's storage dtype (fp32, bf16, ...)
    dtype = next(t for t, name in ST_DTYPES.items() if name == dtype_name)
    info: dict[str, tuple[list[int], str]] = {}
    extra_rank = {m.name: move_rank(j.factors, m.name) for m in traj.modules}
    for m in traj.modules:
        a_key, b_key = traj.lora_keys(m.name)
        info[b_key] = ([m.out_features, m.rank + extra_rank[m.name]], dtype_name)
        info[a_key] = ([m.rank + extra_rank[m.name], m.in_features], dtype_name)
    info.update({k: source[k] for k in traj.extra_keys})

    # float32 math for float32 or narrower storage: each stored value is one product rounded (c * s * dB), and
    # half the bytes of float64 to move through memory
    work = torch.float64 if dtype == torch.float64 else torch.float32

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for m in traj.modules:
            # the move's factors are written straight into the output's appended columns: no temporaries
            r, k = m.rank, extra_rank[m.name]
            nb = torch.empty(m.out_features, r + k, dtype=work)
            na = torch.empty(r + k, m.in_features, dtype=work)
            b, a = (t[0] for t in traj.factors(row, [m.name], work))
            nb[:, :r], na[:r] = b, a
            fill_factors(j.factors, m.name, nb[:, r:], na[r:], {row: (b, a)})
            scale_appended(nb, na, r, m.scale, alpha)
            nb, na = nb.to(dtype), na.to(dtype)  # write_safetensors checks them for NaN and Inf after the cast
            a_key, b_key = traj.lora_keys(m.name)
            del b, a  # one module's tensors in memory at a time
            yield b_key, nb.contiguous()
            yield a_key, na.contiguous()
            del nb, na
        for key in traj.extra_keys:
            yield key, traj.read_extra(row, [key])[key]

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", list(info), info, tensors(), overlap=True)  # counted: lora.py
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

