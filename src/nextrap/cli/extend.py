"""`nextrap extend`: the jump, written as an adapter, a merged model, or a base with the jump folded in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from nextrap.cli.common import errors, out_console, print_json, status, warn
from nextrap.core.registry import REGISTRY

if TYPE_CHECKING:
    from nextrap.api.extend import ExtendResult


def extend(
    fit_dir: Path = typer.Option(Path("nextrap-fit"), "--fit", readable=False, help="Fit folder written by `nextrap fit`."),
    alpha: str = typer.Option(..., "--alpha", help="Jump size: 1.5, a list 1.0,1.5, a range 0.5:4.0:0.5 (one subfolder per value), or auto (lowest backtest error; 0 = don't jump)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    fmt: str = typer.Option("adapter", "--format", help="adapter (exact PEFT adapter: rank r+1 for next/relex, more for linear/expo) | merged (full HF model, needs --base) | base (the base model with the jump folded in, needs --base: resume checkpoint c itself on it at rank r, see nextrap.json resume_from)."),
    base: Optional[Path] = typer.Option(None, "--base", readable=False, help="Base model folder (HF, single or sharded safetensors) for --format merged or base."),
    method: str = typer.Option("auto", "--method", help="auto (the method with the lowest backtest error) | "
                               + " | ".join(f"{m.name} ({m.summary})" for m in REGISTRY) + "."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard for --format merged or base."),
    min_energy: float = typer.Option(0.0, "--min-energy", help="Jump only modules whose rank-1 energy σ1/Σσ is at least this (see `nextrap inspect`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Jump: write W_c + alpha * predicted move as an adapter or a merged model."""
    from nextrap.api.extend import extend as run_extend, parse_alphas  # here, not at the top: --help never loads torch
    from nextrap.runtime.distributed import world
    main_rank = world().is_main  # under torchrun, every rank writes its shards; rank 0 alone prints
    with errors():
        alphas = parse_alphas(alpha)
        with status("extending...", not as_json and main_rank):
            result = run_extend(fit_dir, alphas, out, fmt=fmt, base=base, method=method, overwrite=overwrite,
                                max_shard_size=max_shard_size, min_energy=min_energy)
        if main_rank:
            _report(result, as_json)


def _report(result: ExtendResult, as_json: bool) -> None:
    from nextrap.api.extend import alpha_folder

    for w in result.warnings:
        warn(w)
    if as_json:
        print_json(result.to_json())
        return
    if result.choice:  # the choice names a written alpha (the backtest's, or the best of those given)
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
