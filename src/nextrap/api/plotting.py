"""matplotlib, an optional extra, loaded on demand with the headless backend."""

from __future__ import annotations

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
