"""Rank-1 features from LoRA factors (thin QR + small SVD) vs the reference's dense SVD of merged deltas.

Prints, side by side in one run: agreement (max relative sigma error, min |cos| of u and v) and the time of
each path, on the fixture trajectory and on synthetic LoRA trajectories of LLM-sized matrices.

    .venv/bin/python benchmarks/features_factored_vs_dense.py [--big 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nextrap.io.checkpoints import load_trajectory
from nextrap.core.lowrank import top1_dense, top1_factored
from nextrap.engine.lorafeatures import compute_features, pair_factors

ROOT = Path(__file__).resolve().parents[1]


def fixture_case(horizon: int = 5) -> tuple[float, float, float, float]:
    traj = load_trajectory(ROOT / "fixtures" / "lora-trajectory")
    t0 = time.perf_counter()
    feats = compute_features(traj, horizon)
    t_fact = time.perf_counter() - t0
    t0 = time.perf_counter()
    worst_s, worst_c = 0.0, 1.0
    n = len(traj.steps)
    for m in traj.modules:
        # the reference path: dense merged delta per checkpoint, full SVD per delta
        w = torch.stack([m.scale * (lambda b, a: b[0] @ a[0])(*traj.factors(i, [m.name])) for i in range(n)])
        for kind, x, rows in (("global", w, range(n)), ("local", torch.cat([w[:1], w[1:] - w[:-1]]), range(n)),
                              ("target", w[horizon:] - w[:-horizon], range(n - horizon))):
            ref = top1_dense(x)
            keep = ref.sigma > 0
            s = feats.get(m.name, kind, "sigma")[list(rows)].double()
            worst_s = max(worst_s, float(((s - ref.sigma).abs()[keep] / ref.sigma[keep]).max()))
            for part, r in (("u", ref.u), ("v", ref.v)):
                worst_c = min(worst_c, float((feats.get(m.name, kind, part)[list(rows)].double() * r).sum(-1).abs()[keep].min()))
    t_dense = time.perf_counter() - t0
    return worst_s, worst_c, t_fact, t_dense


def synthetic_case(m: int, n: int, r: int, count: int) -> tuple[float, float, float, float]:
    """``count`` local deltas s(B_i A_i - B_{i-1} A_{i-1}) of an m x n LoRA of rank r."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(count + 1, m, r, generator=g, dtype=torch.float64) * 0.01
    a = torch.randn(count + 1, r, n, generator=g, dtype=torch.float64) * 0.01
    scale = torch.ones(count)
    t0 = time.perf_counter()
    p, q = pair_factors(b[1:], a[1:], b[:-1], a[:-1], scale.double())
    fact = top1_factored(p, q)
    t_fact = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = top1_dense(b[1:] @ a[1:] - b[:-1] @ a[:-1])
    t_dense = time.perf_counter() - t0
    err = float(((fact.sigma - dense.sigma).abs() / dense.sigma).max())
    cos = float(torch.minimum((fact.u * dense.u).sum(-1).abs(), (fact.v * dense.v).sum(-1).abs()).min())
    return err, cos, t_fact, t_dense


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", type=int, default=2048, help="matrix size of the synthetic LLM-like case")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'case':44s} {'max rel sigma err':>18s} {'min |cos|':>10s} {'factored s':>11s} {'dense s':>9s} {'speed-up':>9s}")
    rows = [("fixture: 17 ckpts x 14 modules x 3 kinds", fixture_case())]
    for m, n, r, k in ((args.big, args.big, 64, 4), (args.big, 2 * args.big, 16, 4)):
        rows.append((f"synthetic: {k} local deltas {m}x{n}, r {r}", synthetic_case(m, n, r, k)))
    for name, (err, cos, tf, td) in rows:
        print(f"{name:44s} {err:18.2e} {cos:10.6f} {tf:11.3f} {td:9.3f} {td / tf:8.1f}x")


if __name__ == "__main__":
    main()
