"""The ``nextrap`` command line: one module per command, each a thin layer over the library
(``nextrap.fit``, ``nextrap.extend``, ``nextrap.diagnose``, ``nextrap.push``, the GRPO runner).

Exit codes: 0 success; 1 bad input or a refused result (one line on stderr, nothing written); 2 bad usage;
130 / 143 ended by SIGINT / SIGTERM. Every command module imports torch only inside its function, so
``nextrap --help`` stays fast.
"""

from __future__ import annotations

import typer

from nextrap.cli import extend, fit, fold, grpo, inspect, pipeline, push
from nextrap.runtime.process import command

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Skip RLVR training steps: fit the rank-1 trajectory of saved checkpoints, then jump ahead (NExt).")
app.command("grpo")(grpo.grpo)
app.command("fit")(fit.fit)
app.command("extend")(extend.extend)
app.command("fold")(fold.fold_cmd)
app.command("inspect")(inspect.inspect_cmd)
app.command("push")(push.push_cmd)
app.command("pipeline")(pipeline.pipeline_cmd)


def main() -> None:
    """The console entry point: the commands, ended by SIGINT or SIGTERM with one line (``process.command``)."""
    with command():
        app()
