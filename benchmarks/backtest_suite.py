"""How well does each method predict the future of a trajectory? The backtest suite of issue 5.

For every trajectory (folders of LoRA checkpoints, e.g. ``nextrap grpo`` runs, and synthetic ones with known
rank-1 dynamics that this script writes) it fits every method on the checkpoints up to ``--from-step`` (default:
the last one with h checkpoints after it), jumps h checkpoints ahead, and prints against the true checkpoint:

    cosine    of the predicted move with the true move (all modules as one vector)
    e(alpha)  = ||W_from + alpha * move - W_true|| / ||W_from - W_true||   (1 = not jumping)
    best      the alpha minimising e on the true future (hindsight) and e there
    auto      the alpha the method's own backtest picks from the past alone (what `--alpha auto` would use:
              refit on checkpoints up to from - h, predict from), and e at that alpha on the true future
    fit s     seconds to fit the method's model on the past (0: nothing to fit)

with the rank-1 oracle (the true move's own best rank-1 part) and `auto` (`--method auto --alpha auto`: the
method and alpha with the lowest past backtest error, or no jump) as rows.

    .venv/bin/python benchmarks/backtest_suite.py .bench/seed-*/plain .bench/suite/* --synthetic --from-step 150
    .venv/bin/python benchmarks/backtest_suite.py fixtures/lora-trajectory --horizon 5
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextrap.methods.backtest import Terms, backtest, choose, jump_terms, oracle_terms
from nextrap.methods import METHODS, JumpContext, fit_models, jump
from nextrap.trajectories.opening import open_trajectory
from nextrap.methods.predictor import TrainSettings

ALPHAS = (0.5, 1.0, 1.5, 2.0)
SYNTHETIC = ("synthetic-turning", "synthetic-saturating", "synthetic-random-walk")


def write_synthetic(folder: Path, kind: str, seed: int = 0, steps: int = 200, every: int = 10) -> Path:
    """A LoRA trajectory (r 8, 4 layers x 4 modules of 64 x 64) with known dynamics, as PEFT adapters:

    - turning: the dominant direction u(t) turns 90 degrees over the run at constant speed, sigma ~ t^0.8, a
      second rank-1 part grows linearly at a third of the size, plus a small random walk (3% of the signal);
    - saturating: fixed directions, sigma ~ 1 - exp(-t / 80) (the move slows down), same small random walk;
    - random-walk: every factor a random walk, nothing to predict (the no-jump case).
    """
    g = torch.Generator().manual_seed(seed)
    m = n = 64
    r = 8
    names = [f"base_model.model.model.layers.{layer}.self_attn.{p}" for layer in range(4) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    setups = {}
    for name in names:
        a = torch.linalg.qr(torch.randn(n, r, generator=g))[0].T.contiguous()  # orthonormal rows: v_k = a[k]
        basis = torch.linalg.qr(torch.randn(m, 3, generator=g))[0]
        setups[name] = (a, basis)
    noise = {name: torch.zeros(m, r) for name in names}
    for step in range(0, steps + 1, every):
        t = step / steps
        tensors = {}
        for name in names:
            a, basis = setups[name]
            b = torch.zeros(m, r)
            if kind == "turning":
                angle = 0.5 * math.pi * t
                b[:, 0] = t ** 0.8 * (math.cos(angle) * basis[:, 0] + math.sin(angle) * basis[:, 1])
                b[:, 1] = t / 3 * basis[:, 2]
            elif kind == "saturating":
                b[:, 0] = (1 - math.exp(-step / 80)) * basis[:, 0]
                b[:, 1] = 0.3 * (1 - math.exp(-step / 40)) * basis[:, 1]
            elif kind != "random-walk":
                raise ValueError(kind)
            if step:
                scale = 0.03 if kind != "random-walk" else 0.1
                noise[name] += scale * torch.randn(m, r, generator=g) / math.sqrt(m * r) * math.sqrt(every / steps) * 4
            tensors[f"{name}.lora_A.weight"] = a.clone()
            tensors[f"{name}.lora_B.weight"] = (b + noise[name]) if step else torch.zeros(m, r)
        out = folder / f"step_{step}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    return folder


# Ideas for the NExt MLP measured beside the methods (--variants): (row name, sign-aligned features, lr)
VARIANTS = (("next-paper + sign alignment", True, None), ("next-paper + sign alignment, lr 1e-3", True, 1e-3))


def evaluate(folder: Path, horizon: int, from_step: int | None, settings: TrainSettings, variants: bool = False) -> list[dict]:
    traj = open_trajectory(folder)
    feats = traj.features(horizon, sign_align=False)
    steps = traj.steps
    if from_step is not None and from_step not in steps:
        raise SystemExit(f"{folder}: no checkpoint at step {from_step}")
    start = steps.index(from_step) if from_step is not None else len(steps) - 1 - horizon
    if start + horizon >= len(steps):
        raise SystemExit(f"{folder}: no checkpoint {horizon} after step {steps[start]}")
    past = feats.truncate(start + 1)
    models, fit_s = {}, {}
    for method in METHODS:
        t0 = time.perf_counter()
        models.update(fit_models(past, [method], settings, trajectory=traj))  # as `fit` does: rows <= start only
        fit_s[method] = time.perf_counter() - t0
    past_backtest = backtest(past, traj, settings)  # what --alpha auto / --method auto see at this point
    auto_alpha = {r.method: r.best_alpha for r in past_backtest}
    choice = choose(past_backtest)
    rows = []
    terms_by_method: dict[str, Terms] = {}
    for method in METHODS:
        terms = jump_terms(traj, jump(method, JumpContext(past, traj, start, models)), start, start + horizon)
        terms_by_method[method] = terms
        rows.append({"method": method, "terms": terms, "auto_alpha": auto_alpha[method], "fit_s": fit_s[method]})
    for name, aligned, lr in VARIANTS if variants else ():
        feats_v = past.aligned() if aligned else past
        t0 = time.perf_counter()
        model = fit_models(feats_v, ["next-paper"], replace(settings, lr=lr or settings.lr))
        seconds = time.perf_counter() - t0
        terms = jump_terms(traj, jump("next-paper", JumpContext(feats_v, traj, start, model)), start, start + horizon)
        rows.append({"method": name, "terms": terms, "auto_alpha": float("nan"), "fit_s": seconds})
    chosen = terms_by_method.get(choice.method, Terms(1.0, 0.0, 0.0)) if choice.alpha > 0 else Terms(1.0, 0.0, 0.0)
    rows.append({"method": f"auto ({choice.method if choice.alpha > 0 else 'no jump'})", "terms": chosen,
                 "auto_alpha": choice.alpha, "fit_s": sum(fit_s.values())})
    rows.append({"method": "oracle-rank1", "terms": oracle_terms(feats, traj, start), "auto_alpha": 1.0, "fit_s": 0.0})
    for row in rows:
        row.update(run=str(folder), from_step=steps[start], to_step=steps[start + horizon])
    return rows


def run_name(path: Path | str) -> str:
    """A trajectory's short name: the folder, or its parent for a pipeline's ``plain`` run."""
    path = Path(path)
    return path.parent.name if path.name == "plain" else path.name


def summarize(rows: list[dict]) -> str:
    """Two compact tables (trajectories x methods): e at the auto-chosen alpha, and cosine with the true move."""
    names = list(dict.fromkeys(run_name(r["run"]) for r in rows))
    methods = [m for m in dict.fromkeys(r["method"].split(" (")[0] for r in rows)]
    cell = {}
    for r in rows:
        run = run_name(r["run"])
        cell[run, r["method"].split(" (")[0]] = r
    out = []
    for title, key, fmt in (("e at the auto-chosen alpha (1 = no jump; lower is better)", "e_auto", "{:.3f}"),
                            ("cosine of the predicted move with the true move", "cosine", "{:+.3f}")):
        out += ["", title, "", "| trajectory | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
        for run in names:
            vals = []
            for m in methods:
                r = cell.get((run, m))
                v = None if r is None else r[key]
                text = "n/a" if v is None else fmt.format(v)
                if m == "auto" and r is not None and key == "e_auto":
                    text += f" ({r['method'].split('(')[1].rstrip(')')}, {r['auto_alpha']:g})"
                vals.append(text)
            out.append(f"| {run} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--synthetic", action="store_true", help=f"also write and evaluate {', '.join(SYNTHETIC)} (under .bench/synthetic)")
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--from-step", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=1000, help="next-paper's epochs (the paper: 1000)")
    ap.add_argument("--variants", action="store_true", help="also measure NExt MLP variants (sign alignment, lr 1e-3)")
    ap.add_argument("--json", type=Path, default=None, help="also write every row as JSON here")
    ap.add_argument("--summarize", type=Path, default=None, help="only print the compact tables of a previous --json")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(json.loads(args.summarize.read_text())))
        return
    runs = list(args.runs)
    if args.synthetic:
        for name in SYNTHETIC:
            folder = Path(".bench/synthetic") / name
            if not (folder / "step_200" / "adapter_config.json").is_file():
                write_synthetic(folder, name.removeprefix("synthetic-"))
            runs.append(folder)
    settings = TrainSettings(epochs=args.epochs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; horizon {args.horizon}; next-paper {args.epochs} epochs")
    header = ("| trajectory | from -> to | method | cosine | " + " | ".join(f"e({a:g})" for a in ALPHAS)
              + " | best alpha | e(best) | auto alpha | e(auto) | fit s |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    everything = []
    for folder in runs:
        for row in evaluate(folder, args.horizon, args.from_step, settings, args.variants):
            t: Terms = row["terms"]
            best = 1.0 if row["method"] == "oracle-rank1" else t.best_alpha()
            errs = " | ".join(f"{t.error(a):.3f}" for a in ALPHAS)
            name = run_name(folder)
            auto = "n/a | n/a" if math.isnan(row["auto_alpha"]) else f"{row['auto_alpha']:g} | {t.error(row['auto_alpha']):.3f}"
            print(f"| {name} | {row['from_step']} -> {row['to_step']} | {row['method']} | {t.cosine():+.3f} | {errs} | "
                  f"{best:g} | {t.error(best):.3f} | {auto} | {row['fit_s']:.1f} |", flush=True)
            everything.append({**{k: v for k, v in row.items() if k != "terms"}, "cosine": t.cosine(), "best_alpha": best,
                               "e_best": t.error(best), "e_auto": None if math.isnan(row["auto_alpha"]) else t.error(row["auto_alpha"]),
                               "e": {str(a): t.error(a) for a in ALPHAS}, "terms": vars(t)})
    print(summarize(everything))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
