"""The NExt predictor: encoder-decoder MLPs that map (global, local) rank-1 components to the target one.

Exactly as the reference code sets it up (see shared METHOD.md): one model per group of vectors that the
reference stores as one matrix shape (``group_key``: the sigmas; the u's of each length; the v's of each length;
the matrices of the group are the batch), f_G and f_L = Linear(d,H) Linear(H,d) ReLU Linear(d,H) Linear(H,d),
f_D = the same over 2d with output d, the L1 loss summed over the group's vectors and averaged over the
training pairs, AdamW lr 2e-5 with cosine decay to 0.1 x lr over 1000 epochs, one optimizer step per epoch.
All the models train in one loop (one backward of the summed losses, one AdamW step), which is the same
arithmetic as training each alone: their parameters are disjoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from nextrap.core.features import VEC, Features
from nextrap.runtime.distributed import World, world

HIDDEN = 256


def _block(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    # No activation between the paired Linears: the reference's layout, kept for exact reproduction.
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Linear(hidden, d_in), nn.ReLU(), nn.Linear(d_in, hidden), nn.Linear(hidden, d_out))


class NExtMLP(nn.Module):
    def __init__(self, d: int, hidden: int = HIDDEN):
        super().__init__()
        self.f_G = _block(d, d, hidden)
        self.f_L = _block(d, d, hidden)
        self.f_D = _block(2 * d, d, hidden)

    def forward(self, x_global: torch.Tensor, x_local: torch.Tensor) -> torch.Tensor:
        return self.f_D(torch.cat([self.f_G(x_global), self.f_L(x_local)], -1))


@dataclass
class TrainSettings:
    epochs: int = 1000
    lr: float = 2e-5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01  # torch AdamW's default, which the reference uses
    hidden: int = HIDDEN
    seed: int = 0
    device: str = "cpu"
    sign_align: bool = True  # for ``next``; ``next-paper`` never aligns (the reference does not)


@dataclass
class Group:
    """One predictor's data: every (module, part) of one ``group_key``."""

    key: str  # "sigma", "u{m}", "v{n}"; "len{d}" in a fit saved before u's and v's were apart (``legacy_key``)
    length: int  # the vectors' length d
    members: list[tuple[str, str]]  # (module, "sigma" | "u" | "v" | "vec")
    losses: list[float] = field(default_factory=list)


@dataclass
class Predictor:
    groups: list[Group]
    models: dict[str, NExtMLP]  # by group key
    settings: TrainSettings

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{g}.{k}": v.detach().cpu().contiguous() for g, m in self.models.items() for k, v in m.state_dict().items()}


def group_key(part: str, length: int) -> str:
    """The predictor group of a (part, length), as the reference code groups them: it stores every vector as a
    matrix and trains one model per matrix shape: u as m x 1, v as 1 x n, sigma as 1 x 1, a 1-D parameter's
    delta as n x 1. So u's and v's of equal length have separate models, a 1-D delta joins the u's, and any
    vector of length 1 is a 1 x 1 matrix like a sigma."""
    if part == "sigma" or length == 1:
        return "sigma"
    return f"v{length}" if part == "v" else f"u{length}"


def legacy_key(length: int) -> str:
    """The key of a group in a fit saved before ``group_key``: one group per vector length, u's and v's together."""
    return f"len{length}"


def make_groups(features: Features) -> list[Group]:
    """The trajectory's predictor groups (``group_key``) in a fixed order: sigma first, then by length, the u's
    before the v's."""
    by_key: dict[str, Group] = {}
    for module in features.modules:
        parts = [VEC] if features.is_vector(module) else ["sigma", "u", "v"]
        for part in parts:
            length = 1 if part == "sigma" else features.get(module, "global", part).shape[-1]
            key = group_key(part, length)
            by_key.setdefault(key, Group(key, 1 if key == "sigma" else length, [])).members.append((module, part))
    return sorted(by_key.values(), key=lambda g: (g.length, g.key))


def group_tensors(features: Features, group: Group, rows: slice | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_G, x_L, x_T), each [n_rows, n_members, d], for the given checkpoint rows."""
    def stack(kind: str) -> torch.Tensor:
        cols = [features.get(m, kind, p)[rows] for m, p in group.members]
        return torch.stack([c[:, None] if c.dim() == 1 else c for c in cols], 1)
    return stack("global"), stack("local"), stack("target")


def training_rows(features: Features) -> list[int]:
    """Rows i with i + h <= c (target known) and a nonzero global delta: a saved step-0 adapter (B = 0) is the
    base model itself, W_0 in the paper's notation, not a training pair (so c = 15, h = 5 gives its 10 pairs)."""
    return [i for i in features.moved_rows() if i + features.horizon < features.n_rows]


def train(features: Features, settings: TrainSettings, on_epoch: Callable[[int], None] | None = None) -> Predictor:
    """Fit one NExtMLP per group (``make_groups``) on every training pair of the trajectory. Deterministic for a seed.

    All groups train in one loop: each epoch sums the groups' losses, calls backward once, and one AdamW and one
    cosine schedule step every group. The groups' parameters are disjoint and their settings equal, so each
    group's gradient and update are exactly those of training it alone (tests/test_predictor.py checks this
    against the per-group loop). ``on_epoch(epoch)`` is called once per epoch, without waiting for the device."""
    rows = training_rows(features)
    if not rows:
        raise ValueError("no training pairs: need more checkpoints than the horizon")
    groups = make_groups(features)
    models: dict[str, NExtMLP] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for g in groups:
            models[g.key] = NExtMLP(g.length, settings.hidden)
    device = torch.device(settings.device)
    # under torchrun each rank trains its share of the groups (balanced by their size) and every rank gets all of
    # them back: a group trains the same alone as beside others (above), so the models are one process's
    ranks = world(settings.device)
    mine = ranks.mine(groups, cost=lambda g: g.length * len(g.members))
    small = device.type == "cpu" and all(g.length <= SMALL_GROUP for g in groups)  # one process's thread count
    if mine:
        with _cpu_threads(1 if small else None):
            _fit_groups(mine, models, features, rows, settings, device, on_epoch)
    _share(groups, mine, models, ranks)
    for g in groups:
        if not math.isfinite(g.losses[-1]):
            raise FloatingPointError(f"predictor {g.key} diverged (loss {g.losses[-1]})")
    return Predictor(groups, models, settings)


def _share(groups: list[Group], mine: list[Group], models: dict[str, NExtMLP], ranks: World) -> None:
    """Every rank's trained groups (weights and losses) into ``models`` and ``groups`` on every rank."""
    if ranks.size == 1:
        return
    by_key = {g.key: g for g in groups}
    for part in ranks.gather({g.key: (models[g.key].state_dict(), g.losses) for g in mine}):
        for key, (state, losses) in part.items():
            models[key].load_state_dict(state)
            by_key[key].losses = list(losses)


# Below this vector length the predictor's matmuls are too small to gain from several CPU threads, and OpenMP's
# spin-waiting made them 16x slower on a 2-core machine whose other core was busy (2.5 s vs 41 s per 100 epochs).
# Training runs at one thread when every group is this small; otherwise at torch's thread count, where the large
# groups' matmuls gain from threads on an idle machine (on a busy one, OMP_NUM_THREADS=1: benchmarks/RESULTS.md 5).
SMALL_GROUP = 1024
LOSS_CHUNK = 1000  # epochs of losses kept on the device between read-backs (the default training reads once)


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fit_groups(groups: list[Group], models: dict[str, NExtMLP], features: Features, rows: list[int],
                settings: TrainSettings, device: torch.device, on_epoch: Callable[[int], None] | None) -> None:
    data = []
    for g in groups:
        models[g.key].to(device)
        data.append((models[g.key], *(t.to(device) for t in group_tensors(features, g, rows))))
    params = [p for g in groups for p in models[g.key].parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs, eta_min=settings.lr * settings.min_lr_ratio)
    # the losses stay on the device and are read back LOSS_CHUNK epochs at a time: no host sync per epoch
    history = torch.empty(min(settings.epochs, LOSS_CHUNK), len(groups), device=device)
    for epoch in range(settings.epochs):
        # Per group, as the reference: the L1 loss summed over the group's vectors at each training pair, averaged
        # over the pairs (a mean over the vectors too would shrink the gradients by members x d, toward AdamW's
        # eps). One optimizer step per epoch for all groups.
        losses = torch.stack([(model(xg, xl) - xt).abs().sum((1, 2)).mean() for model, xg, xl, xt in data])
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        sched.step()
        k = epoch % LOSS_CHUNK
        history[k] = losses.detach()
        if k == LOSS_CHUNK - 1 or epoch == settings.epochs - 1:
            for g, column in zip(groups, history[:k + 1].T.tolist()):
                g.losses.extend(column)
        if on_epoch:
            on_epoch(epoch)
    for g in groups:
        models[g.key].cpu()


@torch.no_grad()
def predict(predictor: Predictor, features: Features, row: int) -> dict[str, dict[str, torch.Tensor]]:
    """Predicted target (sigma, u, v) at checkpoint ``row`` for every module; u and v normalized to unit length.
    A 1-D parameter gets its predicted raw delta ``vec``, un-normalized."""
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in features.modules}
    for g in predictor.groups:
        xg, xl, _ = group_tensors(features, g, [row])
        y = predictor.models[g.key](xg, xl)[0]  # [n_members, d]
        for (module, part), vec in zip(g.members, y):
            if part == "sigma":
                out[module][part] = vec[0]
            elif part == VEC:
                out[module][part] = vec
            else:
                out[module][part] = vec / vec.norm().clamp_min(1e-12)
    return out


def load(state: dict[str, torch.Tensor], groups: list[Group], settings: TrainSettings) -> Predictor:
    models = {}
    for g in groups:
        model = NExtMLP(g.length, settings.hidden)
        prefix = f"{g.key}."
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        models[g.key] = model
    return Predictor(groups, models, settings)
