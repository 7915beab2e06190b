"""How much better than a straight line can any predictor built from the past be? A hindsight ceiling.

For a LoRA trajectory and a start checkpoint c, the true next move is T = W_{c+h} - W_c. A straight line
predicts D = W_c - W_{c-h}. This script fits, *on the true future itself* (least squares, so an upper bound
that no real method reaches), the best combination of moves that are known at c:

    D          the last h-checkpoint move (linear)
    Dprev      the h-checkpoint move before it, W_{c-h} - W_{c-2h}
    G, r1(G)   the whole update so far and its rank-1 part (expo, the paper's global input)
    r1(L)      the rank-1 part of the last local move (the paper's local input)
    r1(D)      the rank-1 part of D

and prints the cosine with T each combination could reach, next to the rank-1 oracle (T's own top singular
part). Best e over alpha is sqrt(1 - cosine^2), so cosine is the whole story for a fixed direction. The last
column, alpha*, is the straight line's best alpha <D, T> / ||D||^2: how big the next move is next to the last.

    .venv/bin/python benchmarks/span_ceiling.py .bench/seed-0/plain --from-steps 100 150 200 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nextrap.io.checkpoints import load_trajectory, shape_groups
from nextrap.core.lowrank import top1_dense

SETS = (("D",), ("r1D",), ("D", "r1D"), ("D", "Dprev"), ("D", "G", "r1G"), ("D", "r1L"), ("D", "Dprev", "G", "r1G", "r1L", "r1D"))


def _rank1(mats: list[torch.Tensor]) -> torch.Tensor:
    out = []
    for m in mats:
        r1 = top1_dense(m)
        out.append((r1.sigma[:, None, None] * r1.u[:, :, None] * r1.v[:, None, :]).flatten())
    return torch.cat(out)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x @ y) / (x.norm() * y.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--from-steps", type=int, nargs="+", default=[150])
    ap.add_argument("--horizon", type=int, default=5)
    args = ap.parse_args()
    h = args.horizon
    print("| trajectory | from -> to | " + " | ".join("+".join(s) for s in SETS) + " | oracle rank-1 | alpha* |")
    print("|" + "---|" * (len(SETS) + 4))
    for run in [r for r in args.runs if r.is_dir()]:
        traj = load_trajectory(run)
        groups = list(shape_groups(traj.modules).values())

        def weights(i: int) -> list[torch.Tensor]:
            out = []
            for g in groups:
                b, a = traj.factors(i, g)
                out.append(traj.scales(g)[:, None, None] * (b @ a))
            return out

        for step in args.from_steps:
            if step not in traj.steps or traj.steps.index(step) + h >= len(traj.steps) or traj.steps.index(step) < 2 * h:
                continue
            c = traj.steps.index(step)
            w = {i: weights(i) for i in (c - 2 * h, c - h, c - 1, c, c + h)}
            diff = lambda i, j: [a - b for a, b in zip(w[i], w[j])]  # noqa: E731
            flat = lambda ms: torch.cat([m.flatten() for m in ms])  # noqa: E731
            target = flat(diff(c + h, c))
            cands = {"D": flat(diff(c, c - h)), "Dprev": flat(diff(c - h, c - 2 * h)), "G": flat(w[c]),
                     "r1G": _rank1(w[c]), "r1L": _rank1(diff(c, c - 1)), "r1D": _rank1(diff(c, c - h))}
            cells = []
            for keys in SETS:
                x = torch.stack([cands[k] / cands[k].norm() for k in keys])  # unit columns: a well-posed solve
                coef = torch.linalg.solve(x @ x.T, x @ target)
                cells.append(f"{_cos(coef @ x, target):+.3f}")
            oracle = _cos(_rank1(diff(c + h, c)), target)
            name = run.name if run.name != "plain" else run.parent.name
            d = cands["D"]
            alpha = float(d @ target / (d @ d))
            print(f"| {name} | {step} -> {traj.steps[c + h]} | " + " | ".join(cells) + f" | {oracle:+.3f} | {alpha:.2f} |", flush=True)


if __name__ == "__main__":
    main()
