"""The ``nextrap`` command line: a thin layer over ``nextrap.fit`` and ``nextrap.extend``.

Exit codes: 0 success; 1 bad input or a refused result (one line on stderr, nothing written); 2 bad usage.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import NextrapError, NextrapWarning, os_error
from .grpo_cli import (GRPO_DEFAULTS, Advantage, BatchPrompts, Data, Device, EvalData, EvalEvery, EvalPrompts, EvalSamples,
                       GroupSize, LoraAlpha, LoraR, Lr, MaxNewTokens, Model, Reward, SaveEvery, Seed, Task, TargetModules,
                       Temperature, grpo as grpo_cmd)
from .grpo_config import GRPOConfig
from .process import check_interrupted, command
from .progress import rich_progress
from .registry import METHODS

if TYPE_CHECKING:
    from .fit import FitResult
    from .pipeline import PipelineResult

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Skip RLVR training steps: fit the rank-1 trajectory of saved checkpoints, then jump ahead (NExt).")
app.command("grpo")(grpo_cmd)
out_console = Console(width=None if sys.stdout.isatty() else 120)  # tables stay readable in logs
err_console = Console(stderr=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Library errors (and any OSError) as one ``error:`` line and exit 1; the library's warnings (NextrapWarning)
    as one ``warning:`` line each, when they happen."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", NextrapWarning)
            shown = warnings.showwarning
            warnings.showwarning = lambda message, category, *rest: (
                _warn(str(message)) if issubclass(category, NextrapWarning) else shown(message, category, *rest))
            yield
    except (NextrapError, OSError) as e:
        check_interrupted()  # an error that a swallowed interrupt became is that interrupt
        message = os_error(e) if isinstance(e, OSError) else e
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def _warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _progress(enabled: bool):
    """A rich progress bar on stderr; yields the (stage, done, total) callback the library expects."""
    return rich_progress(err_console, enabled)


def _fit_summary(r: FitResult) -> None:
    from .backtest import MIN_GAIN  # here, not at the top: --help never loads torch
    table = Table(title=f"nextrap fit -> {r.out}", show_header=False, title_justify="left")
    table.add_row("checkpoints", f"{len(r.steps)} (steps {r.steps[0]} .. {r.steps[-1]})")
    table.add_row(r.units_label, str(r.n_modules))
    table.add_row("horizon", f"{r.horizon} checkpoints")
    shown = [s for s in r.steps if r.energy_median[s] > 0]  # a step-0 adapter has no delta, hence no energy
    picks = dict.fromkeys([shown[0], shown[len(shown) // 2], shown[-1]]) if shown else {}
    upper = " (upper bound, --svd fast)" if r.streaming.get("energy") == "upper bound" else ""
    table.add_row(f"rank-1 energy σ1/Σσ (median){upper}", ", ".join(f"{r.energy_median[s]:.3f} at step {s}" for s in picks) or "n/a")
    for d, (first, last) in r.group_losses.items():
        table.add_row(f"predictor loss, length {d}", f"{first:.4g} -> {last:.4g}")
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items()))
    st = r.streaming
    if st:
        table.add_row("streaming", (f"--svd {st['svd']}, " if "svd" in st else "")
                      + f"peak {st['peak_bytes'] / 1e6:.1f} MB of {st['max_memory_bytes'] / 1e6:.1f} MB"
                      + (f", sigma error <= {st['sigma_rel_error_max']:.1e}" if st.get("svd") == "fast" else ""))
    out_console.print(table)
    if not r.backtest:
        out_console.print(f"backtest: skipped ({r.backtest_skipped})", highlight=False)
        return
    first = r.backtest[0]
    folds = f", {first.folds} folds pooled" if first.folds > 1 else ""
    bt = Table(title=f"backtest: fit on steps <= {first.from_step}, predict step {first.to_step}{folds}", title_justify="left")
    for col in ("method", "e at alpha 1", "cosine", "best alpha", "e at best", "verdict"):
        bt.add_column(col, justify="left" if col in ("method", "verdict") else "right")
    for b in r.backtest:
        verdict = ("ceiling" if b.method == "oracle-rank1"
                   else "jump helps" if b.best_error <= 1 - MIN_GAIN and b.best_alpha > 0 else "[yellow]don't jump[/]")
        bt.add_row(b.method, f"{b.error:.3f}", f"{b.cosine:+.3f}", f"{b.best_alpha:g}", f"{b.best_error:.3f}", verdict)
    out_console.print(bt)
    out_console.print("e = ||W_hat - W_true|| / ||W_from - W_true||: 1 = standing still; \"jump helps\" = some alpha "
                      f"lands >= {MIN_GAIN:.0%} closer; ceiling = the true move's best rank-1 part.", style="dim")


# Input paths are declared readable=False: an unreadable input is the library's one-line error ("permission
# denied", exit 1), not click's usage error (exit 2).
@app.command()
def fit(
    ckpts: Path = typer.Argument(..., readable=False, help="Folder with one PEFT LoRA adapter per saved step (checkpoint-N, global_step_N, step_N, N, ...)."),
    out: Path = typer.Option(Path("nextrap-fit"), "--out", help="Fit folder to write."),
    horizon: int = typer.Option(5, "--horizon", help="How many checkpoints ahead to predict (paper: 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the predictor's initialisation."),
    epochs: int = typer.Option(1000, "--epochs", help="Predictor training epochs (one optimizer step each)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    sign_align: bool = typer.Option(True, "--sign-align/--no-sign-align", help="Align singular-vector signs across checkpoints (--no-sign-align = the reference code's behaviour)."),
    backtest: bool = typer.Option(True, "--backtest/--no-backtest", help="Refit on checkpoints up to c-h and measure how well step c is predicted."),
    backtest_folds: int = typer.Option(1, "--backtest-folds", help="Backtest from c-h, c-h-1, ... and pool the errors (each fold refits the models)."),
    methods: str = typer.Option(",".join(METHODS), "--methods", help="Methods to fit and backtest (leave out next-paper, the slow one, for a fit in seconds)."),
    base: Optional[Path] = typer.Option(None, "--base", readable=False, help="Full-parameter mode: CKPTS holds one Hugging Face model folder per step, and this is the model they started from."),
    svd: str = typer.Option("exact", "--svd", help="Full-parameter mode: exact (batched SVD) | fast (randomized top-1; its error bound is reported)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Peak memory budget for every pass that streams the checkpoints (LoRA and full-parameter), e.g. 2GB (default 8GB)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
) -> None:
    """Compute rank-1 features of a LoRA (or, with --base, full-parameter) trajectory and fit the methods; writes the fit folder."""
    from .distributed import world
    from .fit import fit as run_fit  # here, not at the top: --help never loads torch
    main_rank = world().is_main  # under torchrun, rank 0 alone shows progress and the result
    with _errors(), _progress(not as_json and main_rank) as report:
        result = run_fit(ckpts, out, horizon=horizon, seed=seed, epochs=epochs, device=device, sign_align=sign_align,
                         run_backtest=backtest, backtest_folds=backtest_folds, overwrite=overwrite, progress=report,
                         methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                         base=base, svd=svd, max_memory=max_memory)
    if not main_rank:
        return
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        _fit_summary(result)


@app.command()
def extend(
    fit_dir: Path = typer.Option(Path("nextrap-fit"), "--fit", readable=False, help="Fit folder written by `nextrap fit`."),
    alpha: str = typer.Option(..., "--alpha", help="Jump size: 1.5, a list 1.0,1.5, a range 0.5:4.0:0.5 (one subfolder per value), or auto (lowest backtest error; 0 = don't jump)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    fmt: str = typer.Option("adapter", "--format", help="adapter (exact PEFT adapter: rank r+1 for next/relex, more for linear/expo) | merged (full HF model, needs --base) | base (the base model with the jump folded in, needs --base: resume checkpoint c itself on it at rank r, see nextrap.json resume_from)."),
    base: Optional[Path] = typer.Option(None, "--base", readable=False, help="Base model folder (HF, single or sharded safetensors) for --format merged or base."),
    method: str = typer.Option("auto", "--method", help="auto (the method with the lowest backtest error) | next-paper (NExt as published) | next (our NExt variant) | "
                               "linear (W_c + a(W_c - W_{c-h})) | expo (W_c + a(W_c - W_0)) | relex (rank-1 line fit)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard for --format merged or base."),
    min_energy: float = typer.Option(0.0, "--min-energy", help="Jump only modules whose rank-1 energy σ1/Σσ is at least this (see `nextrap inspect`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Jump: write W_c + alpha * predicted move as an adapter or a merged model."""
    from .extend import alpha_folder, extend as run_extend, parse_alphas  # here, not at the top: --help never loads torch
    with _errors():
        alphas = parse_alphas(alpha)
        with err_console.status("extending...") if not as_json and err_console.is_terminal else nullcontext():
            result = run_extend(fit_dir, alphas, out, fmt=fmt, base=base, method=method, overwrite=overwrite,
                                max_shard_size=max_shard_size, min_energy=min_energy)
    for w in result.warnings:
        _warn(w)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    if result.choice:
        out_console.print(f"chose method [bold]{result.choice.method}[/], alpha [bold]{result.choice.alpha:g}[/]: {result.choice.reason}", highlight=False)
    table = Table(title=f"nextrap extend ({result.method}, {result.format}) from step {result.from_step}", title_justify="left")
    table.add_column("alpha", justify="right")
    table.add_column("backtest e", justify="right")
    table.add_column("folder")
    for a, folder in zip(result.alphas, result.folders):
        e = result.backtest_error.get(a)
        table.add_row(alpha_folder(a).removeprefix("alpha-"), "n/a" if e is None else f"{e:.3f}", str(folder))
    out_console.print(table)
    if result.resume_from:
        out_console.print(f"resume {result.resume_from['path']} (step {result.resume_from['step']}: its adapter, optimizer "
                          "and schedule) on this base model", highlight=False)
    median = result.to_json()["predicted_sigma_median"]
    out_console.print(f"median predicted σ of the move: {'n/a' if median is None else f'{median:.4g}'}; "
                      f"horizon {result.horizon} checkpoints", highlight=False)


@app.command("fold")
def fold_cmd(
    base: Path = typer.Argument(..., help="The base model the run started from (HF folder, single or sharded safetensors)."),
    jumps: Path = typer.Argument(..., help="The jumps a run saved in place (OUTPUT_DIR/nextrap-jumps from nextrap.integrations.trl.JumpCallback or nextrap grpo --jump-every)."),
    out: Path = typer.Option(..., "--out", help="Output folder: the base with the jumps added."),
    upto: Optional[int] = typer.Option(None, "--upto", help="Fold only the jumps made at steps <= this: the base of the checkpoint of that step (default: all)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Fold jumps saved during training into the base model, so that the adapters saved after them load (and resume) on it."""
    from .jumps import fold as run_fold  # here, not at the top: --help never loads torch
    with _errors():
        result = run_fold(base, jumps, out, upto=upto, max_shard_size=max_shard_size, overwrite=overwrite)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    out_console.print(f"folded the jumps of steps {', '.join(map(str, result.steps))} into {result.out} "
                      f"({result.shards} shard(s)): load checkpoints from step {result.steps[-1]} on it", highlight=False)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _r2_cell(summary: dict) -> str:
    if summary["median"] is None:
        return "n/a"
    return f"{summary['median']:+.2f} ({summary['frac_below']:.0%})"


@app.command("inspect")
def inspect_cmd(
    ckpts: Path = typer.Argument(..., readable=False, help="Folder with one PEFT LoRA adapter (or, with --base, one Hugging Face model) per saved step, as for `nextrap fit`."),
    base: Optional[Path] = typer.Option(None, "--base", readable=False, help="Full-parameter mode: the model the checkpoints started from (W_0), as for `nextrap fit --base`."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Peak memory budget for every pass that streams the checkpoints, e.g. 2GB (default 8GB)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG: rank-1 energy vs step per module type, and an R^2 histogram."),
    fit_checkpoints: Optional[int] = typer.Option(None, "--fit-checkpoints", help="Linearity check: fit lines on the first K checkpoints, predict the rest (default: the first 2/3)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
) -> None:
    """Describe a checkpoint folder and run the paper's diagnostics: rank-1 energy and linearity (R^2)."""
    from .diagnostics import PARTS, R2_THRESHOLD, diagnose, plot_diagnosis  # here, not at the top: --help never loads torch
    with _errors():
        with err_console.status("reading checkpoints...") if not as_json and err_console.is_terminal else nullcontext():
            d = diagnose(ckpts, fit_checkpoints=fit_checkpoints, base=base, max_memory=max_memory)
        if plot is not None:
            plot_diagnosis(d, plot)
    if as_json:
        print(json.dumps(d.to_json()))
        return
    j = d.to_json()
    table = Table(title=f"nextrap inspect {d.root}", show_header=False, title_justify="left")
    table.add_row("layout", f"{d.layout} ({d.trainer} folders)")
    table.add_row("checkpoints", f"{len(d.steps)} (steps {d.steps[0]} .. {d.steps[-1]})")
    table.add_row(d.units_label, f"{len(d.modules)}: " + ", ".join(f"{t} x{n}" for t, n in j["modules"]["types"].items()))
    if j["modules"]["ranks"]:
        table.add_row("ranks", ", ".join(str(r) for r in j["modules"]["ranks"]))
    table.add_row("dtypes", ", ".join(d.dtypes))
    table.add_row("size on disk", f"{_bytes(d.size_bytes)} ({d.weights_label} weights {_bytes(d.weights_bytes)})")
    out_console.print(table)

    shown = [i for i, e in enumerate(d.energy_overall) if e is not None]
    picks = list(dict.fromkeys(shown[int(k * (len(shown) - 1) / 4)] for k in range(5))) if shown else []
    energy = Table(title="rank-1 energy σ1/Σσ of W_i - W_0 (median over modules)", title_justify="left")
    energy.add_column("module type")
    for i in picks:
        energy.add_column(f"step {d.steps[i]}", justify="right")
    for name, values in [*sorted(d.energy_by_type.items()), ("all", d.energy_overall)]:
        energy.add_row(name, *(f"{values[i]:.3f}" if values[i] is not None else "n/a" for i in picks))
    out_console.print(energy)

    title = (f"linearity: straight line over steps {d.fit_steps[0]}..{d.fit_steps[-1]}, R^2 on steps "
             f"{d.predicted_steps[0]}..{d.predicted_steps[-1]}: median (share of modules with R^2 < {R2_THRESHOLD})"
             if d.fit_steps and d.predicted_steps else "linearity: needs at least 3 checkpoints")
    for by, label in (("type", "module type"), ("layer", "layer")):
        lin = Table(title=title if by == "type" else None, title_justify="left")
        lin.add_column(label)
        lin.add_column("modules", justify="right")
        for p in PARTS:
            lin.add_column("R² σ·u" if p == "u" else f"R² {'σ' if p == 'sigma' else p}", justify="right")
        for row in d.r2_summary(by):
            key = row[by]
            lin.add_row("-" if key is None else str(key), str(row["modules"]), *(_r2_cell(row[p]) for p in PARTS))
        if by == "layer":
            overall = d.r2_summary()[0] if d.modules else None
            if overall:
                lin.add_row("all", str(overall["modules"]), *(_r2_cell(overall[p]) for p in PARTS), style="bold")
        out_console.print(lin)
    out_console.print("The paper finds R^2 < 0.5 for over half of the parameters: a straight line is then a poor "
                      "predictor of the trajectory.", style="dim")
    if plot is not None:
        out_console.print(f"plot written to {plot}", highlight=False)


@app.command("push")
def push_cmd(
    folder: Path = typer.Argument(..., help="A `nextrap extend` output folder (holds nextrap.json)."),
    repo: str = typer.Option(..., "--repo", help="Hub model repo, ORG/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private (an existing repo keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if missing); default main."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and print the model card; no API calls."),
    token_env: str = typer.Option("HF_TOKEN", "--token-env", help="Environment variable with the token (else the cached `hf auth login`)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id of the base model for the card (default: from nextrap.json / adapter_config.json when it is a Hub id)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Upload a jumped checkpoint to the Hugging Face Hub with a provenance model card."""
    from .hub import push as run_push  # here, not at the top: --help never loads torch
    with _errors():
        with err_console.status("uploading...") if not (as_json or dry_run) and err_console.is_terminal else nullcontext():
            result = run_push(folder, repo, private=private, revision=revision, dry_run=dry_run, token_env=token_env,
                              base_model=base_model)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    table = Table(title=f"{'would upload' if dry_run else 'uploaded'} to {repo} ({revision or 'main'})", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        table.add_row(path, _bytes(size))
    table.add_row("total", _bytes(result.total_bytes), style="bold")
    out_console.print(table)
    if dry_run:
        out_console.print("model card (README.md):", style="bold")
        out_console.print(result.card, markup=False, highlight=False, soft_wrap=True)
        out_console.print("dry run: nothing was uploaded", style="dim")
    else:
        out_console.print(f"pushed to {result.repo_url or repo}" + (f"; commit {result.commit_url}" if result.commit_url else ""),
                          highlight=False)


@app.command("pipeline")
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
    from .extend import parse_alphas
    from .pipeline import PipelineConfig, plot as plot_pipeline, run_pipeline  # here, not at the top: --help never loads torch
    base = GRPOConfig(model=model, save_every=save_every, lr=lr, batch_prompts=batch_prompts, group_size=group_size,
                      temperature=temperature, max_new_tokens=max_new_tokens, advantage=advantage, device=device,
                      target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()), lora_r=lora_r, lora_alpha=lora_alpha, seed=seed, task=task, data=str(data) if data else None,
                      eval_data=str(eval_data) if eval_data else None, reward=reward, eval_every=eval_every,
                      eval_prompts=eval_prompts, eval_samples=eval_samples, select_prompts=select_prompts)
    with _errors():
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
    with _errors(), _progress(not as_json) as report:
        result = run_pipeline(cfg, progress=report, overwrite=overwrite)
        if plot_file is not None:
            plot_pipeline(result, plot_file)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    _pipeline_table(result)
    if plot_file is not None:
        out_console.print(f"plot written to {plot_file}", highlight=False)


def _pipeline_table(r: PipelineResult) -> None:
    from .pipeline import speedup  # here, not at the top: --help never loads torch
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


def main() -> None:
    """The console entry point: the commands, ended by SIGINT or SIGTERM with one line (``process.command``)."""
    with command():
        app()


if __name__ == "__main__":
    main()
