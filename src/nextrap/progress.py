"""Rich progress bars behind the library's ``(stage, done, total)`` progress callbacks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Report = Callable[[str, int, int], None]


@contextmanager
def rich_progress(console: Console, enabled: bool = True, transient: bool = False,
                  remaining: bool = False) -> Iterator[Report | None]:
    """Yield a callback that draws one bar per stage on ``console`` (None when disabled). The bars start at the
    first report, so an early error prints nothing but itself (not even an empty line)."""
    if not enabled:
        yield None
        return
    columns = [TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    tasks: dict[str, int] = {}
    bar: Progress | None = None

    def report(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(*columns, console=console, transient=transient)
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield report
    finally:
        if bar is not None:
            bar.stop()
