"""Full-parameter features under a memory budget: peak accounted memory and the process's real peak growth vs the
budget, and exact vs fast SVD
(time and sigma error), side by side on one generated trajectory larger than the budget; then relex's
projections for a backtest fold, computed by the feature pass as it reads the checkpoints against a pass of
their own after it (``--svd`` features, same numbers both ways).

    .venv/bin/python benchmarks/fullparam_memory.py [--layers 4 --hidden 512 --ckpts 8 --budget 48MB]

The trajectory: a Llama-shaped stack of q/up/down matrices and norms in bf16, each checkpoint the base plus a
turning rank-1 drift and noise, written to a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from nextrap.io.fullparam import FullTrajectory, load_full_trajectory
from nextrap.engine.budget import parse_size
from nextrap.engine.fullmoves import projections
from nextrap.engine.fullstream import compute_full_features


def generate(root: Path, layers: int, hidden: int, ckpts: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    inter = int(hidden * 2.75)
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)})
    base = {k: torch.randn(*s, generator=g) / math.sqrt(s[-1]) for k, s in shapes.items()}
    dirs = {k: [torch.randn(s[0], 1, generator=g) / math.sqrt(s[0]) for _ in range(2)] + [torch.randn(1, s[-1], generator=g) / math.sqrt(s[-1])]
            for k, s in shapes.items() if len(s) == 2}
    (root / "base").mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, str(root / "base" / "model.safetensors"))
    for c in range(1, ckpts + 1):
        t = c / ckpts
        sd = {}
        for k, w in base.items():
            if k in dirs:
                u1, u2, v = dirs[k]
                u = math.cos(t) * u1 + math.sin(t) * u2
                w = w + 0.05 * t**0.7 * (u @ v) + 5e-4 * torch.randn(w.shape, generator=g)
            else:
                w = w + 0.01 * t
            sd[k] = w.to(torch.bfloat16)
        (root / "ckpts" / f"step_{10 * c}").mkdir(parents=True)
        save_file(sd, str(root / "ckpts" / f"step_{10 * c}" / "model.safetensors"))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def real_peak(run: Callable[[], object]) -> tuple[object, int]:
    """(run(), the process's peak RSS growth during it: VmHWM reset to VmRSS first; -1 off Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss0 = _status("VmRSS")
    except OSError:
        return run(), -1
    return run(), _status("VmHWM") - rss0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ckpts", type=int, default=8)
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--budget", default="48MB")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-svd", action="store_true", help="only the projections' comparison")
    ap.add_argument("--svd", choices=["exact", "fast"], default="fast", help="the features' SVD in the projections' comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budget = parse_size(args.budget)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, args.layers, args.hidden, args.ckpts)
        traj = load_full_trajectory(root / "ckpts", root / "base")
        on_disk = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        print(f"trajectory: {len(traj.checkpoints)} checkpoints + base, {len(traj.params)} parameters, "
              f"{on_disk / 1e6:.1f} MB of bf16 weights on disk; budget {budget / 1e6:.1f} MB; horizon {args.horizon}; "
              f"{args.threads} CPU thread(s)")
        compute_full_features(traj, args.horizon, svd="fast", budget=budget)  # one-time initialisation, not measured
        if not args.skip_svd:
            svd_table(traj, args.horizon, budget)
        projection_table(root, args.horizon, budget, args.svd)


def projection_table(root: Path, horizon: int, budget: int, svd: str) -> None:
    """The feature pass plus relex's projections on the backtest fold's start d = c - h, for rows 0..d: the
    projections computed by the feature pass (``project``) against a pass of their own, each on a freshly opened
    trajectory, twice in alternation."""
    def once(fused: bool) -> tuple[float, int, dict[str, torch.Tensor]]:
        traj = load_full_trajectory(root / "ckpts", root / "base")
        d = len(traj.checkpoints) - 1 - horizon
        reads = []
        real_read = type(traj).read_into

        def counted(self: FullTrajectory, row: int, names: list[str], out: torch.Tensor) -> torch.Tensor:
            reads.append(row)
            return real_read(self, row, names, out)

        type(traj).read_into = counted
        try:
            t0 = time.perf_counter()
            feats, _ = compute_full_features(traj, horizon, svd=svd, budget=budget, project=[d] if fused else ())
            directions = {m: (feats.get(m, "global", "u")[d].double(), feats.get(m, "global", "v")[d].double())
                          for m in feats.modules if not feats.is_vector(m)}
            a = projections(traj, directions, list(range(d + 1)), budget)
            return time.perf_counter() - t0, len(reads), a
        finally:
            type(traj).read_into = real_read

    runs = {fused: [] for fused in (False, True)}
    for _ in range(2):
        for fused in (False, True):
            runs[fused].append(once(fused))
    same = all(torch.equal(runs[False][0][2][m], runs[True][0][2][m]) for m in runs[False][0][2])
    print(f"\nrelex's projections on the fold's start, features by {svd} SVD (seconds of features + projections, two "
          "runs each, alternated; tensor reads)")
    print("| projections | seconds | tensor stacks read |\n|---|---|---|")
    for fused, label in ((False, "a pass of their own"), (True, "in the feature pass")):
        print(f"| {label} | {' / '.join(f'{s:.1f}' for s, _, _ in runs[fused])} | {runs[fused][0][1]} |")
    best = {fused: min(s for s, _, _ in r) for fused, r in runs.items()}
    print(f"fused over separate: {best[False] / best[True]:.2f}x faster (best of each); the same projections bit for bit: {same}")


def svd_table(traj: FullTrajectory, horizon: int, budget: int) -> None:
    """Exact against fast SVD features: time, accounted and real peak, sigma error."""
    compute_full_features(traj, horizon, svd="exact", budget=budget)  # one-time initialisation, not measured
    runs, real = {}, {}
    for svd in ("exact", "fast"):
        t0 = time.perf_counter()
        runs[svd], real[svd] = real_peak(lambda: compute_full_features(traj, horizon, svd=svd, budget=budget))
        runs[svd] = (*runs[svd], time.perf_counter() - t0)
    exact, fast = runs["exact"][0], runs["fast"][0]
    by_kind = {}
    for kind in ("global", "local", "target"):
        errors = []
        for m in (m for m in exact.modules if not exact.is_vector(m)):
            a, b = fast.get(m, kind, "sigma").double(), exact.get(m, kind, "sigma").double()
            ok = b > 0
            errors.append(((b[ok] - a[ok]).abs() / b[ok]).max())
        by_kind[kind] = float(torch.stack(errors).max())
    measured = max(by_kind.values())
    print("\n| svd | seconds | peak MB (accounted) | real peak MB (process RSS growth) | budget MB | batches | reads "
          "| max rel. sigma error vs exact | reported bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for svd, (_, st, sec) in runs.items():
        err = "0 (reference)" if svd == "exact" else f"{measured:.2e}"
        bound = "-" if svd == "exact" else f"{st.sigma_error_max:.2e}"
        print(f"| {svd} | {sec:.1f} | {st.peak / 1e6:.1f} | {real[svd] / 1e6:.1f} | {budget / 1e6:.1f} | {st.batches} | {st.reads} | {err} | {bound} |")
    print("fast, max rel. sigma error by delta kind: " + ", ".join(f"{k} {e:.1e}" for k, e in by_kind.items()))
    print(f"speed-up of fast over exact: {runs['exact'][2] / runs['fast'][2]:.1f}x; both peaks under the budget: "
          f"{all(st.peak <= budget for _, st, _ in runs.values())}; real peaks under the budget: "
          f"{all(0 <= r <= budget for r in real.values())}")


if __name__ == "__main__":
    main()
