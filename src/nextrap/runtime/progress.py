"""Rich progress bars behind the library's ``(stage, done, total)`` progress callbacks."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Report = Callable[[str, int, int], None]
LOG_EVERY = 10.0  # seconds between a stage's plain progress lines when the output is not a terminal


@contextmanager
def rich_progress(console: Console, enabled: bool = True, transient: bool = False,
                  remaining: bool = False) -> Iterator[Report | None]:
    """Yield a callback that draws one bar per stage on ``console`` (None when disabled). The bars start at the
    first report, so an early error prints nothing but itself (not even an empty line)."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:  # a log file or CI: plain lines, so that a long stage is never silent
        yield _plain_lines(console)
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


def _plain_lines(console: Console) -> Report:
    """A callback printing ``stage: done/total (pct%)`` when a stage starts, at most every LOG_EVERY seconds,
    and when it completes."""
    last: dict[str, float] = {}

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if stage in last and not finished and now - last[stage] < LOG_EVERY:
            return
        if finished and last.get(stage) == float("inf"):
            return  # its completion was already printed
        last[stage] = float("inf") if finished else now
        pct = f" ({100 * done // total}%)" if total else ""
        console.print(f"{stage}: {done}/{total}{pct}", highlight=False, soft_wrap=True)

    return report
