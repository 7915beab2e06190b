"""nextrap: skip RLVR training steps by extrapolating the rank-1 trajectory of saved checkpoints (NExt).

Library entry points (the CLI is a thin layer over them):
    fit(ckpts, out, horizon=5, ...)      -> FitResult     (writes the fit folder)
    extend(fit_dir, alphas, out, ...)    -> ExtendResult  (writes the jumped checkpoint(s))
    diagnose(ckpts)                      -> Diagnosis     (rank-1 energy and linearity, as `nextrap inspect`)
    push(folder, repo, ...)              -> PushResult    (upload with a model card, as `nextrap push`)

They are loaded on first use, so that `import nextrap` (and `nextrap --help`) does not load torch.
"""

import importlib

from nextrap.version import __version__

# First, and stdlib only: in the `nextrap` command's process, signals and torch's threads are set before torch
# loads (process.py); a program importing the library keeps its own.
from nextrap.runtime.process import at_import  # noqa: E402

at_import()

_API = {"NextrapError": "core.errors", "FitResult": "api.fit", "fit": "api.fit", "load_fit": "api.fit",
        "ExtendResult": "api.extend", "extend": "api.extend", "parse_alphas": "api.extend", "diagnose": "api.diagnostics",
        "push": "api.hub"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value
