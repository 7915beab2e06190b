"""matplotlib, an optional extra, loaded on demand with the headless backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nextrap.core.errors import NextrapError


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NextrapError("--plot needs matplotlib, which is not installed (pip install 'nextrap[plot]')") from None
    return plt


def plot_path(path: Path | str, overwrite: bool = False) -> Path:
    """The file a plot for ``--plot path`` is written to: ``.png`` added to a name without a suffix (as
    matplotlib would), refused when it is a folder, in a folder that does not exist, or an existing file without
    ``overwrite``."""
    path = Path(path)
    if not path.suffix and not path.is_dir():
        path = path.with_name(path.name + ".png")
    if path.is_dir():
        raise NextrapError(f"--plot {path}: is a folder; give a file name, e.g. {path / 'plot.png'}")
    if not path.parent.is_dir():
        raise NextrapError(f"--plot {path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise NextrapError(f"--plot {path}: already exists; pass --overwrite to replace it")
    return path
