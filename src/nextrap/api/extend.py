"""``nextrap extend``: predict the move from the last fitted checkpoint and write W_c + alpha * move, as an
exact PEFT adapter of rank r + k or as a merged Hugging Face model, one folder per alpha; or write the base
model with the jump folded in, W_0 + alpha * move, on which checkpoint c itself resumes at rank r:
W_c + alpha * move = (W_0 + alpha * move) + s B_c A_c."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from nextrap.methods.backtest import BacktestResult, Choice, choose
from nextrap.engine.budget import parse_size
from nextrap.core.errors import NextrapError, one_line_os_errors
from nextrap.io.files import check_apart, check_replaceable, shared_atomic_dir, write_json
from nextrap.api.fit import FitFolder, inputs_checked_meanwhile, load_fit
from nextrap.core.lowrank import top1_factored
from nextrap.core.registry import check_method
from nextrap.methods import FITTED, Jump, JumpContext, jump
from nextrap.trajectories.interface import Trajectory
from nextrap.core.features import VEC, Features
from nextrap.runtime.distributed import World, world
from nextrap.engine.lorastream import module_factors
from nextrap.runtime.process import Background

FORMATS = ("adapter", "merged", "base")
PROVENANCE = "nextrap.json"
PREDICTION = "prediction.safetensors"
MAX_ALPHAS = 100  # one output folder each: a range that expands past this is a typo, not a sweep


def parse_alphas(text: str) -> list[float] | None:
    """'1.5' -> [1.5]; '1.0,1.5' -> [1.0, 1.5]; '0.5:4.0:0.5' -> 0.5, 1.0, ..., 4.0 (end included); 'auto' -> None."""
    if text.strip().lower() == "auto":
        return None
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = (stop - start) / step + 1e-9
            if math.isfinite(n) and n >= MAX_ALPHAS:  # counted before it is expanded: 0:1e12:1 never allocates
                raise NextrapError(f"--alpha {text!r}: expands to {math.floor(n) + 1:,} alphas, one output folder each; "
                                   f"at most {MAX_ALPHAS} (use a larger step)")
            values = [round(start + i * step, 10) for i in range(int(math.floor(n)) + 1)] if math.isfinite(n) else []
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise NextrapError(f"--alpha {text!r}: use a number (1.5), a list (1.0,1.5) or a range start:stop:step (0.5:4.0:0.5)") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise NextrapError(f"--alpha {text!r}: no finite values")
    if len(set(values)) != len(values):
        raise NextrapError(f"--alpha {text!r}: repeated values")
    if len(values) > MAX_ALPHAS:
        raise NextrapError(f"--alpha {text!r}: {len(values)} alphas, one output folder each; at most {MAX_ALPHAS}")
    return values


def alpha_folder(alpha: float) -> str:
    text = f"{alpha:.6f}".rstrip("0")
    return "alpha-" + (text + "0" if text.endswith(".") else text)


def check_alpha_folders(alphas: list[float]) -> None:
    """Several alphas are written one folder each, named to 6 decimals: refuse alphas that share a name."""
    if len(alphas) < 2:
        return
    seen: dict[str, float] = {}
    for a in alphas:
        name = alpha_folder(a)
        if name in seen:
            raise NextrapError(f"--alpha {seen[name]!r} and {a!r}: both would be written to {name}/ (folders name "
                               "alphas to 6 decimals); give alphas that differ there")
        seen[name] = a


def check_min_energy(min_energy: float) -> None:
    """--min-energy compares with sigma1/sum(sigma), which lies in [0, 1]."""
    if not (isinstance(min_energy, (int, float)) and math.isfinite(min_energy) and 0 <= min_energy <= 1):
        raise NextrapError(f"--min-energy {min_energy}: use a number from 0 to 1 (a rank-1 energy sigma1/sum(sigma); "
                           "0 jumps every module)")


@dataclass
class ExtendResult:
    out: Path
    method: str
    format: str
    alphas: list[float]
    folders: list[Path]
    from_step: int
    horizon: int
    predicted_sigma: dict[str, float] = field(default_factory=dict)
    choice: Choice | None = None  # set when --method auto or --alpha auto chose
    backtest_error: dict[float, float | None] = field(default_factory=dict)  # alpha -> backtest e (None: not measured)
    warnings: list[str] = field(default_factory=list)
    resume_from: dict[str, Any] | None = None  # --format base: the checkpoint (path, step) to resume on the folded base

    def to_json(self) -> dict[str, Any]:
        sig = list(self.predicted_sigma.values())
        return {"out": str(self.out), "method": self.method, "format": self.format, "alphas": self.alphas,
                "folders": [str(f) for f in self.folders], "from_step": self.from_step, "horizon": self.horizon,
                "predicted_sigma_median": float(torch.tensor(sig).median()) if sig else None,
                "choice": vars(self.choice) if self.choice else None,
                "backtest_error": {str(a): e for a, e in self.backtest_error.items()}, "warnings": self.warnings,
                "resume_from": self.resume_from}


def _prediction_tensors(j: Jump, features: Features, traj: Trajectory) -> dict[str, torch.Tensor]:
    """The move's top singular triple per module (exactly NExt's prediction; the dominant part of linear's).

    A checkpoint difference (linear, expo; ``next``'s straight line) has a triple the fit already stored:
    W_c - W_{c-h} is the target feature of row c - h, W_c - W_0 the global one of row c, so it is not read
    again. A module whose move is such a difference plus low-rank factors (``next`` with rho > 0) has its triple
    computed from the move's thin factors where the trajectory has them (LoRA: float32 products of the
    difference form, ``top1_factored``; extend runs this beside its writer), or, where it never forms them
    (full parameters), is left out."""
    factors = traj.move_factors(j)
    out = {}
    for name in features.modules if j.difference is not None else j.factors:
        if j.keep is not None and name not in j.keep:
            out.update(_triple(name, *_zero_triple(features, name)))
        elif j.difference is not None and name not in j.factors and _stored(j.difference, features) is not None:
            out.update(_triple(name, *_stored_triple(features, name, *_stored(j.difference, features))))
        elif factors is not None:
            r1 = top1_factored(*(t[None] for t in module_factors(factors, name, dtype=torch.float32)), products=torch.float32)
            out.update(_triple(name, r1.sigma, r1.u[0], r1.v[0]))
    return out


def _stored(difference: tuple[int, int | None], features: Features) -> tuple[str, int] | None:
    """(kind, row) of the stored feature whose triple is W_row - W_ref's, if there is one."""
    row, ref = difference
    if ref is None:
        return "global", row
    return ("target", ref) if row - ref == features.horizon else None


def _stored_triple(features: Features, name: str, kind: str, at: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if features.is_vector(name):  # a 1-D delta is its own rank-1 part: sigma = its norm, v = [1]
        vec = features.get(name, kind, VEC)[at].to(torch.float32)
        norm = vec.norm()
        return norm.reshape(1), vec / norm if norm > 0 else vec, torch.ones(1)
    return features.get(name, kind, "sigma")[at:at + 1], features.get(name, kind, "u")[at], features.get(name, kind, "v")[at]


def _zero_triple(features: Features, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.zeros(1), torch.zeros(features.get(name, "global", "u").shape[-1]),
            torch.zeros(features.get(name, "global", "v").shape[-1]))


def _triple(name: str, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{name}:sigma": sigma.reshape(1).to(torch.float32), f"{name}:u": u.to(torch.float32),
            f"{name}:v": v.to(torch.float32)}


def _decide(results: list[BacktestResult], method: str,
            alphas: list[float] | None) -> tuple[str, list[float], Choice | None, str | None]:
    """Resolve 'auto' method and/or alpha (None) from the fit's backtest; also why not to jump, when the backtest
    says so. With alphas given, the choice names the one of them written at the lowest backtest error, also when
    none beats standing still (its reason then says so)."""
    if method != "auto" and alphas is not None:
        return method, alphas, None, None
    if not results:
        raise NextrapError("--method auto (the default) / --alpha auto choose by backtest, but the fit has none "
                           "(it needs 2h + 1 checkpoints and no --no-backtest); name a --method")
    try:
        choice = choose(results, method=None if method == "auto" else method, alphas=alphas)
    except ValueError as e:
        raise NextrapError(f"--alpha auto: {e} in the fit's manifest.json (fitted with other --methods, or by an older "
                           "nextrap); refit or give --alpha") from None
    no_jump = choice.reason if choice.alpha == 0 else None
    if alphas is None:
        return choice.method, [choice.alpha], choice, no_jump
    if choice.alpha not in alphas:  # nothing beat standing still: the alphas given are written anyway
        terms = next(r.terms for r in results if r.method == choice.method)
        alpha = min(alphas, key=terms.error)
        choice = Choice(choice.method, alpha, terms.error(alpha), f"{choice.reason}; writing --alpha as given")
    return choice.method, alphas, choice, no_jump


def _energy(features: Features, module: str, row: int) -> float:
    """Rank-1 energy of ``module``'s global delta at ``row``; a 1-D parameter's delta is one vector (a rank-1
    matrix), so its energy is 1: --min-energy never holds vectors back."""
    if module not in features.modules:
        raise NextrapError(f"--min-energy: the move has module {module}, which the fit's features do not")
    return 1.0 if features.is_vector(module) else float(features.get(module, "global", "energy")[row])


def _energetic(features: Features, modules: list[str], row: int, min_energy: float) -> set[str]:
    """The modules whose rank-1 energy at ``row`` is at least ``min_energy``."""
    return {n for n in modules if _energy(features, n, row) >= min_energy}


@dataclass
class Plan:
    """What a fit says to jump: the method and alphas (chosen from the backtest when asked), the move from the
    last checkpoint (``row``) and the backtest's error at each alpha. ``extend`` writes it; the TRL callback
    applies it to a live model."""

    fit: FitFolder
    method: str
    alphas: list[float]
    choice: Choice | None
    move: Jump
    row: int
    errors: dict[float, float | None]  # alpha -> backtest e of this method (None: --min-energy left modules out)
    warnings: list[str]

    def factored(self) -> Jump:
        """The move as thin factors per module (a checkpoint difference read per module when asked for): what a
        live model's weights get added (``jumps.apply_in_place``)."""
        factors = self.fit.trajectory.move_factors(self.move)
        if factors is None:
            raise NextrapError(f"{self.fit.path}: its move is never held as thin factors; write it with `nextrap extend`")
        return Jump(self.move.method, factors, self.move.sigma)


def plan(fit: FitFolder, alphas: list[float] | None, method: str = "auto", min_energy: float = 0.0) -> Plan:
    """Resolve ``method="auto"`` / ``alphas=None`` from the fit's backtest (alpha 0 = don't jump when nothing
    beats standing still) and predict the move from the last checkpoint; ``min_energy`` zeroes the move of
    modules whose global delta has rank-1 energy sigma1/sum(sigma) below it. The backtest measured the whole
    move: when ``min_energy`` leaves modules out, the errors are not known (None) and a warning says so."""
    check_method(method)
    check_min_energy(min_energy)
    features = fit.features
    results = [BacktestResult.from_json(b) for b in fit.manifest.get("summary", {}).get("backtest", [])]
    asked = " and ".join(option for option, auto in (("--method", method == "auto"), ("--alpha", alphas is None)) if auto)
    method, alphas, choice, no_jump = _decide(results, method, alphas)
    by_method = {r.method: r for r in results}
    try:
        errors: dict[float, float | None] = ({a: by_method[method].terms.error(a) for a in alphas}
                                             if method in by_method else {})
    except OverflowError:
        raise NextrapError(f"--alpha {max(alphas, key=abs):g}: so large that the jump overflows; refusing "
                           "non-finite results") from None
    row = features.n_rows - 1
    if method in FITTED and method not in fit.models:
        raise NextrapError(f"{fit.path}: has no fitted {method} model (left out by `fit --methods`, or written by an "
                           "older nextrap); refit it")
    try:
        j = jump(method, JumpContext(features, fit.trajectory, row, fit.models))
    except FloatingPointError as e:
        raise NextrapError(f"{fit.path}: {e}; refusing to write a jumped checkpoint") from None
    warnings = []
    if min_energy > 0:
        modules = list(features.modules if j.difference is not None else j.factors)
        keep = _energetic(features, modules, row, min_energy)
        if not keep:
            top = max((_energy(features, n, row) for n in modules), default=0.0)
            raise NextrapError(f"--min-energy {min_energy:g}: no module's rank-1 energy at step {features.steps[row]} "
                               f"reaches it (the highest is {top:.3f}); nothing to jump")
        try:
            j = fit.trajectory.only(j, keep)
        except ValueError as e:
            raise NextrapError(str(e)) from None
        if len(keep) < len(modules):
            errors = {a: (e if a == 0 else None) for a, e in errors.items()}  # e(0) = 1 whatever the move
            chosen = "" if choice is None else f"; {asked} auto chose on the whole move too"
            warnings.append(f"--min-energy {min_energy:g} leaves {len(modules) - len(keep)} of {len(modules)} modules "
                            f"unjumped, but the backtest measured the whole move: its error is not reported{chosen}")
    warnings += [f"method {method} at alpha {a:g}: backtest e = {e:.3f} >= 1, worse than not jumping"
                 for a, e in errors.items() if e is not None and e >= 1 and a != 0]
    if no_jump:
        warnings.append(f"{no_jump}; " + ("writing the last checkpoint unchanged (alpha 0)" if alphas == [0.0]
                                                 else f"writing the requested alphas with {method} anyway"))
    return Plan(fit, method, alphas, choice, j, row, errors, warnings)


@one_line_os_errors
def extend(fit_dir: Path | str, alphas: list[float] | None, out: Path | str, fmt: str = "adapter",
           base: Path | str | None = None, method: str = "auto", overwrite: bool = False,
           max_shard_size: str = "5GB", min_energy: float = 0.0) -> ExtendResult:
    """Write the jumped checkpoint(s) for each alpha into ``out`` (subfolders ``alpha-X`` when several).

    ``method="auto"`` (the default) and/or ``alphas=None`` pick the method and/or alpha with the lowest backtest
    error of the fit, including alpha 0 (the last checkpoint unchanged) when no jump beats standing still; name a
    method (``"next-paper"``: NExt as published) to use it whatever the backtest says. ``min_energy``
    jumps only the modules whose global delta has rank-1 energy sigma1/sum(sigma) >= min_energy (the others
    keep their last weights; refused when none does, and the backtest error of a move with modules left out is
    not known: None). Several alphas must differ in their folder names (``alpha_folder``)."""
    if fmt not in FORMATS:
        raise NextrapError(f"--format {fmt}: use adapter, merged or base")
    check_method(method)
    check_min_energy(min_energy)
    check_alpha_folders(alphas or [])
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    out = Path(out)
    check_apart(out, {"the fit folder": fit_dir, "the base model": base})
    check_replaceable(out, overwrite)
    loaded = load_fit(fit_dir, verify_inputs=False)
    ranks = world()  # under torchrun every rank writes its share of the shards; rank 0 checks the inputs
    # the inputs' sha256 beside the work; under torchrun rank 0's finding fails every rank (``shared_atomic_dir``)
    checked = inputs_checked_meanwhile(loaded) if ranks.is_main else nullcontext(lambda: None)
    with checked as inputs_unchanged:
        return _extend(loaded, fit_dir, alphas, out, fmt, base, method, overwrite, shard_bytes, min_energy, inputs_unchanged,
                       ranks)


def _extend(loaded: FitFolder, fit_dir: Path | str, alphas: list[float] | None, out: Path, fmt: str, base: Path | str | None,
            method: str, overwrite: bool, shard_bytes: int, min_energy: float, inputs_unchanged: Callable[[], None],
            ranks: World) -> ExtendResult:
    check_apart(out, {"the checkpoint folder": loaded.manifest["source"]})
    features, traj = loaded.features, loaded.trajectory
    fmt = traj.output_format(fmt, Path(base) if base else None)
    base = traj.output_base(Path(base) if base else None)  # a full-parameter fit's own base, whatever --base says
    chosen = plan(loaded, alphas, method, min_energy)
    method, alphas, choice, j, row, errors = chosen.method, chosen.alphas, chosen.choice, chosen.move, chosen.row, chosen.errors
    # the prediction reads the move's checkpoints again and multiplies: on a thread of its own, beside the writer
    # (which spends its time in the checkpoints' reads and the output's writes), on the rank that writes it
    predicting = Background(_prediction_tensors, j, features, traj) if ranks.is_main else None
    # under torchrun every rank writes its share of the shards into one temporary folder, rank 0 the rest, and
    # rank 0 publishes it once all have finished: the files one process writes
    with shared_atomic_dir(out, ranks, overwrite=overwrite, kind="extend") as tmp:
        written = {alpha: tmp if len(alphas) == 1 else tmp / alpha_folder(alpha) for alpha in alphas}
        for alpha, folder in written.items():
            traj.write(folder, fmt, row, j, alpha, base, shard_bytes, ranks)
        prediction = predicting.result() if predicting is not None else {}
        provenance = _provenance(loaded, fit_dir, traj, features, fmt, method, row, base, min_energy, choice, prediction)
        if ranks.is_main:
            for alpha, folder in written.items():
                save_file(prediction, str(folder / PREDICTION), metadata={"method": method})
                write_json(folder / PROVENANCE, {**provenance, "alpha": alpha, "backtest_error": errors.get(alpha)})
        inputs_unchanged()  # nothing is committed unless the fitted checkpoints are the ones read
    folders = [out if len(alphas) == 1 else out / alpha_folder(alpha) for alpha in alphas]
    return ExtendResult(out, method, fmt, alphas, folders, features.steps[row], features.horizon,
                        dict(provenance["predicted_sigma"]), choice, errors, chosen.warnings, provenance["resume_from"])


def _provenance(loaded: FitFolder, fit_dir: Path | str, traj: Trajectory, features: Features, fmt: str, method: str,
                row: int, base: Path | None, min_energy: float, choice: Choice | None,
                prediction: dict[str, torch.Tensor]) -> dict[str, Any]:
    """nextrap.json's content but the alpha and its backtest error."""
    return {
        "tool": "nextrap", "method": method, "format": fmt, "kind": traj.kind, "source": loaded.manifest["source"],
        "describes": {"source": traj.checkpoint_text, "format": traj.formats[fmt]},  # for model cards (``hub``)
        "source_steps": features.steps, "from_step": features.steps[row], "horizon": features.horizon,
        "fit": str(Path(fit_dir).absolute()), "base": str(base.absolute()) if base else None,
        "min_energy": min_energy,
        # --format base: resume this checkpoint (its adapter, optimizer, schedule, step) on the folded base
        "resume_from": ({"path": str(traj.folder(row).absolute()), "step": features.steps[row]}
                        if fmt == "base" else None),
        "backtest": loaded.manifest.get("summary", {}).get("backtest", []),
        "choice": vars(choice) if choice else None,
        "predicted_sigma": {m: float(prediction[f"{m}:sigma"]) for m in features.modules if f"{m}:sigma" in prediction},
    }
