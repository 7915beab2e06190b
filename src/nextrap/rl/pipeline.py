"""``nextrap pipeline``: train -> jump -> train, with the controls that make a speed-up claim believable.

From one start (same model, same seed):

    plain        N steps of GRPO, uninterrupted (the reference; its step S1 + S2 is the budget-matched point)
    <method>     plain's first S1 steps, fit + extend at alpha, then S2 more steps        (S1 + S2 = 0.625 N)
    no jump      plain's first S1 steps, then S2 more steps exactly as the jumps continue (the restart control)
    true future  plain's checkpoint at S1 + h checkpoints, then S2 more steps (the ceiling of any predictor)
    optional:
    <method> (alpha by reward)  as <method>, alpha the candidate whose jumped model has the best mean reward on
                 prompts held out of training (``reward_alphas``, ``grpo.select_prompts``); its rollouts cost time
    <method> every K            S1 + S2 steps from the start, jumping in place every K steps (``schedules``:
                 ``nextrap grpo --jump-every``); its paired control is plain itself (same seed, same prompts)

How a jump continues (``jump_format``):

- ``base`` (default): ``extend --format base`` folds alpha * move into the base model, and the continuation
  resumes plain's checkpoint S1 itself on it: its adapter (rank r) and AdamW state, since
  W_S1 + alpha * move = (W_0 + alpha * move) + s B_S1 A_S1. The no-jump control is the same continuation on
  W_0: a jump and its control differ only in the base weights.
- ``adapter``: the jumped adapter (rank r + k: 1 column for next-paper and relex, 2r for linear, ...), and,
  since extra trainable rank can change training by itself, every distinct adapter shape among the jumps gets
  its own no-jump control with the same extra rank and zero effect (B columns 0, A rows random, as PEFT
  initialises LoRA).

Every continuation after S1 draws its prompts from the same continuation seed and keeps or resets the AdamW
state alike (``restart``). The restart's own cost shows as plain at S1 + S2 against no jump. Outputs stay in
``out`` (per-arm folders, ``pipeline.json``, an optional PNG). ``plain_from`` reuses a finished plain run of the
same configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from nextrap.writers.adapter import make_appended_rows_trainable
from nextrap.core.errors import NextrapError
from nextrap.api.plotting import pyplot
from nextrap.io.files import check_apart, check_replaceable, write_marker
from nextrap.api.extend import extend, plan
from nextrap.api.fit import fit, load_fit
from nextrap.rl.grpo import GRPOConfig, choose_alpha_by_reward, default_model_dir, train
from nextrap.methods import METHODS

Progress = Callable[[str, int, int], None]
RESTARTS = ("resume", "fresh")
JUMP_FORMATS = ("base", "adapter")


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
    jump_format: str = "base"  # base: checkpoint S1 resumes on the folded base | adapter: the rank-grown adapter
    schedules: tuple[int, ...] = ()  # jump-every values: per value and method, an arm of S1 + S2 steps jumping in place
    reward_alphas: tuple[float, ...] = ()  # per method, a jump at S1 with alpha chosen among these by reward

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
    jump_seconds: float = 0.0  # fit + extend, reward rollouts choosing alpha, in-run jumps: counted in the speed-up
    note: str = ""
    control: str = ""  # the arm to compare with, seed by seed: the no-jump arm, or "plain" (at this arm's last step)

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
    jump_format: str = "base"

    def to_json(self) -> dict[str, Any]:
        plain = self.arms[0]
        return {"out": str(self.out), "steps": self.steps, "s1": self.s1, "s2": self.s2, "horizon": self.horizon,
                "alpha": self.alpha, "jump_format": self.jump_format,
                "arms": [{**asdict(a), "final": a.final, **asdict(speedup(plain, a))} for a in self.arms],
                "backtest": self.backtest}


@dataclass
class Speedup:
    """An arm's result in plain's currency: the plain step whose accuracy it reached, over what it paid."""

    equivalent_plain_steps: float | None  # None: beyond plain's run (the arm ended above plain's last accuracy)
    cost_steps: float  # RL steps trained plus jump seconds (fit, extend, reward rollouts) in plain's seconds per step
    speedup: float | None  # equivalent_plain_steps / cost_steps (1 = as fast as plain)


def speedup(plain: Arm, arm: Arm, key: str = "eval_sampled_acc") -> Speedup:
    """Where ``plain``'s own accuracy curve (linear between evaluations) first reaches ``arm``'s final accuracy,
    and the speed-up that is over the RL steps ``arm`` spent, its jump time (``jump_seconds``) counted as steps."""
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
    if cfg.jump_format not in JUMP_FORMATS:
        raise NextrapError(f"--jump-format {cfg.jump_format}: use base or adapter")
    if cfg.jump_format == "base" and not _base_model(cfg).is_dir():
        raise NextrapError(f"--jump-format base folds the jump into the model's weights, so --model must be a local "
                           f"folder (got {_base_model(cfg)}); download it, or use --jump-format adapter")
    bad = [x for x in cfg.schedules if x <= 0 or x % k or x >= s1 + s2]
    if bad:
        raise NextrapError(f"--schedules {','.join(map(str, bad))}: each must be a multiple of --save-every {k} "
                           f"below S1 + S2 = {s1 + s2}")
    if cfg.reward_alphas and cfg.grpo.select_prompts < 1:
        raise NextrapError("--alpha-by-reward chooses alpha on prompts held out of training: give --select-prompts N "
                           "(e.g. 256; every arm, plain included, then trains without them)")
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
    """A plain run is reusable when it was trained with this configuration for at least ``cfg.steps`` steps
    (an option the run's nextrap did not have yet counts as its default)."""
    config_file = run / "grpo_config.json"
    if not config_file.is_file():
        raise NextrapError(f"--plain-from {run}: no grpo_config.json (not a `nextrap grpo` run)")
    saved = {**json.loads(json.dumps(asdict(GRPOConfig()))), **json.loads(config_file.read_text())}
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


def _base_model(cfg: PipelineConfig) -> Path:
    """The weights every arm starts from, into which ``jump_format`` base folds the jump."""
    return Path(cfg.grpo.init_model or cfg.grpo.model or default_model_dir())


def _adapter_shape(folder: Path) -> str:
    """What makes two adapters train alike: their rank and per-module ranks."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return json.dumps([config.get("r"), config.get("rank_pattern") or {}], sort_keys=True)


WORKSPACE = ("plain", "prefix", "fit", "jump-*", "cont-*", "pipeline.json")  # what a pipeline writes into --out


@dataclass
class _Start:
    """A continuation from S1: its arm, run folder, where it starts (grpo options) and what its jump cost."""

    name: str
    folder: str
    start: dict[str, str]  # init_adapter, and init_model for a jump folded into the base
    resume_from: Path  # the step folder whose AdamW state it carries (restart "resume")
    jump_seconds: float = 0.0
    note: str = ""
    method: str = ""
    shape: str = ""  # jump_format adapter: the adapter's shape, which picks its control
    control: str = ""


def run_pipeline(cfg: PipelineConfig, progress: Progress | None = None, overwrite: bool = False) -> PipelineResult:
    """Run every arm (see the module docstring) and write ``pipeline.json``; returns the results."""
    s1, s2 = cfg.schedule()
    _check(cfg, s1, s2)
    out = Path(cfg.out)
    # before anything is deleted: --overwrite must not remove the plain run (or data) the pipeline reads
    check_apart(out, {"--plain-from": cfg.plain_from, **cfg.grpo.inputs()})
    check_replaceable(out, overwrite)  # and only a workspace a pipeline marked (or an empty folder)
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
    at_s1 = out / "plain" / f"step_{s1}"
    folded = cfg.jump_format == "base"
    label = f"alpha {cfg.alpha:g}" if cfg.alpha is not None else "alpha auto"

    def jump(method: str, by_reward: bool) -> _Start:
        """Write the jump of ``method`` from S1 (alpha chosen by reward when asked) and say how to continue it."""
        t0 = time.perf_counter()
        alphas, note = (None if cfg.alpha is None else [cfg.alpha]), ""
        if by_reward:  # every candidate jumped in place from checkpoint S1 and scored on the held-out prompts
            chosen = plan(load_fit(out / "fit"), list(cfg.reward_alphas), method)
            alpha, scores = choose_alpha_by_reward(replace(cfg.grpo, init_adapter=str(at_s1)), chosen.factored(),
                                                   chosen.fit.trajectory.modules, chosen.alphas)
            alphas = [alpha]
            note = f"chose alpha {alpha:g} by reward (" + ", ".join(f"{a:g}: {r:.3f}" for a, r in scores.items()) + ")"
        folder = f"jump-{method}" + ("-reward" if by_reward else "")
        jumped = extend(out / "fit", alphas, out / folder, fmt=cfg.jump_format, base=_base_model(cfg) if folded else None,
                        method=method)
        if cfg.alpha is None and not by_reward:
            note = f"chose alpha {jumped.alphas[0]:g}"
        if folded:  # checkpoint S1 itself resumes on the base with the jump folded in
            start = {"init_model": str(out / folder), "init_adapter": str(at_s1)}
        else:
            if jumped.alphas == [0.0]:  # no jump: the appended rank must still be able to learn, as in a control
                make_appended_rows_trainable(out / folder, cfg.grpo.lora_r, seed=cfg.grpo.seed)
            start = {"init_adapter": str(out / folder)}
        name = f"{method} (alpha by reward)" if by_reward else f"{method} ({label})"
        return _Start(name, folder.replace("jump-", "cont-"), start, at_s1, fit_seconds + time.perf_counter() - t0, note,
                      method, "" if folded else _adapter_shape(out / folder))

    jumps = [jump(m, False) for m in cfg.methods] + [jump(m, True) for m in cfg.methods if cfg.reward_alphas]
    shapes: dict[str, str] = {}  # adapter shape -> the first method whose jump has it ("" on the folded base)
    for j in jumps:
        shapes.setdefault(j.shape, j.method)
    controls = {}
    for shape, method in shapes.items():
        folder = "jump-none" if len(shapes) == 1 else f"jump-none-{method}"
        controls[shape] = "no jump" if len(shapes) == 1 else f"no jump (rank of {method})"
        if folded:  # the same continuation of checkpoint S1, on the unjumped base
            start = {"init_adapter": str(at_s1)}
        else:  # the same extra rank as this method's jump with a zero move, that can still learn
            extend(out / "fit", [0.0], out / folder, method=method)
            make_appended_rows_trainable(out / folder, cfg.grpo.lora_r, seed=cfg.grpo.seed)
            start = {"init_adapter": str(out / folder)}
        jumps.append(_Start(controls[shape], folder.replace("jump-", "cont-"), start, at_s1, note="control"))
    for j in jumps:
        j.control = controls.get(j.shape, "") if j.note != "control" else ""
    future = out / "plain" / f"step_{s1 + h * k}"
    jumps.append(_Start(f"true future (step {s1 + h * k})", "cont-future", {"init_adapter": str(future)}, future,
                        note="ceiling"))

    # Every continuation draws the same prompts (a seed of its own: plain's would replay plain's first prompts).
    before_jump = [r for r in _curve(plain_rows, 0) if r["step"] < s1]
    for j in jumps:
        rows = grpo(j.folder, steps=s2, seed=cfg.grpo.seed + 1, **j.start,
                    resume_optimizer=str(j.resume_from) if cfg.restart == "resume" else None)
        # x = RL steps trained: the jump itself is free, so the continuation starts at S1
        arms.append(Arm(j.name, s1 + s2, before_jump + _curve(rows, s1), prefix_seconds + _seconds(rows), j.jump_seconds,
                        j.note, j.control))

    # Repeated jumps: from the start with plain's seed (so plain until the first jump), jumping in place
    for every in cfg.schedules:
        for method in cfg.methods:
            rows = grpo(f"cont-every{every}-{method}", steps=s1 + s2, jump_every=every, jump_method=method,
                        jump_alpha="auto" if cfg.alpha is None else repr(cfg.alpha), jump_horizon=h, jump_epochs=cfg.epochs)
            made = [r["jump"] for r in rows if "jump" in r]
            note = ", ".join(f"{j['step']}: alpha {j['alpha']:g}" for j in made if j["alpha"])
            arms.append(Arm(f"{method} every {every} ({label})", s1 + s2, _curve(rows, 0), _seconds(rows),
                            sum(j["seconds"] for j in made), f"jumped at {note}" if note else "no jump made", "plain"))

    result = PipelineResult(out, cfg.steps, s1, s2, h, cfg.alpha, arms, fitted.to_json()["backtest"], cfg.jump_format)
    (out / "pipeline.json").write_text(json.dumps({**result.to_json(), "config": _config_json(cfg)}, indent=2) + "\n")
    return result


def _config_json(cfg: PipelineConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["grpo"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d["grpo"].items()}
    d["methods"] = list(cfg.methods)
    d["schedules"], d["reward_alphas"] = list(cfg.schedules), list(cfg.reward_alphas)
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
