"""How well does each method predict the future of a trajectory? A backtest suite.

For every trajectory given (folders of LoRA checkpoints, e.g. ``nextrap grpo`` runs) it fits on the
checkpoints up to ``--from-step`` (default: the last one with h checkpoints after it), jumps h checkpoints
ahead with every method, and prints, against the true checkpoint there:

    cosine   of the predicted move with the true move
    e(alpha) = ||W_from + alpha * move - W_true|| / ||W_from - W_true||   at several alphas, and the best alpha

with the rank-1 oracle (the true move's own best rank-1 part) and no jump (e = 1) as references.

    .venv/bin/python benchmarks/backtest_suite.py RUN_DIR [RUN_DIR ...] [--from-step 150] [--horizon 5]
    .venv/bin/python benchmarks/backtest_suite.py fixtures/lora-trajectory --horizon 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nextrap.backtest import jump_terms, oracle_terms
from nextrap.checkpoints import load_trajectory
from nextrap.methods import METHODS, NEEDS_PREDICTOR, JumpContext, jump
from nextrap.predictor import TrainSettings, train
from nextrap.trajectory import compute_features

ALPHAS = (0.5, 1.0, 1.5, 2.0)


def evaluate(folder: Path, horizon: int, from_step: int | None, settings: TrainSettings, sign_align: bool) -> list[tuple]:
    traj = load_trajectory(folder)
    feats = compute_features(traj, horizon, sign_align=sign_align)
    steps = traj.steps
    start = steps.index(from_step) if from_step is not None else len(steps) - 1 - horizon
    if start + horizon >= len(steps):
        raise SystemExit(f"{folder}: no checkpoint {horizon} after step {steps[start]}")
    past = feats.truncate(start + 1)
    t0 = time.perf_counter()
    predictor = train(past, settings)
    fit_s = time.perf_counter() - t0
    rows = []
    for method in METHODS:
        j = jump(method, JumpContext(past, traj, start, predictor if method in NEEDS_PREDICTOR else None))
        rows.append((method, jump_terms(traj, j, start, start + horizon), fit_s if method in NEEDS_PREDICTOR else 0.0))
    rows.append(("oracle-rank1", oracle_terms(feats, traj, start), 0.0))
    return [(folder, steps[start], steps[start + horizon], *r) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--from-step", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--no-sign-align", action="store_true")
    args = ap.parse_args()
    settings = TrainSettings(epochs=args.epochs, lr=args.lr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; NExt: {args.epochs} epochs, lr {args.lr}, "
          f"sign alignment {'off' if args.no_sign_align else 'on'}")
    header = "| trajectory | from -> to | method | cosine | " + " | ".join(f"e({a:g})" for a in ALPHAS) + " | best alpha | e(best) | fit s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for folder in args.runs:
        for run, s0, s1, method, terms, fit_s in evaluate(folder, args.horizon, args.from_step, settings, not args.no_sign_align):
            best = 1.0 if method == "oracle-rank1" else terms.best_alpha()
            errs = " | ".join(f"{terms.error(a):.3f}" for a in ALPHAS)
            print(f"| {run} | {s0} -> {s1} | {method} | {terms.cosine():+.3f} | {errs} | {best:g} | "
                  f"{terms.error(best):.3f} | {fit_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
