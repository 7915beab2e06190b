"""``nextrap pipeline``: train -> jump -> train, with the controls that make a speed-up claim believable.

From one start (same model, same seed):

    plain        N steps of GRPO, uninterrupted (the reference; its step S1 + S2 is the budget-matched point)
    <method>     plain's first S1 steps, fit + extend at alpha, then S2 more steps        (S1 + S2 = 0.625 N)
    no jump      plain's first S1 steps, "extend" at alpha 0, then S2 more steps (the restart control)
    true future  plain's checkpoint at S1 + h checkpoints, then S2 more steps (the ceiling of any predictor)

Every arm after S1 restarts the same way: load the adapter, keep or reset the AdamW state (``restart``), and
draw its prompts from the same continuation seed. A jump appends columns to the adapter (1 for next-paper and
relex, 2r for linear, ...), and extra trainable rank can change training by itself; so every distinct adapter
shape among the jumps gets its own no-jump control with the same extra rank and zero effect (B columns 0, A
rows random, as PEFT initialises LoRA): a jump and its control differ only in where they start from. The
restart's own cost shows as plain at S1 + S2 against no jump. Outputs stay in ``out`` (per-arm folders,
``pipeline.json``, an optional PNG). ``plain_from`` reuses a finished plain run of the same configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .adapter import make_appended_rows_trainable
from .errors import NextrapError
from .plotting import pyplot
from .files import check_replaceable, write_marker
from .extend import extend
from .fit import fit
from .grpo import GRPOConfig, train
from .methods import METHODS

Progress = Callable[[str, int, int], None]
RESTARTS = ("resume", "fresh")


@dataclass
class PipelineConfig:
    out: str = "pipeline"
    steps: int = 400  # N, the plain run
    s1: int | None = None  # steps before the jump; default 0.375 N rounded to a save
    s2: int | None = None  # steps after it; default 0.625 N - s1
    horizon: int = 5  # checkpoints the jump looks ahead (the paper: 5 = 50 steps)
    alpha: float | None = 1.5  # None: each method's backtest-chosen alpha (extend --alpha auto)
    methods: tuple[str, ...] = ("next-paper", "next")
    epochs: int = 1000  # NExt predictor epochs
    restart: str = "resume"  # resume: AdamW state carried over; fresh: new optimizer
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    plain_from: str | None = None  # a finished `nextrap grpo` run with this grpo config (>= steps) to reuse as plain

    def schedule(self) -> tuple[int, int]:
        k = self.grpo.save_every
        s1 = self.s1 if self.s1 is not None else max(k, round(0.375 * self.steps / k) * k)
        s2 = self.s2 if self.s2 is not None else round(0.625 * self.steps) - s1
        return s1, s2


@dataclass
class Arm:
    name: str
    rl_steps: int  # RL steps the schedule pays for (the ceiling's jump to plain's later checkpoint is free)
    curve: list[dict[str, float]]  # {"step": global step, eval_* ...}
    train_seconds: float  # sum of seconds_per_step over the steps this arm trained (its share of plain included)
    jump_seconds: float = 0.0  # fit + extend
    note: str = ""
    control: str = ""  # the name of the no-jump arm with the same adapter shape (for paired comparisons)

    @property
    def final(self) -> dict[str, float]:
        return self.curve[-1] if self.curve else {}


@dataclass
class PipelineResult:
    out: Path
    steps: int
    s1: int
    s2: int
    horizon: int
    alpha: float | None
    arms: list[Arm]
    backtest: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        plain = self.arms[0]
        return {"out": str(self.out), "steps": self.steps, "s1": self.s1, "s2": self.s2, "horizon": self.horizon,
                "alpha": self.alpha,
                "arms": [{**asdict(a), "final": a.final, **asdict(speedup(plain, a))} for a in self.arms],
                "backtest": self.backtest}


@dataclass
class Speedup:
    """An arm's result in plain's currency: the plain step whose accuracy it reached, over what it paid."""

    equivalent_plain_steps: float | None  # None: beyond plain's run (the arm ended above plain's last accuracy)
    cost_steps: float  # RL steps trained plus fit + extend seconds in plain's seconds per step
    speedup: float | None  # equivalent_plain_steps / cost_steps (1 = as fast as plain)


def speedup(plain: Arm, arm: Arm, key: str = "eval_sampled_acc") -> Speedup:
    """Where ``plain``'s own accuracy curve (linear between evaluations) first reaches ``arm``'s final accuracy,
    and the speed-up that is over the RL steps ``arm`` spent, its fit + extend time counted as steps."""
    per_step = plain.train_seconds / plain.rl_steps if plain.rl_steps and plain.train_seconds else 0.0
    cost = arm.rl_steps + (arm.jump_seconds / per_step if per_step else 0.0)
    if key not in arm.final:
        return Speedup(None, cost, None)
    equivalent = steps_to_reach(plain, float(arm.final[key]), key)
    return Speedup(equivalent, cost, equivalent / cost if equivalent is not None and cost > 0 else None)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _curve(rows: list[dict[str, Any]], offset: int) -> list[dict[str, float]]:
    return [{"step": r["step"] + offset, **{k: v for k, v in r.items() if k.startswith("eval_")}}
            for r in rows if "eval_sampled_acc" in r or "eval_greedy_acc" in r]


def _seconds(rows: list[dict[str, Any]], upto: int | None = None) -> float:
    return sum(r.get("seconds_per_step", 0.0) for r in rows if upto is None or r["step"] <= upto)


def _check(cfg: PipelineConfig, s1: int, s2: int) -> None:
    k = cfg.grpo.save_every
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise NextrapError(f"--methods {','.join(cfg.methods)}: choose from {', '.join(METHODS)}")
    if cfg.restart not in RESTARTS:
        raise NextrapError(f"--restart {cfg.restart}: use resume or fresh")
    if s1 % k or s1 <= 0:
        raise NextrapError(f"--s1 {s1}: must be a positive multiple of --save-every {k}")
    if s1 // k < cfg.horizon + 1:  # step 0 is the start, not a move: checkpoints k..s1 must hold one pair
        raise NextrapError(f"--s1 {s1}: the fit needs at least --horizon + 1 = {cfg.horizon + 1} saves after step 0 "
                           f"before the jump (have {s1 // k} with --save-every {k})")
    if cfg.alpha is None and s1 // k < 2 * cfg.horizon + 1:
        raise NextrapError(f"--alpha auto: the backtest needs 2 x --horizon + 1 = {2 * cfg.horizon + 1} saves after step 0 "
                           f"before the jump (have {s1 // k}); raise --s1 or lower --horizon")
    if s2 < 0 or s1 + cfg.horizon * k > cfg.steps:
        raise NextrapError(f"schedule s1 {s1} + horizon {cfg.horizon} x {k} steps must fit in --steps {cfg.steps}")
    if cfg.plain_from is not None:
        _check_plain(Path(cfg.plain_from), cfg)


_RUN_ONLY = ("out", "steps", "device", "eval_batch")  # may differ in a reusable plain run: not its math
_FROM_SCRATCH = ("init_adapter", "init_model", "resume_optimizer")  # a plain run starts from none of these


def _check_plain(run: Path, cfg: PipelineConfig) -> None:
    """A plain run is reusable when it was trained with this configuration for at least ``cfg.steps`` steps."""
    config_file = run / "grpo_config.json"
    if not config_file.is_file():
        raise NextrapError(f"--plain-from {run}: no grpo_config.json (not a `nextrap grpo` run)")
    saved = json.loads(config_file.read_text())
    wanted = json.loads(json.dumps(asdict(cfg.grpo)))  # tuples as lists, like the saved file
    wanted["target_modules"] = sorted(wanted["target_modules"])
    for key in _FROM_SCRATCH:
        if saved.get(key):
            raise NextrapError(f"{config_file}: {key} = {saved[key]!r}: a continued run, not a plain one")
    for key, value in wanted.items():
        if key not in _RUN_ONLY and key not in _FROM_SCRATCH and saved.get(key) != value:
            raise NextrapError(f"{config_file}: {key} = {saved.get(key)!r}, but this pipeline uses {value!r}")
    if saved.get("steps", 0) < cfg.steps or not (run / f"step_{cfg.steps}").is_dir():
        raise NextrapError(f"{run}: trained {saved.get('steps')} steps, fewer than --steps {cfg.steps} (or step_{cfg.steps} is missing)")


def _adapter_shape(folder: Path) -> str:
    """What makes two adapters train alike: their rank and per-module ranks."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return json.dumps([config.get("r"), config.get("rank_pattern") or {}], sort_keys=True)


WORKSPACE = ("plain", "prefix", "fit", "jump-*", "cont-*", "pipeline.json")  # what a pipeline writes into --out


def run_pipeline(cfg: PipelineConfig, progress: Progress | None = None, overwrite: bool = False) -> PipelineResult:
    """Run every arm (see the module docstring) and write ``pipeline.json``; returns the results."""
    s1, s2 = cfg.schedule()
    _check(cfg, s1, s2)
    out = Path(cfg.out)
    check_replaceable(out, overwrite)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_marker(out, "pipeline", trees=WORKSPACE)  # a workspace grows for hours: it owns these names whole
    k, h = cfg.grpo.save_every, cfg.horizon
    report = progress or (lambda *_: None)

    def grpo(name: str, **changes: Any) -> list[dict[str, Any]]:
        def step_progress(stage: str, done: int, total: int) -> None:
            report(name, done, total)
        train(replace(cfg.grpo, out=str(out / name), **changes), progress=step_progress)
        return _metrics(out / name)

    if cfg.plain_from is not None:
        os.symlink(Path(cfg.plain_from).absolute(), out / "plain", target_is_directory=True)
        plain_rows = [r for r in _metrics(out / "plain") if r["step"] <= cfg.steps]
    else:
        plain_rows = grpo("plain", steps=cfg.steps)
    arms = [Arm("plain", cfg.steps, _curve(plain_rows, 0), _seconds(plain_rows))]
    prefix_seconds = _seconds(plain_rows, s1)

    # The trajectory the jump sees: plain's checkpoints up to S1 (links, not copies).
    prefix = out / "prefix"
    prefix.mkdir()
    for step in range(0, s1 + 1, k):
        os.symlink((out / "plain" / f"step_{step}").absolute(), prefix / f"step_{step}", target_is_directory=True)
    t0 = time.perf_counter()
    fitted = fit(prefix, out=out / "fit", horizon=h, epochs=cfg.epochs, seed=cfg.grpo.seed, methods=cfg.methods,
                 progress=lambda stage, done, total: report(f"fit: {stage}", done, total))
    fit_seconds = time.perf_counter() - t0

    # Every continuation draws the same prompts (a seed of its own: plain's would replay plain's first prompts).
    # (arm name, folder, adapter to start from, optimizer state to carry, jump seconds, note, control arm)
    starts: list[tuple[str, str, Path, Path, float, str, str]] = []
    shapes: dict[str, str] = {}  # adapter shape -> the first method whose jump has it
    for method in cfg.methods:
        t0 = time.perf_counter()
        jumped = extend(out / "fit", None if cfg.alpha is None else [cfg.alpha], out / f"jump-{method}", method=method)
        if jumped.alphas == [0.0]:  # auto chose no jump: the appended rank must still be able to learn, as in a control
            make_appended_rows_trainable(out / f"jump-{method}", cfg.grpo.lora_r, seed=cfg.grpo.seed)
        label = f"alpha {cfg.alpha:g}" if cfg.alpha is not None else "alpha auto"
        note = "" if cfg.alpha is not None else f"chose alpha {jumped.alphas[0]:g}"
        shape = _adapter_shape(out / f"jump-{method}")
        shapes.setdefault(shape, method)
        starts.append((f"{method} ({label})", f"cont-{method}", out / f"jump-{method}",
                       out / "plain" / f"step_{s1}", fit_seconds + time.perf_counter() - t0, note, shape))
    controls = {}
    for shape, method in shapes.items():
        # the same extra rank as this method's jump with a zero move, that can still learn
        folder = "jump-none" if len(shapes) == 1 else f"jump-none-{method}"
        extend(out / "fit", [0.0], out / folder, method=method)
        make_appended_rows_trainable(out / folder, cfg.grpo.lora_r, seed=cfg.grpo.seed)
        controls[shape] = "no jump" if len(shapes) == 1 else f"no jump (rank of {method})"
        starts.append((controls[shape], folder.replace("jump-", "cont-"), out / folder, out / "plain" / f"step_{s1}", 0.0,
                       "control", ""))
    starts = [(*start[:6], controls.get(start[6], "")) for start in starts]
    future = out / "plain" / f"step_{s1 + h * k}"
    starts.append((f"true future (step {s1 + h * k})", "cont-future", future, future, 0.0, "ceiling", ""))

    before_jump = [r for r in _curve(plain_rows, 0) if r["step"] < s1]
    for name, folder, adapter, optimizer_from, jump_seconds, note, control in starts:
        rows = grpo(folder, steps=s2, seed=cfg.grpo.seed + 1, init_adapter=str(adapter),
                    resume_optimizer=str(optimizer_from) if cfg.restart == "resume" else None)
        # x = RL steps trained: the jump itself is free, so the continuation starts at S1
        arms.append(Arm(name, s1 + s2, before_jump + _curve(rows, s1), prefix_seconds + _seconds(rows), jump_seconds, note,
                        control))

    result = PipelineResult(out, cfg.steps, s1, s2, h, cfg.alpha, arms, fitted.to_json()["backtest"])
    (out / "pipeline.json").write_text(json.dumps({**result.to_json(), "config": _config_json(cfg)}, indent=2) + "\n")
    return result


def _config_json(cfg: PipelineConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["grpo"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d["grpo"].items()}
    d["methods"] = list(cfg.methods)
    d["plain_from"] = str(Path(cfg.plain_from).absolute()) if cfg.plain_from else None
    return d


def accuracy_at(arm: Arm, step: int, key: str = "eval_sampled_acc") -> float | None:
    """The arm's evaluated accuracy at ``step`` (None when not evaluated there)."""
    for row in arm.curve:
        if row["step"] == step and key in row:
            return float(row[key])
    return None


def steps_to_reach(arm: Arm, target: float, key: str = "eval_sampled_acc") -> float | None:
    """First RL step at which the arm's accuracy curve reaches ``target`` (linear interpolation between evals)."""
    pts = [(r["step"], r[key]) for r in arm.curve if key in r]
    for (s0, a0), (s1, a1) in zip(pts, pts[1:]):
        if a0 >= target:
            return float(s0)
        if a1 >= target:
            return s0 + (target - a0) / (a1 - a0) * (s1 - s0)
    return float(pts[-1][0]) if pts and pts[-1][1] >= target else None


def plot(result: PipelineResult, path: Path) -> None:
    """Accuracy (sampled, with its standard error, and greedy) against RL step for every arm."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in result.arms:
        pts = [r for r in arm.curve if "eval_sampled_acc" in r]
        xs = [r["step"] for r in pts]
        axes[0].errorbar(xs, [r["eval_sampled_acc"] for r in pts], yerr=[r.get("eval_sampled_se", 0) for r in pts],
                         label=arm.name, marker="o", ms=3, capsize=2)
        axes[1].plot([r["step"] for r in arm.curve], [r["eval_greedy_acc"] for r in arm.curve], marker="o", ms=3, label=arm.name)
    for ax, title in zip(axes, ("held-out sampled accuracy", "held-out greedy accuracy")):
        ax.axvline(result.s1, color="grey", ls=":", lw=1)
        ax.axvline(result.s1 + result.s2, color="grey", ls="--", lw=1)
        ax.set_xlabel("RL step")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
