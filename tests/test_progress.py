import io

from rich.console import Console

from nextrap.runtime import progress


def test_without_a_terminal_progress_is_plain_lines_at_start_throttled_and_at_the_end(monkeypatch):
    out = io.StringIO()
    clock = iter([0.0, 1.0, 2.0, 15.0, 16.0, 17.0, 18.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.rich_progress(Console(file=out, force_terminal=False)) as report:
        for done in (0, 1, 2, 3, 4, 5):
            report("fit linear", done, 5)
        report("fit linear", 5, 5)  # a repeated completion is not printed twice
    assert out.getvalue().splitlines() == ["fit linear: 0/5 (0%)", "fit linear: 3/5 (60%)", "fit linear: 5/5 (100%)"]


def test_disabled_progress_is_none():
    with progress.rich_progress(Console(file=io.StringIO()), enabled=False) as report:
        assert report is None
