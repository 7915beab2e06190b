"""`nextrap grpo`: the command-line face of nextrap.rl.grpo.train (a thin layer: options -> GRPOConfig).

Exit codes: 0 success; 1 bad input (one line on stderr); 2 bad usage (typer).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from nextrap.cli.common import errors, print_json
from nextrap.core.errors import NextrapError, os_error
from nextrap.io.files import check_replaceable, check_writable
from nextrap.runtime.progress import rich_progress
from nextrap.rl.grpo_config import ADVANTAGES, GRPOConfig

# The GRPO options `grpo` and `pipeline` share, declared once (their defaults are GRPOConfig's).
GRPO_DEFAULTS = GRPOConfig()
Model = Annotated[Optional[str], typer.Option("--model", help="HF model folder or hub id. Default: the embedded tiny addition model (fixtures/addition-lm).")]
SaveEvery = Annotated[int, typer.Option(help="Save an adapter every N steps (step 0 and the last step always).")]
Lr = Annotated[float, typer.Option(help="AdamW learning rate.")]
BatchPrompts = Annotated[int, typer.Option(help="Prompts per step.")]
GroupSize = Annotated[int, typer.Option(help="Sampled completions per prompt (>= 2).")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (training and sampled eval).")]
MaxNewTokens = Annotated[int, typer.Option(help="Completion length limit (4 fits the addition task).")]
LoraR = Annotated[int, typer.Option(help="LoRA rank (ignored with --init-adapter: the adapter's rank is kept).")]
LoraAlpha = Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / r).")]
TargetModules = Annotated[str, typer.Option(help="Comma list of linear layer names to adapt.")]
Seed = Annotated[int, typer.Option(help="Seed for prompt order, sampling and LoRA init.")]
Task = Annotated[str, typer.Option(help="Built-in task (addition); ignored with --data.")]
Data = Annotated[Optional[Path], typer.Option("--data", help='Training jsonl of {"prompt": ..., "answer": ...} rows.')]
EvalData = Annotated[Optional[Path], typer.Option("--eval-data", help="Held-out jsonl for eval with --data (default: no eval).")]
Reward = Annotated[Optional[str], typer.Option(help="Reward as module:function(completion, answer) -> float. Default: exact match for addition, nextrap.rl.tasks:math_reward for --data.")]
Advantage = Annotated[str, typer.Option(help=f"Advantage estimator: {' | '.join(ADVANTAGES)}.")]
EvalEvery = Annotated[Optional[int], typer.Option(help="Evaluate every N steps (default: at every save; 0: never).")]
EvalPrompts = Annotated[int, typer.Option(help="Held-out prompts per eval.")]
EvalSamples = Annotated[int, typer.Option(help="Samples per held-out prompt for sampled accuracy (0: greedy only).")]
Device = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")]


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out a run cannot write, or a non-empty one unless --overwrite and provably a grpo run's (its
    marker lists what it holds); then empty it, so stale step_N folders cannot mix into the new trajectory."""
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} exists and is not a folder")
    try:
        check_writable(out / "step_0")  # what a run writes first, inside --out
    except NextrapError as e:
        _fail(str(e))
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        _fail(f"--out {out} is not empty; pass --overwrite to replace its run, or pick another folder")
    try:
        check_replaceable(out, overwrite)
    except NextrapError as e:  # runs written before the marker existed have none: only their owner can tell
        _fail(f"{e}; a run of an older nextrap has no marker: delete it yourself, or choose another --out")
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def grpo(
    model: Model = GRPO_DEFAULTS.model,
    out: Annotated[Path, typer.Option("--out", help="Output folder for step_N/ adapters and metrics.jsonl.")] = Path("grpo-run"),
    steps: Annotated[int, typer.Option(help="Training steps (one batch of prompts each).")] = 400,
    save_every: SaveEvery = GRPO_DEFAULTS.save_every,
    lr: Lr = GRPO_DEFAULTS.lr,
    batch_prompts: BatchPrompts = GRPO_DEFAULTS.batch_prompts,
    group_size: GroupSize = GRPO_DEFAULTS.group_size,
    temperature: Temperature = GRPO_DEFAULTS.temperature,
    max_new_tokens: MaxNewTokens = GRPO_DEFAULTS.max_new_tokens,
    lora_r: LoraR = GRPO_DEFAULTS.lora_r,
    lora_alpha: LoraAlpha = GRPO_DEFAULTS.lora_alpha,
    target_modules: TargetModules = ",".join(GRPO_DEFAULTS.target_modules),
    seed: Seed = GRPO_DEFAULTS.seed,
    task: Task = GRPO_DEFAULTS.task,
    data: Data = None,
    eval_data: EvalData = None,
    reward: Reward = GRPO_DEFAULTS.reward,
    advantage: Advantage = GRPO_DEFAULTS.advantage,
    init_adapter: Annotated[Optional[Path], typer.Option("--init-adapter", help="Continue training this PEFT adapter folder (e.g. a jumped step, "
                                                                   "or with --init-model a checkpoint to resume on a folded base), any rank.")] = None,
    init_model: Annotated[Optional[Path], typer.Option("--init-model", help="Start from these full model weights: a merged jumped model, or with "
                                                                 "--init-adapter the base the adapter loads on (extend --format base, nextrap fold); the "
                                                                 "tokenizer comes from --model unless the folder has one.")] = None,
    resume_optimizer: Annotated[Optional[Path], typer.Option("--resume-optimizer", help="Step folder whose optimizer.safetensors to continue from (moments of a grown rank start at 0).")] = None,
    eval_every: EvalEvery = GRPO_DEFAULTS.eval_every,
    eval_prompts: EvalPrompts = GRPO_DEFAULTS.eval_prompts,
    eval_samples: EvalSamples = GRPO_DEFAULTS.eval_samples,
    device: Device = GRPO_DEFAULTS.device,
    jump_every: Annotated[int, typer.Option("--jump-every", help="Jump the LoRA base weights in place every K steps (a multiple of "
                                                "--save-every; not at the last step), fitted on the checkpoints since the last jump; saved under "
                                                "OUT/nextrap-jumps. 0: never.")] = 0,
    jump_method: Annotated[str, typer.Option("--jump-method", help="The jump's method, as extend --method (auto: the backtest's choice).")] = "auto",
    jump_alpha: Annotated[str, typer.Option("--jump-alpha", help="The jump's alpha: a number, auto (the backtest's), or reward:A,B,... "
                                                "(the candidate whose jumped model has the best mean reward on --select-prompts).")] = "auto",
    jump_horizon: Annotated[int, typer.Option("--jump-horizon", help="Checkpoints the jump's fit looks ahead.")] = 5,
    jump_epochs: Annotated[int, typer.Option("--jump-epochs", help="next-paper's predictor epochs in the jump's fit.")] = 1000,
    select_prompts: Annotated[int, typer.Option("--select-prompts", help="Hold the last N training prompts out of the training "
                                                    "stream, to choose --jump-alpha reward:... on.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in a non-empty --out (only a folder nextrap grpo marked as its run).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout at the end.")] = False,
) -> None:
    """Train LoRA with GRPO-style RLVR and save a PEFT adapter every --save-every steps: the trajectory nextrap extrapolates."""
    from nextrap.rl.grpo import train, validate  # here, not at the top: --help never loads torch
    config = GRPOConfig(
        model=model,
        out=str(out),
        steps=steps,
        save_every=save_every,
        lr=lr,
        batch_prompts=batch_prompts,
        group_size=group_size,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
        seed=seed,
        task=task,
        data=str(data) if data else None,
        eval_data=str(eval_data) if eval_data else None,
        reward=reward,
        advantage=advantage,
        init_adapter=str(init_adapter) if init_adapter else None,
        init_model=str(init_model) if init_model else None,
        resume_optimizer=str(resume_optimizer) if resume_optimizer else None,
        eval_every=eval_every,
        eval_prompts=eval_prompts,
        eval_samples=eval_samples,
        device=device,
        jump_every=jump_every,
        jump_method=jump_method,
        jump_alpha=jump_alpha,
        jump_horizon=jump_horizon,
        jump_epochs=jump_epochs,
        select_prompts=select_prompts,
    )
    try:  # bad options, and an --out holding or inside an input, fail before a previous run in --out is removed
        validate(config)
    except NextrapError as e:
        _fail(str(e))
    _prepare_out(out, overwrite)
    console = Console(stderr=True)
    try:
        with rich_progress(console, transient=json_out, remaining=True) as report:
            result = train(config, progress=report)
    except NextrapError as e:
        _fail(str(e))
    except OSError as e:
        _fail(str(os_error(e)))
    final_eval = result.evals[-1] if result.evals else None
    if json_out:
        summary = {
            "out": str(result.out),
            "steps": result.steps,
            "checkpoints": [str(p) for p in result.checkpoints],
            "seconds_per_step": result.seconds_per_step,
            "last_reward_mean": result.last_reward_mean,
            "final_eval": final_eval,
            "jumps": result.jumps,
            "config": asdict(config),
        }
        with errors():  # a full disk or a closed pipe: one line, exit 1
            print_json(summary)
        return
    console.print(f"{len(result.checkpoints)} adapters in {result.out} ({result.seconds_per_step:.2f} s/step)")
    for j in result.jumps:
        made = f"{j['method']} at alpha {j['alpha']:g}" if j["alpha"] else f"none ({j.get('error') or 'the backtest chose alpha 0'})"
        console.print(f"jump at step {j['step']}: {made} ({j['seconds']:.1f} s)", highlight=False)
    if final_eval:
        sampled = f", sampled {final_eval['eval_sampled_acc']:.3f}" if "eval_sampled_acc" in final_eval else ""
        console.print(f"held-out accuracy at step {final_eval['step']}: greedy {final_eval['eval_greedy_acc']:.3f}{sampled}")
