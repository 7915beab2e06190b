"""`nextrap pipeline`: train -> jump -> train against plain GRPO and its controls, on the bundled runner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from nextrap.api.plotting import plot_path, pyplot
from nextrap.cli.common import errors, out_console, print_json, progress, warn
from nextrap.cli.grpo import (GRPO_DEFAULTS, Advantage, BatchPrompts, Data, Device, EvalData, EvalEvery, EvalPrompts,
                              EvalSamples, GroupSize, LoraAlpha, LoraR, Lr, MaxNewTokens, Model, Reward, SaveEvery, Seed,
                              Task, TargetModules, Temperature)
from nextrap.core.errors import NextrapError, os_error
from nextrap.rl.grpo_config import GRPOConfig

if TYPE_CHECKING:
    from nextrap.rl.pipeline import PipelineResult


def pipeline_cmd(
    out: Path = typer.Option(Path("pipeline"), "--out", help="Workspace for every arm's run, the fit, the jumps and pipeline.json."),
    steps: int = typer.Option(400, "--steps", help="N: length of the plain GRPO run."),
    s1: Optional[int] = typer.Option(None, "--s1", help="Steps before the jump (default 0.375 N, on a save)."),
    s2: Optional[int] = typer.Option(None, "--s2", help="Steps after the jump (default 0.625 N - s1)."),
    save_every: SaveEvery = GRPO_DEFAULTS.save_every,
    horizon: int = typer.Option(5, "--horizon", help="Checkpoints the jump looks ahead."),
    alpha: str = typer.Option("1.5", "--alpha", help="Jump size for every method, or auto (each method's backtest-chosen alpha, 0 = no jump)."),
    methods: str = typer.Option("next-paper,next", "--methods", help="Comma list of extend methods to compare (next equals linear where its held-out pair says so)."),
    plain_from: Optional[Path] = typer.Option(None, "--plain-from", help="Reuse this finished `nextrap grpo` run (same settings, >= --steps) as the plain arm."),
    epochs: int = typer.Option(1000, "--epochs", help="NExt predictor epochs."),
    restart: str = typer.Option("resume", "--restart", help="resume: keep AdamW state across the jump | fresh: new optimizer."),
    jump_format: str = typer.Option("base", "--jump-format", help="base: fold the jump into the base model and resume checkpoint S1's "
                                    "own adapter (rank r) and AdamW state on it | adapter: the rank-grown jumped adapter, with rank-matched controls."),
    schedules: str = typer.Option("", "--schedules", help="Comma list of jump-every values K: per K and method, an arm of S1 + S2 steps "
                                  "from the start that jumps in place every K steps (nextrap grpo --jump-every)."),
    alpha_by_reward: Optional[str] = typer.Option(None, "--alpha-by-reward", help="Candidate alphas (0.5,1.0,1.5,2.0): per method, "
                                                  "also a jump at S1 with the candidate whose jumped model has the best mean reward on "
                                                  "--select-prompts; its rollouts count in the cost."),
    select_prompts: int = typer.Option(0, "--select-prompts", help="Hold the last N training prompts out of every arm's training "
                                       "stream (plain included), for --alpha-by-reward."),
    model: Model = GRPO_DEFAULTS.model,
    task: Task = GRPO_DEFAULTS.task,
    data: Data = None,
    eval_data: EvalData = None,
    reward: Reward = GRPO_DEFAULTS.reward,
    lr: Lr = GRPO_DEFAULTS.lr,
    batch_prompts: BatchPrompts = GRPO_DEFAULTS.batch_prompts,
    group_size: GroupSize = GRPO_DEFAULTS.group_size,
    temperature: Temperature = GRPO_DEFAULTS.temperature,
    max_new_tokens: MaxNewTokens = GRPO_DEFAULTS.max_new_tokens,
    target_modules: TargetModules = ",".join(GRPO_DEFAULTS.target_modules),
    advantage: Advantage = GRPO_DEFAULTS.advantage,
    device: Device = GRPO_DEFAULTS.device,
    lora_r: LoraR = GRPO_DEFAULTS.lora_r,
    lora_alpha: LoraAlpha = GRPO_DEFAULTS.lora_alpha,
    seed: Seed = GRPO_DEFAULTS.seed,
    eval_every: EvalEvery = GRPO_DEFAULTS.eval_every,
    eval_prompts: EvalPrompts = GRPO_DEFAULTS.eval_prompts,
    eval_samples: EvalSamples = GRPO_DEFAULTS.eval_samples,
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="PNG of accuracy against RL step for every arm."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Train -> jump -> train against plain GRPO, a no-jump restart and a jump to the true future."""
    from nextrap.api.extend import parse_alphas
    from nextrap.rl.pipeline import PipelineConfig, run_pipeline  # here, not at the top: --help never loads torch
    base = GRPOConfig(model=model, save_every=save_every, lr=lr, batch_prompts=batch_prompts, group_size=group_size,
                      temperature=temperature, max_new_tokens=max_new_tokens, advantage=advantage, device=device,
                      target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()), lora_r=lora_r, lora_alpha=lora_alpha, seed=seed, task=task, data=str(data) if data else None,
                      eval_data=str(eval_data) if eval_data else None, reward=reward, eval_every=eval_every,
                      eval_prompts=eval_prompts, eval_samples=eval_samples, select_prompts=select_prompts)
    with errors():
        alphas = parse_alphas(alpha)
        if alphas is not None and len(alphas) != 1:
            raise NextrapError(f"--alpha {alpha}: the pipeline takes one alpha (or auto)")
        candidates = parse_alphas(alpha_by_reward) if alpha_by_reward else []
        if candidates is None:
            raise NextrapError("--alpha-by-reward: list the candidate alphas, e.g. 0.5,1.0,1.5,2.0")
        try:
            every = tuple(int(x) for x in schedules.split(",") if x.strip())
        except ValueError:
            raise NextrapError(f"--schedules {schedules}: a comma list of step counts, e.g. 50,100") from None
    cfg = PipelineConfig(out=str(out), steps=steps, s1=s1, s2=s2, horizon=horizon, alpha=alphas[0] if alphas else None,
                         epochs=epochs, restart=restart, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                         grpo=base, plain_from=str(plain_from) if plain_from else None, jump_format=jump_format,
                         schedules=every, reward_alphas=tuple(candidates))
    with errors():
        if plot_file is not None:
            plot_file = _check_plot(plot_file, out, overwrite)
    with errors(), progress(not as_json) as report:
        result = run_pipeline(cfg, progress=report, overwrite=overwrite)
    unplotted = _save_plot(result, plot_file) if plot_file is not None else None
    if as_json:
        with errors():  # a full disk or a closed pipe: one line, exit 1
            print_json(result.to_json())
    else:
        _pipeline_table(result)
        if plot_file is not None and unplotted is None:
            out_console.print(f"plot written to {plot_file}", highlight=False)
    if unplotted is not None:  # after the results, where it is seen; they are printed and saved, so exit 0
        warn(unplotted)


def _check_plot(path: Path, out: Path, overwrite: bool) -> Path:
    """The file --plot writes (``plot_path``), refused before hours of training when it cannot be: a folder in its
    place, a folder that does not exist, an existing file without --overwrite, inside the workspace (which
    --overwrite replaces whole: only what the pipeline marked), or no matplotlib."""
    if out.resolve() in path.resolve().parents:
        raise NextrapError(f"--plot {path}: inside the workspace {out}, which --overwrite replaces whole; write the "
                           "plot outside it")
    path = plot_path(path, overwrite)
    pyplot()
    return path


def _save_plot(result: PipelineResult, path: Path) -> str | None:
    """Write the plot; why it could not be written (None: written). A failed plot costs the plot, never the
    results of the run before it."""
    from nextrap.rl.pipeline import plot as plot_pipeline  # here, not at the top: --help never loads torch
    try:
        plot_pipeline(result, path)
    except OSError as e:
        return f"--plot {path}: not written ({os_error(e)}); the results are in {result.out / 'pipeline.json'}"
    except (NextrapError, ValueError) as e:  # ValueError: a file type matplotlib cannot write
        return f"--plot {path}: not written ({e}); the results are in {result.out / 'pipeline.json'}"
    return None


def _pipeline_table(r: PipelineResult) -> None:
    from nextrap.rl.pipeline import speedup  # here, not at the top: --help never loads torch
    end = r.s1 + r.s2
    table = Table(title=f"train -> jump -> train: S1 {r.s1} + S2 {r.s2} steps vs plain {r.steps} (horizon {r.horizon}, "
                        f"jumps {'folded into the base' if r.jump_format == 'base' else 'as rank-grown adapters'})",
                  title_justify="left")
    for col in ("arm", "RL steps", "sampled acc", "greedy acc", "plain-equivalent steps", "speed-up", "train s",
                "jump s", "note"):
        table.add_column(col, justify="left" if col in ("arm", "note") else "right")
    plain = r.arms[0]
    rows = [(a.name, a.rl_steps, a.final, speedup(plain, a), a.train_seconds, a.jump_seconds, a.note) for a in r.arms]
    at_end = next((c for c in plain.curve if c["step"] == end), None)
    if at_end is not None:
        rows.insert(1, (f"plain at step {end}", end, at_end, None, None, 0.0, "same budget"))
    for name, n, final, sp, secs, jump_s, note in rows:
        acc = f"{final['eval_sampled_acc']:.3f} ± {final.get('eval_sampled_se', 0):.3f}" if "eval_sampled_acc" in final else "n/a"
        greedy = f"{final['eval_greedy_acc']:.3f}" if "eval_greedy_acc" in final else "n/a"
        eq = "" if sp is None else f">{plain.rl_steps}" if sp.equivalent_plain_steps is None else f"{sp.equivalent_plain_steps:.0f}"
        gain = "" if sp is None or sp.speedup is None else f"{sp.speedup:.2f}x"
        table.add_row(name, str(n), acc, greedy, eq, gain, "" if secs is None else f"{secs:.0f}",
                      f"{jump_s:.1f}" if jump_s else "", note)
    out_console.print(table)
    no_jump = next((a for a in r.arms if a.note == "control"), None)
    if at_end is not None and no_jump is not None and "eval_sampled_acc" in no_jump.final and "eval_sampled_acc" in at_end:
        cost = at_end["eval_sampled_acc"] - no_jump.final["eval_sampled_acc"]
        out_console.print(f"restart cost (plain at {end} minus no jump): {cost:+.3f} sampled accuracy", highlight=False)
    out_console.print("control: the last checkpoint restarted exactly like the jumps; ceiling: a jump to plain's own "
                      "checkpoint h later; 'every K': jumps in place every K steps from the start (its control is plain "
                      "at the same step). plain-equivalent steps: where plain's own curve reaches the arm's final "
                      "sampled accuracy; speed-up: that over the RL steps spent, jump s (fit, extend, reward rollouts) "
                      "counted as steps. train s: seconds in RL steps (the shared first S1 included).", style="dim")
