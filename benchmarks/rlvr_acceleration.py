"""Does jumping save RL steps? The train -> jump -> train comparison over paired seeds.

For each seed, ``nextrap.rl.pipeline.run_pipeline`` runs, from the embedded default (tiny Llama, 2-digit
addition): plain GRPO for N steps; S1 steps + jump (``--methods``, by default folded into the base so that
checkpoint S1's own adapter and AdamW state go on) + S2 steps (S1 + S2 = 0.625 N); the no-jump control
continued exactly like the jumps; a jump to plain's own checkpoint h later (the ceiling); optionally a jump
whose alpha is chosen by reward on held-out prompts (``--alpha-by-reward``, ``--select-prompts``) and arms of
S1 + S2 steps that jump in place every K steps (``--schedules``). It prints mean +- standard error over seeds
of held-out accuracy (1000 prompts x 8 samples, and greedy), the plain-equivalent steps and the speed-up (jump
time counted as steps), and per arm the RL steps it needed to reach plain GRPO's accuracy at N.

    .venv/bin/python benchmarks/rlvr_acceleration.py --seeds 0 1 2 3 [--steps 400] [--work .bench]
    # the same plain runs, other arms: reuse them (WORK2/seed-S/plain links to .bench/seed-S/plain)
    .venv/bin/python benchmarks/rlvr_acceleration.py --work .bench/auto --alpha auto --plain-from '.bench/seed-{seed}/plain'
    # the issue-11 arms (benchmarks/acceleration_study.sh runs them at full size)
    .venv/bin/python benchmarks/rlvr_acceleration.py --methods next-paper,linear --alpha 1.5 --schedules 50 \
        --alpha-by-reward 0.5,1.0,1.5,2.0 --select-prompts 256

Every jump is compared, seed by seed, with the no-jump control that has the same adapter shape (extra rank),
and every schedule with plain at the same step.

Per-seed results are kept in WORK/seed-S/pipeline.json; a rerun reuses finished seeds (``--fresh`` to redo).
About 10 minutes per seed on 2 CPU cores at the default settings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from nextrap.rl.grpo import GRPOConfig
from nextrap.rl.pipeline import Arm, PipelineConfig, accuracy_at, run_pipeline, speedup, steps_to_reach

KEY = "eval_sampled_acc"


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    folder = Path(args.work) / f"seed-{seed}"
    if (folder / "pipeline.json").is_file() and not args.fresh:
        return json.loads((folder / "pipeline.json").read_text())
    grpo = GRPOConfig(seed=seed, save_every=args.save_every, eval_every=args.eval_every, eval_prompts=args.eval_prompts,
                      eval_samples=args.eval_samples, select_prompts=args.select_prompts, batch_prompts=args.batch_prompts)
    alpha = None if args.alpha == "auto" else float(args.alpha)
    plain = args.plain_from.format(seed=seed) if args.plain_from else None
    cfg = PipelineConfig(out=str(folder), steps=args.steps, s1=args.s1, s2=args.s2, horizon=args.horizon, alpha=alpha,
                         epochs=args.epochs, methods=tuple(args.methods.split(",")), restart=args.restart, grpo=grpo,
                         plain_from=plain, jump_format=args.jump_format,
                         schedules=tuple(int(x) for x in args.schedules.split(",") if x),
                         reward_alphas=tuple(float(x) for x in args.alpha_by_reward.split(",") if x))
    t0 = time.perf_counter()
    run_pipeline(cfg, overwrite=True)
    print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((folder / "pipeline.json").read_text())


def _mean_se(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "n/a"
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {se:.{digits}f}"


def summarize(results: list[dict]) -> str:
    first = results[0]
    n, s1, s2 = first["steps"], first["s1"], first["s2"]
    names = [a["name"] for a in first["arms"]]
    lines = [f"seeds: {len(results)}; plain N = {n}; jump at S1 = {s1}, then S2 = {s2} (S1 + S2 = {s1 + s2}); "
             f"horizon {first['horizon']} checkpoints; alpha {first['alpha']}; jumps "
             f"{'as rank-grown adapters' if first.get('jump_format') == 'adapter' else 'folded into the base'}",
             "",
             "| arm | RL steps | sampled acc | greedy acc | plain-equivalent steps | speed-up | steps to reach plain@N (per seed) | jump s |",
             "|---|---|---|---|---|---|---|---|"]
    rows: dict[str, dict[str, list]] = {}
    for res in results:
        arms = [Arm(**{k: a[k] for k in ("name", "rl_steps", "curve", "train_seconds", "jump_seconds", "note")},
                    control=a.get("control", "")) for a in res["arms"]]
        plain = arms[0]
        target = plain.final[KEY]
        at_end = next((c for c in plain.curve if c["step"] == s1 + s2), None)
        entries = [(f"plain at {s1 + s2} (same budget)", s1 + s2, at_end, None, 0.0)] if at_end else []
        entries += [(a.name, a.rl_steps, a.final, a, a.jump_seconds) for a in arms]
        for name, steps, final, arm, jump_s in entries:
            row = rows.setdefault(name, {"steps": steps, "sampled": [], "greedy": [], "reach": [], "jump": [], "notes": [],
                                         "equivalent": [], "speedup": [], "beyond": 0,
                                         "control": arm.control if arm is not None else ""})
            if arm is not None:  # speed-up: plain's own curve, this seed, reaching the arm's final accuracy
                sp = speedup(plain, arm)
                if sp.speedup is None:
                    row["beyond"] += 1
                else:
                    row["equivalent"].append(sp.equivalent_plain_steps)
                    row["speedup"].append(sp.speedup)
            row["notes"].append(arm.note if arm is not None else "")
            row["sampled"].append(final[KEY])
            row["greedy"].append(final["eval_greedy_acc"])
            row["jump"].append(jump_s)
            reach = steps_to_reach(arm, target) if arm is not None else None
            row["reach"].append("-" if arm is None else (f"{reach:.0f}" if reach is not None else f">{arm.rl_steps}"))
    order = [names[0], *[k for k in rows if k.startswith("plain at")], *names[1:]]
    for name in order:
        row = rows[name]
        jump = f"{statistics.mean(row['jump']):.0f}" if any(row["jump"]) else ""
        beyond = f" ({row['beyond']} beyond plain's run)" if row["beyond"] else ""
        lines.append(f"| {name} | {row['steps']} | {_mean_se(row['sampled'])} | {_mean_se(row['greedy'])} | "
                     f"{_mean_se(row['equivalent'], 0)}{beyond} | {_mean_se(row['speedup'], 2)} | "
                     f"{', '.join(row['reach'])} | {jump} |")
    notes = {name: row["notes"] for name, row in rows.items() if any(n and n not in ("control", "ceiling") for n in row["notes"])}
    if notes:
        lines += ["", "per seed: " + "; ".join(f"{name}: {', '.join(n)}" for name, n in notes.items())]
    # paired differences, seed by seed, against that seed's no-jump control with the same adapter shape
    diffs: dict[str, list[float]] = {}
    for res in results:
        arms = {a["name"]: a for a in res["arms"]}
        controls = [a for a in res["arms"] if a.get("note") == "control"]
        plain_end = next((c for c in res["arms"][0]["curve"] if c["step"] == s1 + s2), None)
        plain = Arm(**{k: res["arms"][0][k] for k in ("name", "rl_steps", "curve", "train_seconds")})
        for a in res["arms"][1:]:
            if a.get("control") == "plain":  # a schedule: plain itself until its first jump, so plain at its last step
                end = a["curve"][-1]["step"]
                at = accuracy_at(plain, end)
                if at is not None:
                    diffs.setdefault(f"{a['name']} minus plain at {end}", []).append(a["final"][KEY] - at)
                continue
            if a.get("note") == "control" or not controls:
                continue
            control = arms.get(a.get("control") or "", controls[0])
            diffs.setdefault(f"{a['name']} minus {control['name']}", []).append(a["final"][KEY] - control["final"][KEY])
        if plain_end and controls:
            diffs.setdefault(f"restart cost (plain at {s1 + s2} minus {controls[0]['name']})", []).append(
                plain_end[KEY] - controls[0]["final"][KEY])
    if diffs:
        lines += ["", "paired difference in final sampled accuracy, seed by seed against the no-jump control with the "
                      "same adapter shape, or for a schedule plain at the same step (mean ± se over seeds; n = seeds):"]
        lines += [f"- {name}: {_mean_se(values)} (n = {len(values)})" for name, values in diffs.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--s1", type=int, default=None, help="steps before the jump (default 0.375 N)")
    ap.add_argument("--s2", type=int, default=None, help="steps after it (default 0.625 N - S1)")
    ap.add_argument("--batch-prompts", type=int, default=64)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-prompts", type=int, default=1000)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--alpha", default="1.5", help="a number, or auto (each method's backtest-chosen alpha)")
    ap.add_argument("--plain-from", default=None, help="reuse finished plain runs: a path with {seed}, e.g. '.bench/seed-{seed}/plain'")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--methods", default="next-paper,next")
    ap.add_argument("--restart", default="resume")
    ap.add_argument("--jump-format", default="base", help="base (checkpoint S1 resumes on the folded base) or adapter")
    ap.add_argument("--schedules", default="", help="jump-every values, e.g. 50,100: arms jumping in place every K steps")
    ap.add_argument("--alpha-by-reward", default="", help="candidate alphas, e.g. 0.5,1.0,1.5,2.0 (needs --select-prompts)")
    ap.add_argument("--select-prompts", type=int, default=0, help="training prompts held out of every arm for --alpha-by-reward")
    ap.add_argument("--work", default=".bench")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = [run_seed(s, args) for s in args.seeds]
    print(summarize(results))


if __name__ == "__main__":
    main()
