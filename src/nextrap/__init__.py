"""nextrap: skip RLVR training steps by extrapolating the rank-1 trajectory of saved checkpoints (NExt).

Library entry points (the CLI is a thin layer over them):
    fit(ckpts, out, horizon=5, ...)      -> FitResult     (writes the fit folder)
    extend(fit_dir, alphas, out, ...)    -> ExtendResult  (writes the jumped checkpoint(s))
    diagnose(ckpts)                      -> Diagnosis     (rank-1 energy and linearity, as `nextrap inspect`)
    push(folder, repo, ...)              -> PushResult    (upload with a model card, as `nextrap push`)
"""

from .version import __version__  # noqa: E402, F401

# First, and stdlib only: in the `nextrap` command's process, signals and torch's threads are set before torch
# loads (process.py); a program importing the library keeps its own.
from .process import at_import  # noqa: E402

at_import()

from .errors import NextrapError  # noqa: E402
from .fit import FitResult, fit, load_fit  # noqa: E402
from .extend import ExtendResult, extend, parse_alphas  # noqa: E402
from .diagnostics import diagnose  # noqa: E402
from .hub import push  # noqa: E402

__all__ = ["NextrapError", "FitResult", "fit", "load_fit", "ExtendResult", "extend", "parse_alphas", "diagnose", "push",
           "__version__"]
