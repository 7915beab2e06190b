"""nextrap: skip RLVR training steps by extrapolating the rank-1 trajectory of saved checkpoints (NExt).

Library entry points (the CLI is a thin layer over them):
    fit(ckpts, out, horizon=5, ...)      -> FitResult     (writes the fit folder)
    extend(fit_dir, alphas, out, ...)    -> ExtendResult  (writes the jumped checkpoint(s))
    diagnose(ckpts)                      -> Diagnosis     (rank-1 energy and linearity, as `nextrap inspect`)
    push(folder, repo, ...)              -> PushResult    (upload with a model card, as `nextrap push`)

They are loaded on first use, so that `import nextrap` (and `nextrap --help`) does not load torch.
"""

import importlib
import sys
import types

from .version import __version__

# First, and stdlib only: in the `nextrap` command's process, signals and torch's threads are set before torch
# loads (process.py); a program importing the library keeps its own.
from .process import at_import  # noqa: E402

at_import()

_API = {"NextrapError": "errors", "FitResult": "fit", "fit": "fit", "load_fit": "fit", "ExtendResult": "extend",
        "extend": "extend", "parse_alphas": "extend", "diagnose": "diagnostics", "push": "hub"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``nextrap.fit`` and ``nextrap.extend`` are the functions, although modules of the same names exist: importing
    such a module (which Python records on its package) leaves the function in place."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
