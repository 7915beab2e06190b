"""The ``nextrap`` command line: a thin layer over ``nextrap.fit`` and ``nextrap.extend``.

Exit codes: 0 success; 1 bad input or a refused result (one line on stderr, nothing written); 2 bad usage.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import NextrapError
from .extend import alpha_folder, extend as run_extend, parse_alphas
from .fit import FitResult, fit as run_fit

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Skip RLVR training steps: fit the rank-1 trajectory of saved checkpoints, then jump ahead (NExt).")
out_console = Console()
err_console = Console(stderr=True)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except NextrapError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(130) from None


@contextmanager
def _progress(enabled: bool) -> Iterator:
    """A rich progress bar on stderr; yields the (stage, done, total) callback the library expects."""
    if not enabled:
        yield None
        return
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=False) as bar:
        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)
        yield report


def _fit_summary(r: FitResult) -> None:
    table = Table(title=f"nextrap fit -> {r.out}", show_header=False, title_justify="left")
    table.add_row("checkpoints", f"{len(r.steps)} (steps {r.steps[0]} .. {r.steps[-1]})")
    table.add_row("LoRA modules", str(r.n_modules))
    table.add_row("horizon", f"{r.horizon} checkpoints")
    shown = [s for s in r.steps if r.energy_median[s] > 0]  # a step-0 adapter has no delta, hence no energy
    picks = dict.fromkeys([shown[0], shown[len(shown) // 2], shown[-1]]) if shown else {}
    table.add_row("rank-1 energy σ1/Σσ (median)", ", ".join(f"{r.energy_median[s]:.3f} at step {s}" for s in picks) or "n/a")
    for d, (first, last) in r.group_losses.items():
        table.add_row(f"predictor loss, length {d}", f"{first:.4g} -> {last:.4g}")
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items()))
    out_console.print(table)
    if not r.backtest:
        out_console.print("backtest: skipped (needs at least 2h + 1 checkpoints)")
        return
    bt = Table(title=f"backtest: fit on steps <= {r.backtest[0].from_step}, predict step {r.backtest[0].to_step} (alpha 1)",
               title_justify="left")
    bt.add_column("method")
    bt.add_column("error e", justify="right")
    bt.add_column("cosine", justify="right")
    bt.add_column("verdict")
    for b in r.backtest:
        verdict = "reference (best rank-1)" if b.method == "oracle-rank1" else ("closer than not jumping" if b.error < 1 else "[yellow]worse than not jumping[/]")
        bt.add_row(b.method, f"{b.error:.3f}", f"{b.cosine:+.3f}", verdict)
    out_console.print(bt)
    out_console.print("e = ||W_hat - W_true|| / ||W_from - W_true||; e < 1 beats standing still.", style="dim")


@app.command()
def fit(
    ckpts: Path = typer.Argument(..., help="Folder with one PEFT LoRA adapter per saved step (checkpoint-N, global_step_N, step_N, N, ...)."),
    out: Path = typer.Option(Path("nextrap-fit"), "--out", help="Fit folder to write."),
    horizon: int = typer.Option(5, "--horizon", help="How many checkpoints ahead to predict (paper: 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the predictor's initialisation."),
    epochs: int = typer.Option(1000, "--epochs", help="Predictor training epochs (one optimizer step each)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    sign_align: bool = typer.Option(True, "--sign-align/--no-sign-align", help="Align singular-vector signs across checkpoints (--no-sign-align = the reference code's behaviour)."),
    backtest: bool = typer.Option(True, "--backtest/--no-backtest", help="Refit on checkpoints up to c-h and measure how well step c is predicted."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
) -> None:
    """Compute rank-1 features of a LoRA trajectory and train the NExt predictor; writes the fit folder."""
    with _errors(), _progress(not as_json) as report:
        result = run_fit(ckpts, out, horizon=horizon, seed=seed, epochs=epochs, device=device, sign_align=sign_align,
                         run_backtest=backtest, overwrite=overwrite, progress=report)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        _fit_summary(result)


@app.command()
def extend(
    fit_dir: Path = typer.Option(Path("nextrap-fit"), "--fit", help="Fit folder written by `nextrap fit`."),
    alpha: str = typer.Option(..., "--alpha", help="Jump size: 1.5, a list 1.0,1.5, or a range 0.5:4.0:0.5 (one subfolder per value)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    fmt: str = typer.Option("adapter", "--format", help="adapter (PEFT adapter of rank r+1) | merged (full HF model, needs --base)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (HF, single or sharded safetensors) for --format merged."),
    method: str = typer.Option("next", "--method", help="next (NExt predictor) | linear (W_c + alpha (W_c - W_{c-h}))."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard for --format merged."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Jump: write W_c + alpha * predicted move as an adapter or a merged model."""
    with _errors():
        alphas = parse_alphas(alpha)
        with err_console.status("extending...") if not as_json else _nullcontext():
            result = run_extend(fit_dir, alphas, out, fmt=fmt, base=base, method=method, overwrite=overwrite,
                                max_shard_size=max_shard_size)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    table = Table(title=f"nextrap extend ({result.method}, {result.format}) from step {result.from_step}", title_justify="left")
    table.add_column("alpha", justify="right")
    table.add_column("folder")
    for a, folder in zip(result.alphas, result.folders):
        table.add_row(alpha_folder(a).removeprefix("alpha-"), str(folder))
    out_console.print(table)
    out_console.print(f"median predicted σ of the move: {result.to_json()['predicted_sigma_median']:.4g}; "
                      f"horizon {result.horizon} checkpoints", highlight=False)


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
