"""`nextrap inspect`: what a checkpoint folder holds, and the paper's diagnostics (rank-1 energy, linearity)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from nextrap.cli.common import errors, human_bytes, out_console, print_json, status

if TYPE_CHECKING:
    from nextrap.api.diagnostics import Diagnosis


def _r2_cell(summary: dict) -> str:
    if summary["median"] is None:
        return "n/a"
    return f"{summary['median']:+.2f} ({summary['frac_below']:.0%})"


def inspect_cmd(
    ckpts: Path = typer.Argument(..., readable=False, help="Folder with one PEFT LoRA adapter (or, with --base, one Hugging Face model) per saved step, as for `nextrap fit`."),
    base: Optional[Path] = typer.Option(None, "--base", readable=False, help="Full-parameter mode: the model the checkpoints started from (W_0), as for `nextrap fit --base`."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Peak memory budget for every pass that streams the checkpoints, e.g. 2GB (default 8GB)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG (.png is added to a name without a suffix): rank-1 energy vs step per module type, and an R^2 histogram."),
    fit_checkpoints: Optional[int] = typer.Option(None, "--fit-checkpoints", help="Linearity check: fit lines on the first K checkpoints, predict the rest (default: the first 2/3)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --plot file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
) -> None:
    """Describe a checkpoint folder and run the paper's diagnostics: rank-1 energy and linearity (R^2)."""
    from nextrap.api.diagnostics import diagnose, plot_diagnosis, plot_path  # here, not at the top: --help never loads torch
    with errors():
        if plot is not None:
            plot = plot_path(plot, overwrite)  # before the checkpoints are read: a bad --plot fails at once
        with status("reading checkpoints...", not as_json):
            d = diagnose(ckpts, fit_checkpoints=fit_checkpoints, base=base, max_memory=max_memory)
        if plot is not None:
            plot = plot_diagnosis(d, plot, overwrite)
        if as_json:
            print_json(d.to_json())
            return
        _report(d, plot)


def _report(d: Diagnosis, plot: Path | None) -> None:
    from nextrap.api.diagnostics import PARTS, R2_THRESHOLD  # here, not at the top: --help never loads torch

    j = d.to_json()
    table = Table(title=f"nextrap inspect {d.root}", show_header=False, title_justify="left")
    table.add_row("layout", f"{d.layout} ({d.trainer} folders)")
    table.add_row("checkpoints", f"{len(d.steps)} (steps {d.steps[0]} .. {d.steps[-1]})")
    table.add_row(d.units_label, f"{len(d.modules)}: " + ", ".join(f"{t} x{n}" for t, n in j["modules"]["types"].items()))
    if j["modules"]["ranks"]:
        table.add_row("ranks", ", ".join(str(r) for r in j["modules"]["ranks"]))
    table.add_row("dtypes", ", ".join(d.dtypes))
    table.add_row("size on disk", f"{human_bytes(d.size_bytes)} ({d.weights_label} weights {human_bytes(d.weights_bytes)})")
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
