"""Hugging Face model folders written back with a delta added to some weights, the Hugging Face way (``model-0000i-of-0000N.safetensors``
+ index when sharded): the jumped model W_c + alpha * move (``--format merged``) or the base with the jump
folded in, W_0 + alpha * move (``--format base``), through the one writer ``write_merged``."""

from __future__ import annotations

import json
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from nextrap.engine.budget import row_chunks
from nextrap.io.checkpoints import LoraModule, LoraTrajectory, all_finite, open_weights
from nextrap.io.tensorfile import ST_DTYPES
from nextrap.engine.lorastream import module_factors
from nextrap.core.errors import NextrapError
from nextrap.io.files import write_json
from nextrap.core.moves import Jump
from nextrap.io.hfmodel import DTYPE_BYTES, INDEX, SINGLE, WEIGHT_SUFFIXES, read_header, weight_map
from nextrap.runtime.distributed import World

def _iter_tensors(keys: list[str], wmap: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in ``keys`` order, one file open at a time where the order allows."""
    current, handle = None, None
    try:
        for key in keys:
            if wmap[key] != current:
                if handle is not None:
                    handle.__exit__(None, None, None)
                current = wmap[key]
                handle = open_weights(current).__enter__()
            yield key, handle.get_tensor(key)
    finally:
        if handle is not None:
            handle.__exit__(None, None, None)


@dataclass(frozen=True)
class WeightDelta:
    """What to add to one weight of a base model: its name there, the shape it must have, the LoRA module it
    belongs to (for messages), and the deltas in that layout as thin float64 factors (left [rows, k], right
    [cols, k], delta = left @ right^T; read when the weight is written), added one after the other as a trainer
    jumping several times adds them. ``budget`` bounds the dense row chunks each addition forms."""

    key: str
    shape: list[int]
    module: str
    parts: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]]
    budget: int | None = None

    def added_to(self, w: torch.Tensor) -> torch.Tensor:
        """w + each delta in turn, summed in float64 row chunks (the dense delta is never held whole) and stored in
        w's dtype after each: the jumped weight bit for bit, whether written to a file (``write_merged``) or made
        in a live model (``jumps.apply_in_place``)."""
        for part in self.parts:
            left, right = (t.to(w.device) for t in part())
            out = torch.empty_like(w)
            for rs in row_chunks(tuple(w.shape), self.budget):
                out[rs] = (w[rs].double() + left[rs] @ right.mT).to(w.dtype)
            w = out
        return w


def _layout(m: LoraModule, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) of a delta in the base weight's layout: [in, out] for fan_in_fan_out, so the factors swap."""
    return (right, left) if m.fan_in_fan_out else (left, right)


def _weight_shape(m: LoraModule) -> list[int]:
    return [m.in_features, m.out_features] if m.fan_in_fan_out else [m.out_features, m.in_features]


def lora_deltas(traj: LoraTrajectory, row: int, j: Jump, alpha: float, trained: bool = True) -> list[WeightDelta]:
    """Per LoRA-targeted weight: alpha * move, plus the trained W_row - W_0 = s B_row A_row when ``trained``,
    each module's factors read only when its weight is written.

    ``trained`` gives the jumped model W_row + alpha * move (``--format merged``); without it the result is
    the base folded with the jump, W_0 + alpha * move, on which checkpoint ``row``'s own adapter resumes
    (``--format base``): W_0 + alpha * move + s B_row A_row is the same model."""
    def part(m: LoraModule) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def factors() -> tuple[torch.Tensor, torch.Tensor]:
            held, left, right = {}, [], []
            if trained:
                b, a = (t[0] for t in traj.factors(row, [m.name]))
                held[row] = (b, a)
                left.append(m.scale * b.double())
                right.append(a.double().mT)
            p, q = module_factors(j.factors, m.name, held)
            left.append(alpha * p.double())
            right.append(q.double())
            return _layout(m, torch.cat(left, -1), torch.cat(right, -1))
        return factors

    return [WeightDelta(m.base_key, _weight_shape(m), m.name, [part(m)], traj.budget) for m in traj.modules]


def module_deltas(modules: list[LoraModule], moves: list[tuple[Jump, float]],
                  trained: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[WeightDelta]:
    """Per module: alpha * P @ Q^T for each of ``moves`` (move, alpha), in order, the first plus s * B @ A where
    ``trained`` has the module's (B, A); in the layout of its base weight (transposed for fan_in_fan_out)."""
    trained = trained or {}

    def part(m: LoraModule, i: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def factors() -> tuple[torch.Tensor, torch.Tensor]:
            move, alpha = moves[i]
            p, q = module_factors(move.factors, m.name)
            left, right = [alpha * p.double()], [q.double()]
            if i == 0 and m.name in trained:
                b, a = trained[m.name]
                left.append(m.scale * b.double())
                right.append(a.double().mT)
            return _layout(m, torch.cat(left, -1), torch.cat(right, -1))
        return factors

    return [WeightDelta(m.base_key, _weight_shape(m), m.name, [part(m, i) for i in range(len(moves))]) for m in modules]


def write_merged(out: Path, base: Path, deltas: list[WeightDelta], max_shard_bytes: int,
                 replaced: dict[str, torch.Tensor] | None = None, replaced_from: Path | None = None,
                 ranks: World = World()) -> dict:
    """Write the base model with each delta added (in float64, stored in the base dtype) and the tensors of
    ``replaced`` (base names, e.g. an adapter's modules_to_save read from ``replaced_from``) swapped in, as a
    Hugging Face model folder: every tensor read, changed and written one at a time. Returns a small summary.
    With several ``ranks`` writing into the same ``out``, each writes its share of the shards (``write_sharded``)."""
    base = Path(base)
    replaced = replaced or {}
    wmap = weight_map(base)
    info = read_header(set(wmap.values()))
    by_key = {d.key: d for d in deltas}
    missing = [k for k in by_key if k not in info]
    if missing:
        raise NextrapError(f"{base}: has no weight {missing[0]} for LoRA module {by_key[missing[0]].module} (is it the adapter's base model?)")
    for key, d in by_key.items():
        if info[key][0] != d.shape:
            raise NextrapError(f"{wmap[key]}: {key} has shape {info[key][0]}, but the LoRA module expects {d.shape}")
    for key, t in replaced.items():
        if key not in info:
            raise NextrapError(f"{replaced_from}: tensor {key} (modules_to_save) has no counterpart in {base}")
        if list(t.shape) != info[key][0]:  # e.g. an embedding trained with a resized vocabulary
            raise NextrapError(f"{replaced_from}: tensor {key} (modules_to_save) has shape {list(t.shape)}, but "
                               f"{wmap[key]} has {info[key][0]} (a resized vocabulary? the base must have the adapter's shapes)")

    def merged(key: str, w: torch.Tensor) -> torch.Tensor:
        if key in by_key:
            return by_key[key].added_to(w)
        return replaced[key].to(w.dtype) if key in replaced else w

    def shard(keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, w in _iter_tensors(keys, wmap):
            jumped = merged(key, w)
            del w  # the base weight is not kept while the next one is read
            yield key, jumped
            del jumped

    shards, total = write_sharded(out, info, shard, max_shard_bytes, ranks)
    if ranks.is_main:
        copy_model_files(base, out)
    return {"shards": shards, "total_bytes": total, "modules_merged": len(by_key)}


def write_sharded(out: Path, info: dict[str, tuple[list[int], str]],
                  tensors: Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]], max_shard_bytes: int,
                  ranks: World = World()) -> tuple[int, int]:
    """Write the tensors named in ``info`` (name -> (shape, safetensors dtype), in order) the Hugging Face way:
    ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus the index above ``max_shard_bytes``.
    The shards follow from ``info`` alone, so under torchrun every rank plans the same ones and writes its share
    of them (balanced by size), rank 0 the index: the files one process writes.

    ``tensors(keys)`` yields (name, tensor) for one shard's keys in order; each is written to disk as it comes
    (the header is known from ``info``), so one tensor at a time is in memory, whatever the shard size. NaN or
    Inf in a float tensor is refused. Returns (number of shards, total bytes)."""
    unknown = next((k for k, (_, dtype) in info.items() if dtype not in DTYPE_BYTES), None)
    if unknown is not None:
        raise NextrapError(f"tensor {unknown}: dtype {info[unknown][1]} cannot be written")
    shards: list[list[str]] = [[]]
    sizes = [0]
    for key, (shape, dtype) in info.items():
        nbytes = _tensor_bytes(shape, dtype)
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(key)
        sizes[-1] += nbytes
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    out.mkdir(parents=True, exist_ok=True)
    for i in ranks.mine(range(len(shards)), cost=lambda i: sizes[i]):
        write_safetensors(out / names[i], shards[i], info, tensors(shards[i]))
    total = sum(sizes)  # the data bytes of every shard, whichever rank wrote it
    if len(shards) > 1 and ranks.is_main:
        weight_index = {key: fname for fname, shard in zip(names, shards) for key in shard}
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_index})
    return len(shards), total


def _tensor_bytes(shape: list[int], dtype: str) -> int:
    return DTYPE_BYTES[dtype] * int(torch.Size(shape).numel())


def write_safetensors(path: Path, keys: list[str], info: dict[str, tuple[list[int], str]],
                      tensors: Iterator[tuple[str, torch.Tensor]], overlap: bool = False) -> int:
    """One safetensors file (the format: u64 header length, JSON header padded to 8 bytes, then the data),
    written tensor by tensor, one in memory at a time; returns its data bytes. With ``overlap``, each tensor's
    bytes go to the file on a thread of their own while ``tensors`` makes the next one (the write releases the
    GIL): two tensors in memory at a time, which the caller's budget must count."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        shape, dtype = info[key]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + _tensor_bytes(shape, dtype)]}
        offset += _tensor_bytes(shape, dtype)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="nextrap-write") as writer:
        f.write(struct.pack("<Q", len(raw)) + raw)
        writing: Future | None = None
        for want, (key, w) in zip(keys, tensors):
            shape, dtype = info[key]
            if key != want or list(w.shape) != shape or ST_DTYPES.get(w.dtype) != dtype:
                raise NextrapError(f"{path}: tensor {key} {list(w.shape)} {w.dtype} does not match its header ({want} {shape} {dtype})")
            if w.is_floating_point() and not all_finite(w):
                raise NextrapError(f"{key} would contain NaN or Inf in {dtype}; refusing to write it")
            data = w.contiguous().reshape(-1).view(torch.uint8).numpy().data  # keeps its tensor alive until written
            del w
            if writing is not None:
                writing.result()  # the tensor before this one is written (and freed)
            writing = writer.submit(f.write, data)
            del data
            if not overlap:
                writing.result()
        if writing is not None:
            writing.result()
    return offset


def copy_model_files(src: Path, out: Path) -> None:
    """Copy every non-weight file of a model folder: config, generation config, tokenizer, chat template..."""
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != INDEX and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
