"""`nextrap push`: a jumped checkpoint to the Hugging Face Hub, with a provenance model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from nextrap.cli.common import errors, human_bytes, out_console, print_json, status


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
    from nextrap.api.hub import push as run_push  # here, not at the top: --help never loads torch
    with errors():
        with status("uploading...", not (as_json or dry_run)):
            result = run_push(folder, repo, private=private, revision=revision, dry_run=dry_run, token_env=token_env,
                              base_model=base_model)
        if as_json:
            print_json(result.to_json())
            return
        table = Table(title=f"{'would upload' if dry_run else 'uploaded'} to {repo} ({revision or 'main'})", title_justify="left")
        table.add_column("file")
        table.add_column("size", justify="right")
        for path, size in result.files:
            table.add_row(path, human_bytes(size))
        table.add_row("total", human_bytes(result.total_bytes), style="bold")
        out_console.print(table)
        if dry_run:
            out_console.print("model card (README.md):", style="bold")
            out_console.print(result.card, markup=False, highlight=False, soft_wrap=True)
            out_console.print("dry run: nothing was uploaded", style="dim")
        else:
            out_console.print(f"pushed to {result.repo_url or repo}" + (f"; commit {result.commit_url}" if result.commit_url else ""),
                              highlight=False)
