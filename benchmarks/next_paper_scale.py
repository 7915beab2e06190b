"""next-paper's predictor at Qwen2.5-7B LoRA shapes: the groups trained one after the other (the algorithm before
issue 10, copied here for comparison only) against all groups in one loop (``nextrap.methods.predictor.train``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/next_paper_scale.py --layers 28 --epochs 1000 --time-epochs 20

The features are synthetic rank-1 ones (random unit u and v, random sigma; what the predictor's cost depends on
is only their shapes): ``--layers`` x Qwen2.5-7B's 7 projections (q 3584x3584, k and v 512x3584, o 3584x3584,
gate and up 18944x3584, down 3584x18944), 16 checkpoints (step 0 is W_0), horizon 5, so 10 training pairs and
six predictor groups (sigma; the u's of lengths 512, 3584, 18944; the v's of lengths 3584, 18944). Each variant trains ``--time-epochs`` epochs from the same
seed (so the same initialisation); its time is scaled to ``--epochs`` (an epoch's cost does not depend on the
learning rate, so the extrapolation is linear), and the script says so when it extrapolates. The outputs compared
are every module's predicted (sigma, u, v) at the last checkpoint, after the timed epochs.

Variants: ``sequential`` (one NExtMLP after the other, its own AdamW and cosine schedule, one thread for a group
of length <= 1024 on the CPU, ``loss.item()`` every epoch), ``batched`` (``train`` as shipped: one loop, one
backward, one AdamW; one thread only when every group is small) and ``batched-1t`` (the same at one thread).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from nextrap.methods.predictor import SMALL_GROUP, NExtMLP, Predictor, TrainSettings, group_tensors, make_groups, predict, train, training_rows
from nextrap.core.features import Features

SHAPES = (("self_attn.q_proj", 3584, 3584), ("self_attn.k_proj", 512, 3584), ("self_attn.v_proj", 512, 3584),
          ("self_attn.o_proj", 3584, 3584), ("mlp.gate_proj", 18944, 3584), ("mlp.up_proj", 18944, 3584),
          ("mlp.down_proj", 3584, 18944))  # (module, out_features, in_features) of Qwen2.5-7B
PREFIX = "base_model.model.model.layers"
VARIANTS = ("sequential", "batched", "batched-1t")


def synthetic_features(layers: int, checkpoints: int = 16, horizon: int = 5, seed: int = 0) -> Features:
    """Rank-1 features with the 7B shapes: unit u, v and a positive sigma per (module, kind, row); row 0 is the
    base model (global sigma 0), targets past the last checkpoint NaN (as ``trajectory.store_rows`` writes them)."""
    g = torch.Generator().manual_seed(seed)
    modules, tensors = [], {}

    def unit(n_rows: int, d: int) -> torch.Tensor:
        x = torch.randn(n_rows, d, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    for layer in range(layers):
        for name, m, n in SHAPES:
            module = f"{PREFIX}.{layer}.{name}"
            modules.append(module)
            for kind in ("global", "local", "target"):
                sigma, u, v = torch.rand(checkpoints, generator=g) + 0.1, unit(checkpoints, m), unit(checkpoints, n)
                if kind == "global":
                    sigma[0] = 0
                if kind == "target":
                    sigma[-horizon:], u[-horizon:], v[-horizon:] = float("nan"), float("nan"), float("nan")
                tensors.update({f"{module}:{kind}:sigma": sigma, f"{module}:{kind}:u": u, f"{module}:{kind}:v": v})
    return Features([10 * i for i in range(checkpoints)], horizon, False, modules, tensors)


def train_sequential(features: Features, settings: TrainSettings) -> Predictor:
    """The predictor's training before issue 10 (for comparison only): the groups one after the other."""
    rows = training_rows(features)
    groups = make_groups(features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        models = {g.key: NExtMLP(g.length, settings.hidden) for g in groups}
    device = torch.device(settings.device)
    for g in groups:
        model = models[g.key].to(device)
        xg, xl, xt = (t.to(device) for t in group_tensors(features, g, rows))
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs,
                                                           eta_min=settings.lr * settings.min_lr_ratio)
        old = torch.get_num_threads()
        torch.set_num_threads(1 if device.type == "cpu" and g.length <= SMALL_GROUP else old)
        try:
            for _ in range(settings.epochs):
                loss = (model(xg, xl) - xt).abs().sum((1, 2)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                g.losses.append(loss.item())
        finally:
            torch.set_num_threads(old)
        model.cpu()
        if not math.isfinite(g.losses[-1]):
            raise FloatingPointError(f"predictor {g.key} diverged (loss {g.losses[-1]})")
    return Predictor(groups, models, settings)


def run(variant: str, features: Features, settings: TrainSettings) -> tuple[float, float, float, Predictor]:
    """(wall s, user CPU s, system CPU s, the trained predictor)."""
    old = torch.get_num_threads()
    if variant == "batched-1t":
        torch.set_num_threads(1)
    try:
        if settings.device == "cuda":
            torch.cuda.synchronize()
        c0, t0 = os.times(), time.perf_counter()
        pred = train_sequential(features, settings) if variant == "sequential" else train(features, settings)
        if settings.device == "cuda":
            torch.cuda.synchronize()
        c1, t1 = os.times(), time.perf_counter()
        return t1 - t0, c1.user - c0.user, c1.system - c0.system, pred
    finally:
        torch.set_num_threads(old)


def max_abs_diff(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> float:
    return max(float((a[m][p] - b[m][p]).abs().max()) for m in a for p in a[m])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--epochs", type=int, default=1000, help="the training length to report (the paper's 1000)")
    ap.add_argument("--time-epochs", type=int, default=None,
                    help="epochs actually run per variant (default: --epochs); times are scaled to --epochs")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}")
    ran = args.time_epochs or args.epochs
    scale = args.epochs / ran

    features = synthetic_features(args.layers)
    groups = make_groups(features)
    print(f"{args.layers} layers, {len(features.modules)} modules, {features.n_rows} checkpoints, horizon {features.horizon}, "
          f"{len(training_rows(features))} training pairs; groups (members): "
          + ", ".join(f"{g.key} x {len(g.members)}" for g in groups))
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), load {os.getloadavg()[0]:.1f}")
    if scale != 1:
        print(f"each variant runs {ran} epochs; times for {args.epochs} epochs are EXTRAPOLATED (x {scale:g})")

    settings = TrainSettings(epochs=ran, seed=0, device=args.device)
    row = features.n_rows - 1
    results = []
    for variant in variants:
        load = os.getloadavg()[0]
        seconds, user, system, pred = run(variant, features, settings)
        results.append((variant, load, seconds, user, system, predict(pred, features, row)))
        print(f"  {variant}: {seconds:.1f} s for {ran} epochs (user {user:.1f} s, sys {system:.1f} s, load {load:.1f})", flush=True)

    print(f"\n| variant | load | s / epoch | user + sys CPU s / epoch | s for {args.epochs} epochs"
          f"{' (extrapolated)' if scale != 1 else ''} | speed-up vs sequential | max abs diff of outputs vs sequential |")
    print("|---|---|---|---|---|---|---|")
    base = next((r for r in results if r[0] == "sequential"), None)
    for variant, load, seconds, user, system, out in results:
        ratio = f"{base[2] / seconds:.2f}" if base else "-"
        diff = f"{max_abs_diff(base[5], out):.2e}" if base else "-"
        print(f"| {variant} | {load:.1f} | {seconds / ran:.2f} | {user / ran:.2f} + {system / ran:.2f} | {seconds * scale:.0f} | {ratio} | {diff} |")


if __name__ == "__main__":
    main()
