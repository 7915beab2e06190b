"""`nextrap fit`: rank-1 features of a trajectory, the methods fitted, and their backtest."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from nextrap.cli.common import errors, out_console, print_json, progress
from nextrap.core.registry import METHODS

if TYPE_CHECKING:
    from nextrap.api.fit import FitResult


def _fit_summary(r: FitResult) -> None:
    from nextrap.methods.backtest import MIN_GAIN  # here, not at the top: --help never loads torch
    table = Table(title=f"nextrap fit -> {r.out}", show_header=False, title_justify="left")
    table.add_row("checkpoints", f"{len(r.steps)} (steps {r.steps[0]} .. {r.steps[-1]})")
    table.add_row(r.units_label, str(r.n_modules))
    table.add_row("horizon", f"{r.horizon} checkpoints")
    shown = [s for s in r.steps if r.energy_median[s] > 0]  # a step-0 adapter has no delta, hence no energy
    picks = dict.fromkeys([shown[0], shown[len(shown) // 2], shown[-1]]) if shown else {}
    upper = " (upper bound, --svd fast)" if r.streaming.get("energy") == "upper bound" else ""
    table.add_row(f"rank-1 energy σ1/Σσ (median){upper}", ", ".join(f"{r.energy_median[s]:.3f} at step {s}" for s in picks) or "n/a")
    for key, (first, last) in r.group_losses.items():
        table.add_row(f"predictor loss, {key}", f"{first:.4g} -> {last:.4g}")
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
    max_gpu_memory: Optional[str] = typer.Option(None, "--max-gpu-memory", help="With --device cuda: device memory budget for the streamed passes, e.g. 20GB (default 90% of the GPU's free memory); the passes hold at most the smaller of this and --max-memory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
) -> None:
    """Compute rank-1 features of a LoRA (or, with --base, full-parameter) trajectory and fit the methods; writes the fit folder."""
    from nextrap.runtime.distributed import world
    from nextrap.api.fit import fit as run_fit  # here, not at the top: --help never loads torch
    main_rank = world().is_main  # under torchrun, rank 0 alone shows progress and the result
    with errors():
        with progress(not as_json and main_rank) as report:
            result = run_fit(ckpts, out, horizon=horizon, seed=seed, epochs=epochs, device=device, sign_align=sign_align,
                             run_backtest=backtest, backtest_folds=backtest_folds, overwrite=overwrite, progress=report,
                             methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                             base=base, svd=svd, max_memory=max_memory, max_gpu_memory=max_gpu_memory)
        if not main_rank:
            return
        if as_json:
            print_json(result.to_json())
        else:
            _fit_summary(result)
