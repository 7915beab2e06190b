"""What every command shares: the two consoles, one-line errors and warnings, the progress bar, sizes as text.

Exit codes: 0 success; 1 bad input or a refused result (one line on stderr, nothing written); 2 bad usage.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from typing import Iterator

import typer
from rich.console import Console

from nextrap.core.errors import NextrapError, NextrapWarning, os_error, os_problem
from nextrap.runtime.process import check_interrupted
from nextrap.runtime.progress import rich_progress

out_console = Console(width=None if sys.stdout.isatty() else 120)  # tables stay readable in logs
err_console = Console(stderr=True)


@contextmanager
def errors() -> Iterator[None]:
    """Library errors (and any OSError) as one ``error:`` line and exit 1; the library's warnings (NextrapWarning)
    as one ``warning:`` line each, when they happen."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", NextrapWarning)
            shown = warnings.showwarning
            warnings.showwarning = lambda message, category, *rest: (
                warn(str(message)) if issubclass(category, NextrapWarning) else shown(message, category, *rest))
            yield
    except (NextrapError, OSError) as e:
        check_interrupted()  # an error that a swallowed interrupt became is that interrupt
        if isinstance(e, OSError):
            _unflushable_stdout()  # a table that stdout could not take is not written again at exit
        message = os_error(e) if isinstance(e, OSError) else e
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def print_json(obj: object) -> None:
    """The command's one JSON object on stdout, flushed here: inside ``errors()`` a full disk or a closed pipe is
    one ``error:`` line and exit 1, not a traceback at exit."""
    try:
        print(json.dumps(obj))
        sys.stdout.flush()
    except OSError as e:
        _unflushable_stdout()
        raise NextrapError(f"cannot write the JSON to stdout: {os_problem(e.errno, e.strerror or str(e))}") from None


def _unflushable_stdout() -> None:
    """When stdout cannot take what it holds, send that to /dev/null instead, so that the interpreter's flush at
    exit does not fail again (a second message and exit status 120)."""
    try:
        sys.stdout.flush()
        return
    except OSError:
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def progress(enabled: bool):
    """A rich progress bar on stderr; yields the (stage, done, total) callback the library expects."""
    return rich_progress(err_console, enabled)


def status(message: str, enabled: bool):
    """A spinner on a terminal only: in a log it would write control characters."""
    return err_console.status(message) if enabled and err_console.is_terminal else nullcontext()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover
