"""Budgeted streaming passes over a LoRA trajectory: the rank-1 features, the backtest's terms, relex's
projections and next's held-out check, each reading every checkpoint it needs once per unit (a batch of
same-shape modules sized to ``--max-memory``, ``budget``), only that unit's tensors (safetensors ``safe_open``).

The math is exact and shares its work. Every delta is a thin product P Q^T of checkpoint factors, so its top
singular triple follows from the k x k Grams P^T P and Q^T Q (``lowrank.top1_gram``). The feature pass reads
the factors as float32 (exact for bf16, fp16 and fp32 storage) and computes, per checkpoint i, the Grams of
G_i = s B_i A_i (B_i^T B_i, A_i A_i^T: its spectrum gives the energy) and, for the local and target deltas
against o = i - 1 and o = i - h, the Grams of the factors of the *difference* form
    s (B_i A_i - B_o A_o) = s (B_i dA + dB A_o),   dB = B_i - B_o, dA = A_i - A_o,
i.e. P = s [B_i, dB], Q = [dA^T, A_o^T]: B_i^T dB, dB^T dB, dA dA^T, dA A_o^T (B_i^T B_i and A_o A_o^T are
already there). Float32 products of these keep sigma to ~1e-7 relative however small the delta is against G_i:
no column of P or Q is much larger than its share of the delta, so nothing cancels. (The checkpoint-pair form
P = s [B_i, -B_o], Q = [A_i^T, A_o^T] cancels, and its rounding enters sigma times (||G|| / ||L||)^2: float32
would lose 2e-4 at a ratio of 100 and 6e-2 at 1000, where the difference form keeps ~1e-8; measured.) Five
float32 products per checkpoint and side cost less than the pair form's three float64 ones. The k x k cores
are float64; u and v are P cu and Q cv (float32). Only the last h + 1 checkpoints of a unit are held.

A move on a LoRA trajectory (``LoraMove``) is a checkpoint difference s (B_row A_row - B_ref A_ref) plus explicit
thin factors; its factors are read per module when asked for, so no pass holds a whole checkpoint.
Inner products of moves come from float64 Gram blocks: <B_a A_a, B_b A_b> = sum((B_a^T B_b) * (A_a A_b^T)).
They stay float64: a move's terms combine them with cancellation (t = ||G_c - G_{c-h}||^2 is a sum of three
products of size ||G||^2), and these are the backtest's exact terms. The checkpoint-pair products (two
float64 Gram products each, the costly part of a later pass) are kept per trajectory and module (one float
each, ``_row_products``): a fit's later passes read the same few checkpoints (next's held-out check on
c - 2h, c - h, c; the backtest's terms on c - 2h, c - h, c again; the fold's check on c - 3h, c - 2h, c - h),
so each pair is multiplied once per fit; the products with explicit factors (B^T P: a few columns) are
computed in each pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence

import torch

from nextrap.engine.projected import held_bytes, recall_all, remember, store
from nextrap.engine.budget import MAP_EVERY_BLOCK, REUSE_BLOCKS, Meter, Prefetcher, StreamStats, group_by, heap_hygiene, mb, nbytes, sized_batches, trim_heap
from nextrap.io.checkpoints import LoraModule, LoraTrajectory
from nextrap.runtime.process import HEAP_ENV
from nextrap.core.features import KINDS
from nextrap.core.lowrank import energy_of, top1_gram
from nextrap.core.moves import Factors

FLOAT64 = 8
FLOAT32 = 4
FEATURE_DTYPE = torch.float32  # the feature pass's factors and Gram products (module docstring)
Sink = Callable[[list[str], str, dict[str, torch.Tensor]], None]  # (names, kind, parts [modules, rows, ...])


# --------------------------------------------------------------------------------------------- budget

def factor_bytes(m: LoraModule, itemsize: int = FLOAT64) -> int:
    """Bytes of one checkpoint's B and A of module ``m``."""
    return itemsize * m.rank * (m.out_features + m.in_features)


def _native_bytes(m: LoraModule) -> int:
    """safe_open's copy of one stored factor before it is converted (float64 at most) and the finiteness masks."""
    return FLOAT64 * m.rank * max(m.out_features, m.in_features) + m.rank * (m.out_features + m.in_features)


def feature_bytes(traj: LoraTrajectory) -> int:
    """Bytes of the float32 features of every module: sigma, u, v per kind and the global energy, per checkpoint."""
    return sum(module_feature_bytes(m, len(traj.checkpoints)) for m in traj.modules)


def module_feature_bytes(m: LoraModule, rows: int) -> int:
    return 4 * rows * (len(KINDS) * (m.out_features + m.in_features + 1) + 1)


# features a fit holds beside a later pass: its own, a backtest fold's truncated copy, and a third for what the
# later passes make beside them unaccounted (next no longer makes an aligned copy; with 2 the real-peak test's
# growth went 1.4 MB past its allowance)
RESIDENT_COPIES = 3


def resident_bytes(traj: LoraTrajectory) -> int:
    """What a pass started after the features (backtest, relex, next) counts as held before it reads anything: the
    features' copies and the projections the feature pass kept (``projected``)."""
    return RESIDENT_COPIES * feature_bytes(traj) + held_bytes(traj)


def feature_stacks(horizon: int) -> int:
    """Checkpoints' worth of (float32) factors of a unit the feature pass holds at once: the last h + 1, two in the
    reader's pipeline, and the differences (dB, dA) of the local and the target delta."""
    return horizon + 5


def meter_for(budget: int | None, held: int) -> Meter:
    """A meter that starts with what the process already holds (features, moves), glibc told to give memory back
    (``heap_hygiene``): after each unit, reusing what a unit frees where ``NEXTRAP_HEAP=reuse`` (the command),
    else at once (every block mapped)."""
    heap_hygiene(REUSE_BLOCKS if os.environ.get(HEAP_ENV) == "reuse" else MAP_EVERY_BLOCK)
    meter = Meter(budget)
    meter.add(held)
    return meter


def units(traj: LoraTrajectory, names: Sequence[str] | None, rows: int, meter: Meter, what: str,
          scratch: Callable[[LoraModule], int] = lambda m: 0, max_batch: int | None = None,
          itemsize: int = FLOAT64) -> Iterator[list[str]]:
    """Modules (all of ``traj`` or ``names``) in batches of one shape whose ``rows`` checkpoints of factors
    (``itemsize`` bytes an element) each, plus ``scratch`` per module and one stored tensor being read, fit what
    the budget leaves free."""
    wanted = set(names) if names is not None else None
    modules = [m for m in traj.modules if wanted is None or m.name in wanted]

    def too_big(m: LoraModule, need: int, free: int | None) -> str:
        return (f"LoRA module {m.name} [{m.out_features}x{m.in_features}, r {m.rank}] needs {mb(need)} for {what} "
                f"({rows} checkpoints of {8 * itemsize}-bit factors), more than the --max-memory budget {mb(meter.budget)} leaves "
                f"({mb(free)} after {mb(meter.held)} of features and moves held); raise --max-memory")

    for group in group_by(modules, lambda m: (m.out_features, m.in_features, m.rank)):
        # a stack of at most 32 MB: the heap reuses it for the next checkpoint's (``heap_hygiene``), where a larger
        # one is mapped afresh and faults on every page (measured: reading ~2x slower)
        m = group[0]
        cap = max(1, REUSE_BLOCKS // (max(m.out_features, m.in_features) * m.rank * itemsize))
        for batch in sized_batches([group], lambda m: rows * factor_bytes(m, itemsize) + scratch(m),
                                   _native_bytes, meter, too_big, min(cap, max_batch or cap)):
            yield [m.name for m in batch]


def _load(traj: LoraTrajectory, dtype: torch.dtype, job: tuple[int, list[str]], meter: Meter,
          pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reader's load: checkpoint ``job[0]``'s (B, A) stacks of modules ``job[1]`` in ``dtype``."""
    row, names = job
    m = traj.module(names[0])
    meter.add(len(names) * factor_bytes(m, dtype.itemsize))
    with meter.scratch(_native_bytes(m)):
        return traj.factors(row, names, dtype, pin)


def _reader(traj: LoraTrajectory, rows: Sequence[int], names: list[str], device: torch.device, meter: Meter,
            dtype: torch.dtype = torch.float64) -> Prefetcher:
    return Prefetcher([(r, names) for r in rows], partial(_load, traj, dtype), device, meter, key=lambda job: job[0])


# --------------------------------------------------------------------------------------------- features

def stream_features(traj: LoraTrajectory, horizon: int, sink: Sink, budget: int | None = None, device: str = "cpu",
                    progress: Callable[[int], None] | None = None, max_batch: int | None = None,
                    names: Sequence[str] | None = None, project: Sequence[int] = ()) -> StreamStats:
    """Exact rank-1 features of every module's global, local and target deltas, unit by unit under ``budget``
    bytes; each unit's rows go to ``sink(names, kind, parts)`` (parts: sigma [b, rows], u [b, rows, m],
    v [b, rows, n] float32, raw SVD signs; energy for global; target rows only up to c - h). ``names``: only
    these modules (a rank's share under torchrun).

    ``project``: rows d whose global direction (u_d, v_d, as stored) relex will project every checkpoint i <= d
    on (a backtest fold's start). Each unit reads those rows first, takes their global features, and computes
    a_d[i] = s u_d^T B_i A_i v_d as the rows go by; ``projections`` then serves them without a pass of its own
    (a read of the trajectory per fold, saved for the price of reading rows d twice)."""
    n, project = len(traj.checkpoints), sorted(set(project))
    if any(not 0 <= d < n for d in project):
        raise ValueError(f"rows to project on {project}: the trajectory has rows 0..{n - 1}")
    meter, stats, dev = meter_for(budget, feature_bytes(traj)), StreamStats(budget), torch.device(device)
    scratch = partial(_feature_scratch_bytes, rows=n, horizon=horizon)
    for names in units(traj, names, feature_stacks(horizon), meter, "the rank-1 features", scratch, max_batch, FLOAT32):
        module = traj.module(names[0])
        with meter.scratch(len(names) * scratch(module)), _reader(traj, [*project, *range(n)], names, dev, meter, FEATURE_DTYPE) as rd:
            parts, values = _unit_features(rd, traj.scales(names).to(dev), n, horizon, meter, project)
            stats.seconds_waiting += rd.waited
            for kind, p in parts.items():
                sink(names, kind, p)
            for d, a in values.items():
                for j, name in enumerate(names):
                    remember(traj, name, parts["global"]["u"][j, d], parts["global"]["v"][j, d], a[j])
            del parts, values
        trim_heap()
        stats.batches += 1
        stats.reads += n + len(project)
        if progress:
            progress(len(names))
    stats.peak = meter.peak
    traj.peak = max(traj.peak, meter.peak)
    return stats


def _unit_output_bytes(m: LoraModule, rows: int) -> int:
    """The unit's feature rows as built (float32) and their aligned, stored copies."""
    return 3 * module_feature_bytes(m, rows)


def _feature_scratch_bytes(m: LoraModule, rows: int, horizon: int) -> int:
    """Per module, beside its factors: the feature rows (``_unit_output_bytes``) and the k x k float64 work, in
    r x r blocks: B^T B and A A^T of the h + 1 held checkpoints, and one delta's work at a time: its four float32
    products (B_i^T dB, dB^T dB, dA dA^T, dA A_o^T: 2) and its core (its 2r x 2r Grams P^T P, Q^T Q, their roots,
    the core, C^T C and its eigenvectors: 6 x 4 blocks)."""
    return _unit_output_bytes(m, rows) + FLOAT64 * m.rank**2 * (2 * (horizon + 1) + 2 + 24)


@dataclass
class _Held:
    b: torch.Tensor  # [units, m, r] float32
    a: torch.Tensor  # [units, r, n]
    gb: torch.Tensor  # B^T B [units, r, r] float64 (of a float32 product)
    ga: torch.Tensor  # A A^T


@dataclass
class _Work:
    """Buffers reused for every checkpoint of a unit (a fresh block is mmapped, and its first touch page-faults:
    as costly as the products, measured): dB and dA of the local and the target delta, each delta's contiguous
    (a strided [units, m, 2r] pair halves the speed of the subtraction and of the matrix-vector products,
    measured), and one delta's float64 Grams P^T P, Q^T Q."""

    db: torch.Tensor  # [2, units, m, r] float32
    da: torch.Tensor  # [2, units, r, n]
    gp: torch.Tensor  # [units, 2r, 2r] float64
    gq: torch.Tensor

    @staticmethod
    def like(b: torch.Tensor, a: torch.Tensor) -> _Work:
        """Buffers for a unit of factors b [units, m, r], a [units, r, n]."""
        k = 2 * b.shape[-1]
        grams = [torch.empty(b.shape[0], k, k, dtype=torch.float64, device=b.device) for _ in range(2)]
        return _Work(b.new_empty(2, *b.shape), a.new_empty(2, *a.shape), *grams)

    @property
    def nbytes(self) -> int:
        """The difference buffers (the Grams are in ``_feature_scratch_bytes``' core)."""
        return nbytes(self.db) + nbytes(self.da)


def _unit_features(rd: Prefetcher, scale: torch.Tensor, n: int, horizon: int, meter: Meter,
                   project: Sequence[int] = ()) -> tuple[dict[str, dict[str, torch.Tensor]], dict[int, torch.Tensor]]:
    """The unit's rows of every kind, reading checkpoint after checkpoint and holding the last h + 1, and the
    projections a_d [units, d + 1] (float64) on the global directions of rows ``project``, read first."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    held: dict[int, _Held] = {}
    s2 = (scale * scale)[:, None, None]
    work: _Work | None = None
    directions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # d -> (u_d, v_d) as stored, on the device
    values: dict[int, torch.Tensor] = {}
    grams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # d -> its B^T B, A A^T, for its turn in order
    for step, (i, (b, a)) in enumerate(rd):
        units_, m, r = b.shape
        if work is None:
            out = {kind: {"sigma": torch.zeros(units_, rows), "u": torch.zeros(units_, rows, m),
                          "v": torch.zeros(units_, rows, a.shape[-1])}
                   for kind, rows in (("global", n), ("local", n), ("target", max(n - horizon, 0)))}
            out["global"]["energy"] = torch.zeros(units_, n)
            work = _Work.like(b, a)
            meter.add(work.nbytes)
        ahead = step < len(project)  # a projected row, read ahead of the others: its global delta, then let go
        if not ahead and i in grams:  # its turn in order: the Grams kept from ahead (now in the held rows' scratch)
            gb, ga = grams.pop(i)
            meter.sub(nbytes(gb) + nbytes(ga))
        else:
            gb, ga = (b.mT @ b).double(), (a @ a.mT).double()
        if ahead:
            grams[i] = (gb, ga)
            meter.add(nbytes(gb) + nbytes(ga))
            _global_row(out["global"], i, b, a, gb, ga, scale, s2)
            directions[i] = (out["global"]["u"][:, i].to(b.device), out["global"]["v"][:, i].to(b.device))
            values[i] = torch.zeros(units_, i + 1, dtype=torch.float64, device=b.device)
            meter.add(nbytes(values[i]) + sum(nbytes(x) for x in directions[i]))  # (views on the CPU: counted anyway)
            meter.sub(nbytes(b) + nbytes(a))
            del b, a
            continue
        cur = held[i] = _Held(b, a, gb, ga)
        if i not in directions:
            _global_row(out["global"], i, b, a, gb, ga, scale, s2)
        for d, (u, v) in directions.items():
            if i <= d:
                values[d][:, i] = _project(b, a, scale, u, v)
        if i == 0:  # L_0 = W_0' - W_0: the first checkpoint's global delta
            for part in ("sigma", "u", "v"):
                out["local"][part][:, 0] = out["global"][part][:, 0]
        pairs = ([("local", i - 1, i)] if i >= 1 else []) + ([("target", i - horizon, i - horizon)] if i >= horizon else [])
        # the difference form s (B_i dA + dB A_o): P = s [B_i, dB], Q = [dA^T, A_o^T]; one delta at a time
        for (kind, old, row), db, da in zip(pairs, work.db, work.da):
            torch.sub(b, held[old].b, out=db)
            torch.sub(a, held[old].a, out=da)
            gp = _blocks(work.gp, cur.gb, b.mT @ db, db.mT @ db, s2)  # P^T P
            gq = _blocks(work.gq, da @ da.mT, da @ held[old].a.mT, held[old].ga)  # Q^T Q
            s, cu, cv = top1_gram(gp, gq, spectrum=False)
            _put(out[kind], row, s[:, 0], *_vectors(scale, [(b, cu[:, :r]), (db, cu[:, r:])],
                                                    [(da, cv[:, :r]), (held[old].a, cv[:, r:])]))
        for old in [j for j in held if j <= i - horizon]:  # T_{i-h} was the last delta that needed checkpoint i - h
            meter.sub(nbytes(held[old].b) + nbytes(held[old].a))
            del held[old]
    for h in held.values():
        meter.sub(nbytes(h.b) + nbytes(h.a))
    if work is not None:
        meter.sub(work.nbytes)
    meter.sub(sum(nbytes(values[d]) + nbytes(u) + nbytes(v) for d, (u, v) in directions.items()))
    return out, values


def _global_row(rows: dict[str, torch.Tensor], i: int, b: torch.Tensor, a: torch.Tensor, gb: torch.Tensor,
                ga: torch.Tensor, scale: torch.Tensor, s2: torch.Tensor) -> None:
    """Row ``i`` of the global kind (G_i = s B_i A_i) from its Grams gb = B^T B, ga = A A^T."""
    s, cu, cv = top1_gram(s2 * gb, ga)
    _put(rows, i, s[..., 0], *_vectors(scale, [(b, cu)], [(a, cv)]))
    rows["energy"][:, i] = energy_of(s).float().cpu()


def _matvecs(terms: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_t X_t c_t per module for terms [(X_t [units, p, q], c_t [units, q]), ...] (matrix-vector products in the
    factors' dtype: the fastest way through their bytes; each added into the module's row in place, no term
    stacked apart; module by module, so that a module's result does not depend on the unit it is read in)."""
    mats = [(x, c.to(x.dtype)) for x, c in terms]
    out = mats[0][0].new_zeros(mats[0][0].shape[:-1])
    for x, c in mats:
        for j, row in enumerate(out):
            row.addmv_(x[j], c[j])
    return out


def _vectors(scale: torch.Tensor, p: Sequence[tuple[torch.Tensor, torch.Tensor]],
             q: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """u = s sum_t X_t cu_t and v = sum_t Y_t^T cv_t per module, for p = [(X_t [units, m, r], cu_t [units, r]), ...],
    q = [(Y_t [units, r, n], cv_t), ...]."""
    return scale[:, None] * _matvecs(p), _matvecs([(y.mT, c) for y, c in q])


def _project(b: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """a = s (u^T B)(A v) [units] float64 for factors b [units, m, r], a [units, r, n] and directions u [units, m],
    v [units, n]: two matrix-vector products in the factors' dtype (float32: the directions are stored float32
    features, so nothing is rounded but the sums: 2.3e-7 of the projection's size against dense float64 on the
    fixture), their r-term dot product in float64."""
    return scale.double() * (_matvecs([(b.mT, u)]).double() * _matvecs([(a, v)]).double()).sum(-1)


def _blocks(out: torch.Tensor, new: torch.Tensor, cross: torch.Tensor, old: torch.Tensor,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` [units, 2r, 2r] (float64) = scale [[new, cross], [cross^T, old]]: the Gram of two side-by-side factor
    blocks [X, Y] from X^T X, X^T Y, Y^T Y [units, r, r], widened to float64 as they are written."""
    r = new.shape[-1]
    for rows, cols, x in ((slice(None, r), slice(None, r), new), (slice(None, r), slice(r, None), cross),
                          (slice(r, None), slice(None, r), cross.mT), (slice(r, None), slice(r, None), old)):
        if scale is None:
            out[:, rows, cols] = x
        else:
            torch.mul(x, scale, out=out[:, rows, cols])
    return out


def _put(rows: dict[str, torch.Tensor], row: int, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """Store one row of a kind: u and v renormalised (they are unit vectors up to rounding), zero where sigma is."""
    for part, x in (("u", u), ("v", v)):
        # x is zero (sigma 0: 0 / tiny stays 0) or of norm ~1, so the clamp changes no nonzero row
        rows[part][:, row] = (x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)).float().cpu()
    rows["sigma"][:, row] = sigma.float().cpu()


# --------------------------------------------------------------------------------------------- moves

class LoraMove(Mapping):
    """A move on a LoRA trajectory, per module: s (B_row A_row - B_ref A_ref) (ref None: the base model, no second
    term) plus explicit thin factors (P, Q). ``move[name]`` is the module's (P, Q) in float64 with P Q^T the move,
    the checkpoint factors read when asked for; modules outside ``keep`` have a zero move of the same rank."""

    def __init__(self, traj: LoraTrajectory, row: int, ref: int | None, explicit: dict[str, Factors] | None = None,
                 keep: frozenset[str] | None = None):
        self.traj, self.row, self.ref = traj, row, ref
        self.explicit = dict(explicit or {})
        self.keep = keep

    @property
    def rows(self) -> list[int]:
        """The checkpoints the difference reads."""
        return [self.row] if self.ref is None else [self.row, self.ref]

    def __getitem__(self, name: str) -> Factors:
        return self.factors(name)

    def __iter__(self) -> Iterator[str]:
        return iter(m.name for m in self.traj.modules)

    def __len__(self) -> int:
        return len(self.traj.modules)

    def rank(self, name: str) -> int:
        """Columns of the module's (P, Q) (the adapter's extra rank), known without reading."""
        extra = self.explicit[name][0].shape[-1] if name in self.explicit else 0
        return len(self.rows) * self.traj.module(name).rank + extra

    def factors(self, name: str, held: Mapping[int, Factors] | None = None, dtype: torch.dtype = torch.float64) -> Factors:
        """(P, Q) of module ``name`` in ``dtype`` (``fill``)."""
        m, k = self.traj.module(name), self.rank(name)
        p, qt = torch.empty(m.out_features, k, dtype=dtype), torch.empty(k, m.in_features, dtype=dtype)
        self.fill(name, p, qt, held)
        return p, qt.mT

    def fill(self, name: str, p: torch.Tensor, qt: torch.Tensor, held: Mapping[int, Factors] | None = None) -> None:
        """Write module ``name``'s P into ``p`` [m, k] and Q^T into ``qt`` [k, n], in their dtype (views of a larger
        tensor do: the adapter writer fills its output's appended columns); checkpoint factors come from ``held``
        (row -> (B [m, r], A [r, n])) when given. The difference is in the form of the feature pass (module
        docstring), s (B_row A_row - B_ref A_ref) = s [B_row, B_row - B_ref] [A_row - A_ref; A_ref]: no column is
        much larger than its share of the move, so products of these factors cancel nothing (float32 Grams of
        them keep the move's sigma to ~1e-7), and the columns an adapter appends are as small as the move."""
        m, r = self.traj.module(name), self.traj.module(name).rank
        if self.keep is not None and name not in self.keep:
            p.zero_()
            qt.zero_()
            return

        def read(row: int) -> Factors:
            b, a = held[row] if held is not None and row in held else (t[0] for t in self.traj.factors(row, [name], p.dtype))
            return b.to(p.dtype), a.to(p.dtype)

        b, a = read(self.row)
        torch.mul(b, m.scale, out=p[:, :r])
        if self.ref is None:
            qt[:r].copy_(a)
        else:
            b_ref, a_ref = read(self.ref)
            torch.sub(b, b_ref, out=p[:, r:2 * r]).mul_(m.scale)
            torch.sub(a, a_ref, out=qt[:r])
            qt[r:2 * r].copy_(a_ref)
        if name in self.explicit:
            done = len(self.rows) * r
            ep, eq = self.explicit[name]
            p[:, done:].copy_(ep)
            qt[done:].copy_(eq.mT)

    def plus(self, explicit: Mapping[str, Factors]) -> "LoraMove":
        """This move plus explicit factors (appended after the difference's columns, as ``methods.combine`` does)."""
        both = dict(self.explicit)
        for name, (p, q) in explicit.items():
            if name in both:
                both[name] = (torch.cat([both[name][0], p], -1), torch.cat([both[name][1], q], -1))
            else:
                both[name] = (p, q)
        return LoraMove(self.traj, self.row, self.ref, both, self.keep)

    def only(self, keep: set[str]) -> "LoraMove":
        """The same move with a zero move (of the same rank) for the modules outside ``keep``."""
        kept = frozenset(keep) if self.keep is None else self.keep & frozenset(keep)
        return LoraMove(self.traj, self.row, self.ref, self.explicit, kept)


def move_rank(factors: Mapping[str, Factors], name: str) -> int:
    """Columns of a move's (P, Q) for module ``name``, without reading a LoraMove's checkpoints."""
    return factors.rank(name) if isinstance(factors, LoraMove) else factors[name][0].shape[-1]


def fill_factors(factors: Mapping[str, Factors], name: str, p: torch.Tensor, qt: torch.Tensor,
                 held: Mapping[int, Factors] | None = None) -> None:
    """A move's P and Q^T for module ``name`` written into ``p`` and ``qt`` (``LoraMove.fill``)."""
    if isinstance(factors, LoraMove):
        factors.fill(name, p, qt, held)
    else:
        ep, eq = factors[name]
        p.copy_(ep)
        qt.copy_(eq.mT)


def module_factors(factors: Mapping[str, Factors], name: str, held: Mapping[int, Factors] | None = None,
                   dtype: torch.dtype | None = None) -> Factors:
    """A move's (P, Q) for module ``name`` (in ``dtype``, else a LoraMove's float64 and explicit factors as they
    are), a LoraMove's checkpoint factors taken from ``held`` where there."""
    if isinstance(factors, LoraMove):
        return factors.factors(name, held, dtype or torch.float64)
    p, q = factors[name]
    return (p, q) if dtype is None else (p.to(dtype), q.to(dtype))


def explicit_bytes(factors: Mapping[str, Factors]) -> int:
    """Bytes a move holds in memory: its explicit factors (a LoraMove's checkpoint difference is read per unit)."""
    explicit = factors.explicit if isinstance(factors, LoraMove) else factors
    return sum(nbytes(p) + nbytes(q) for p, q in explicit.values())


@dataclass
class Combo:
    """One module's matrix as sum_row w_row B_row A_row + sum P Q^T (the scale s folded into w)."""

    rows: dict[int, float] = field(default_factory=dict)
    explicit: list[Factors] = field(default_factory=list)

    def __add__(self, other: "Combo") -> "Combo":
        rows = dict(self.rows)
        for r, w in other.rows.items():
            rows[r] = rows.get(r, 0.0) + w
        return Combo(rows, [*self.explicit, *other.explicit])

    def __neg__(self) -> "Combo":
        return Combo({r: -w for r, w in self.rows.items()}, [(-p, q) for p, q in self.explicit])


def difference(new: int, old: int | None, scale: float) -> Combo:
    """s (W_new - W_old) of one module (old None or negative: the base model)."""
    return Combo({new: scale}) + (Combo({old: -scale}) if old is not None and old >= 0 else Combo())


def combo(factors: Mapping[str, Factors], name: str, scale: float) -> Combo:
    """A move's Combo for one module: a LoraMove stays symbolic in its rows, explicit factors are kept as they are."""
    if not isinstance(factors, LoraMove):
        return Combo({}, [factors[name]])
    if factors.keep is not None and name not in factors.keep:
        return Combo()
    return difference(factors.row, factors.ref, scale) + Combo({}, [factors.explicit[name]] if name in factors.explicit else [])


def _row_products(traj: LoraTrajectory) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """module -> {(i, j): <B_i A_i, B_j A_j>} of ``traj`` (``projected.store``)."""
    return store("row products", traj)


class _Inner:
    """Frobenius inner products of Combos of one module, with the checkpoints' Gram blocks computed once:
    <B_a A_a, B_b A_b> = sum((B_a^T B_b) * (A_a A_b^T)), <B A, P Q^T> = sum((B^T P) * (A Q)). ``rows``: the
    checkpoint-pair products known from earlier passes, added to as this one computes more. ``explicit``: the
    Combos' explicit factors, side by side, so that a checkpoint's products with all of them are one product per
    side (B^T [P_1, P_2, ...]): each alone would read B, much the larger operand, once per factor."""

    def __init__(self, held: Mapping[int, Factors], rows: dict[tuple[int, int], torch.Tensor] | None = None,
                 explicit: Sequence[Factors] = ()):
        self.held = held  # row -> (B [m, r], A [r, n]) float64
        self._rows: dict[tuple[int, int], torch.Tensor] = {} if rows is None else rows
        self._cols: dict[tuple[int, int], slice] = {}  # (id(P), id(Q)) -> its columns in the side-by-side factors
        unique: list[Factors] = []
        for p, q in explicit:
            if (id(p), id(q)) not in self._cols:
                done = sum(f[0].shape[-1] for f in unique)
                self._cols[id(p), id(q)] = slice(done, done + p.shape[-1])
                unique.append((p, q))
        self._explicit = (torch.cat([p.double() for p, _ in unique], -1), torch.cat([q.double() for _, q in unique], -1)) if unique else None
        self._by_row: dict[int, Factors] = {}  # row -> (B^T P_all, A Q_all)

    def _row_row(self, i: int, j: int) -> torch.Tensor:
        key = (min(i, j), max(i, j))
        if key not in self._rows:
            (bi, ai), (bj, aj) = self.held[key[0]], self.held[key[1]]
            self._rows[key] = ((bi.mT @ bj) * (ai @ aj.mT)).sum()
        return self._rows[key]

    def _row_explicit(self, i: int, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        cols = self._cols.get((id(p), id(q)))
        if cols is None or self._explicit is None:
            b, a = self.held[i]
            return ((b.mT @ p.double()) * (a @ q.double())).sum()
        if i not in self._by_row:
            b, a = self.held[i]
            self._by_row[i] = (b.mT @ self._explicit[0], a @ self._explicit[1])
        x, y = self._by_row[i]
        return (x[:, cols] * y[:, cols]).sum()

    def __call__(self, x: Combo, y: Combo) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for i, wi in x.rows.items():
            total += sum((wi * wj * self._row_row(i, j) for j, wj in y.rows.items()), torch.zeros((), dtype=torch.float64))
            total += sum((wi * self._row_explicit(i, p, q) for p, q in y.explicit), torch.zeros((), dtype=torch.float64))
        for p, q in x.explicit:
            total += sum((wj * self._row_explicit(j, p, q) for j, wj in y.rows.items()), torch.zeros((), dtype=torch.float64))
            total += sum((((p.double().mT @ r.double()) * (q.double().mT @ s.double())).sum() for r, s in y.explicit),
                         torch.zeros((), dtype=torch.float64))
        return float(total)


def stream_inner(traj: LoraTrajectory, combos: Callable[[str], dict[str, Combo]], pairs: Sequence[tuple[str, str]],
                 rows: Sequence[int], budget: int | None = None, held_bytes: int = 0, names: Sequence[str] | None = None,
                 what: str = "the backtest") -> tuple[dict[str, dict[tuple[str, str], float]], StreamStats]:
    """Per module (all, or ``names``) <X, Y> for every (X, Y) in ``pairs``, with ``combos(module)`` -> {label:
    Combo}: the checkpoints ``rows`` of each unit read once (under ``budget`` beside the resident features and
    ``held_bytes``). Per module, so that the caller sums them in one fixed order however the modules were split
    (``World.total``)."""
    rows = sorted(set(rows))
    meter, stats = meter_for(budget, resident_bytes(traj) + held_bytes), StreamStats(budget)
    per_module: dict[str, dict[tuple[str, str], float]] = {}
    for unit in units(traj, names, max(len(rows), 1), meter, what):
        with _reader(traj, rows, unit, torch.device("cpu"), meter) as rd:
            _unit_inner(rd, unit, combos, pairs, per_module, meter, _row_products(traj))
            stats.seconds_waiting += rd.waited
        trim_heap()
        stats.batches += 1
        stats.reads += len(rows)
    stats.peak = meter.peak
    traj.peak = max(traj.peak, meter.peak)
    return per_module, stats


def _unit_inner(rd: Prefetcher, unit: list[str], combos: Callable[[str], dict[str, Combo]], pairs: Sequence[tuple[str, str]],
                per_module: dict[str, dict[tuple[str, str], float]], meter: Meter,
                known: dict[str, dict[tuple[int, int], torch.Tensor]] | None = None) -> None:
    """Put one unit's inner products in ``per_module``. A function of its own so that nothing it made (a view of a
    checkpoint's stack keeps the whole stack) outlives it."""
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for row, ba in rd:
            held[row] = ba
        for j, name in enumerate(unit):
            mine = combos(name)
            inner = _Inner({row: (b[j], a[j]) for row, (b, a) in held.items()}, None if known is None else known.setdefault(name, {}),
                           [f for c in mine.values() for f in c.explicit])
            per_module[name] = {(x, y): inner(mine[x], mine[y]) for x, y in pairs}
    finally:
        meter.sub(sum(nbytes(b) + nbytes(a) for b, a in held.values()))


def move_terms(traj: LoraTrajectory, moves: dict[str, Mapping[str, Factors]], from_row: int, to_row: int,
               budget: int | None = None, names: Sequence[str] | None = None) -> tuple[dict[str, dict[tuple[str, str], float]], StreamStats]:
    """Per module (all, or ``names``) the inner products of each method's move against the true W_to - W_from,
    keyed ("", "") = ||true||^2 (t), ("", method) = <true, move> (c), (method, method) = ||move||^2 (j), in one
    streamed pass over the checkpoints all the moves need."""
    rows = {from_row, to_row}
    for f in moves.values():
        if isinstance(f, LoraMove):
            rows.update(f.rows)

    def combos(name: str) -> dict[str, Combo]:
        s = traj.module(name).scale
        return {"": difference(to_row, from_row, s), **{method: combo(f, name, s) for method, f in moves.items()}}

    pairs = [("", "")] + [p for m in moves for p in (("", m), (m, m))]
    held = sum(explicit_bytes(f) for f in moves.values())
    return stream_inner(traj, combos, pairs, sorted(rows), budget, held, names)


def projections(traj: LoraTrajectory, directions: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: Sequence[int],
                budget: int | None = None, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """a_i = u^T (s B_i A_i) v (float64 [len(rows)]) for every module in ``directions`` (or those of ``names``) and
    every checkpoint i in ``rows``, as the feature pass computed them where it did (``stream_features``'
    ``project``), else streamed: one read of each checkpoint per unit, one checkpoint held at a time. Either way
    from float32 factors and the directions rounded to float32 (``_project``: relex's are stored features)."""
    wanted = list(directions) if names is None else list(names)
    out = recall_all(traj, directions, wanted, rows)
    held = resident_bytes(traj) + sum(nbytes(u) + nbytes(v) for u, v in directions.values())
    meter = meter_for(budget, held)
    todo = [n for n in wanted if n not in out]
    for unit in units(traj, todo, 3, meter, "relex's projections", itemsize=FLOAT32):
        u, v = (torch.stack([directions[n][k] for n in unit]).to(FEATURE_DTYPE) for k in (0, 1))
        scale = traj.scales(unit)
        values = []
        with _reader(traj, rows, unit, torch.device("cpu"), meter, FEATURE_DTYPE) as rd:
            for _, (b, a) in rd:
                values.append(_project(b, a, scale, u, v))
                meter.sub(nbytes(b) + nbytes(a))
                del b, a
        trim_heap()
        traj.peak = max(traj.peak, meter.peak)
        stacked = torch.stack(values, 1) if values else torch.zeros(len(unit), 0, dtype=torch.float64)
        out.update({n: stacked[j] for j, n in enumerate(unit)})
    return out


def rank1(sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> Factors:
    """(P, Q) = (sigma u, v) as [m, 1], [n, 1] float64."""
    return (float(sigma) * u.double())[:, None], v.double()[:, None]


def preflight(traj: LoraTrajectory, horizon: int, budget: int | None, backtest: bool = True) -> None:
    """Check up front that every pass a fit runs fits the budget, so that a too-small budget fails now with the
    one-line error naming a module rather than after the feature pass. Later passes run beside the resident
    features (``resident_bytes``), the moves' explicit factors (at most 4 columns per module and method, 4
    methods) and relex's directions."""
    n = len(traj.checkpoints)
    features = feature_bytes(traj)
    for _ in units(traj, None, feature_stacks(horizon), meter_for(budget, features), "the rank-1 features",
                   partial(_feature_scratch_bytes, rows=n, horizon=horizon), itemsize=FLOAT32):
        pass
    vectors = FLOAT64 * sum(m.out_features + m.in_features for m in traj.modules)
    later = resident_bytes(traj) + 4 * 4 * vectors + vectors
    for rows, what, itemsize in ((4, "the backtest", FLOAT64), (3, "next's held-out check", FLOAT64),
                                 (3, "relex's projections", FLOAT32)):
        if backtest or what != "the backtest":
            for _ in units(traj, None, rows, meter_for(budget, later), what, itemsize=itemsize):
                pass
