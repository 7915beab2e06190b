"""`nextrap fold`: jumps saved during training folded into the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nextrap.cli.common import errors, out_console, print_json


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
    from nextrap.api.jumps import fold as run_fold  # here, not at the top: --help never loads torch
    with errors():
        result = run_fold(base, jumps, out, upto=upto, max_shard_size=max_shard_size, overwrite=overwrite)
        if as_json:
            print_json(result.to_json())
            return
        out_console.print(f"folded the jumps of steps {', '.join(map(str, result.steps))} into {result.out} "
                          f"({result.shards} shard(s)): load checkpoints from step {result.steps[-1]} on it", highlight=False)
