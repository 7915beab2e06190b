"""``nextrap fit``: read a trajectory, compute its rank-1 features, train the NExt predictor, backtest, and
write everything ``extend`` needs into one folder (manifest.json, trajectory.safetensors, predictor.*)."""

from __future__ import annotations

import platform
from importlib import metadata
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import torch
from nextrap.version import __version__
from nextrap.methods.backtest import BacktestResult, backtest, fold_starts, max_folds
from nextrap.io.checkpoints import find_folders, is_adapter, save_limit_hint
from nextrap.core.errors import NextrapError, NextrapWarning, one_line_os_errors
from nextrap.io.files import atomic_dir, check_apart, check_replaceable, read_json, sha256, write_json
from nextrap.io.fullparam import is_model
from nextrap.core.registry import check_methods
from nextrap.methods import FITTED, METHODS, fit_models, load_models, save_models
from nextrap.trajectories.opening import manifest_problem, open_trajectory, reopen
from nextrap.methods.predictor import TrainSettings
from nextrap.runtime.distributed import world
from nextrap.engine.budget import spare_cores
from nextrap.engine.fullstream import SVD_MODES
from nextrap.runtime.process import Background, cores
from nextrap.trajectories.interface import Trajectory
from nextrap.core.features import Features

MANIFEST = "manifest.json"
TRAJECTORY = "trajectory.safetensors"

# (stage, done, total): the CLI draws it as a rich progress bar; library users may pass their own.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class FitResult:
    out: Path
    steps: list[int]
    horizon: int
    n_modules: int
    energy_median: dict[int, float]  # step -> median over modules of sigma1 / sum(sigma) of the global delta
    group_losses: dict[str, tuple[float, float]]  # next-paper: predictor group ("sigma", "u{m}", "v{n}") -> (first, last) loss
    models: dict[str, Any] = field(default_factory=dict)  # per fitted method: files, validation numbers
    backtest: list[BacktestResult] = field(default_factory=list)
    backtest_skipped: str = ""  # why there is no backtest, if there is none
    seconds: dict[str, float] = field(default_factory=dict)
    streaming: dict[str, Any] = field(default_factory=dict)  # what the streamed passes measured (``Trajectory.report``)
    units_label: str = "modules"  # how reports name the units (``Trajectory.units_label``)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "steps": self.steps, "horizon": self.horizon, "modules": self.n_modules,
            "rank1_energy_median": {str(k): v for k, v in self.energy_median.items()},
            "predictor_loss": {k: {"first": a, "last": b} for k, (a, b) in self.group_losses.items()},
            "models": self.models,
            "backtest": [asdict(b) for b in self.backtest], "backtest_skipped": self.backtest_skipped or None,
            "seconds": self.seconds, **({"streaming": self.streaming} if self.streaming else {}),
        }


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise NextrapError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise NextrapError(f"--device {device}: use auto, cpu or cuda")
    return device


def versions() -> dict[str, str]:
    """The versions a fit ran with, for its manifest. Read from the installed distributions' metadata: importing
    peft to ask it would load transformers (4.5 s of a 28 s fit, measured)."""
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"nextrap": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "peft": installed("peft"), "safetensors": installed("safetensors"), "numpy": installed("numpy")}


@one_line_os_errors
def fit(ckpts: Path | str, out: Path | str = "nextrap-fit", horizon: int = 5, seed: int = 0, epochs: int = 1000,
        device: str = "auto", sign_align: bool = True, run_backtest: bool = True, backtest_folds: int = 1,
        overwrite: bool = False, progress: ProgressFn | None = None, methods: tuple[str, ...] | list[str] = METHODS,
        base: Path | str | None = None, svd: str = "exact", max_memory: str | None = None,
        max_gpu_memory: str | None = None) -> FitResult:
    """Fit every method of ``methods`` (their models, and a backtest of each) on the LoRA checkpoints under
    ``ckpts`` and write the fit folder ``out`` atomically. Leaving out ``next-paper`` saves most of the time.
    Every pass over the checkpoints is streamed under ``max_memory`` (default 8GB) and, on a GPU, under
    ``max_gpu_memory`` (default 90% of its free memory). With ``base``, ``ckpts``
    holds full-parameter model folders (``opening.open_trajectory``)."""
    methods = check_methods(methods)
    if horizon < 1:
        raise NextrapError(f"--horizon {horizon}: must be at least 1")
    if backtest_folds < 1:
        raise NextrapError(f"--backtest-folds {backtest_folds}: must be at least 1")
    if epochs < 1:
        raise NextrapError(f"--epochs {epochs}: must be at least 1")
    if svd not in SVD_MODES:
        raise NextrapError(f"--svd {svd}: use {' or '.join(SVD_MODES)}")
    out = Path(out)
    check_apart(out, {"the checkpoint folder": ckpts, "the base model": base})
    check_replaceable(out, overwrite)  # fail before the expensive part
    settings = TrainSettings(epochs=epochs, seed=seed, device=resolve_device(device), sign_align=sign_align)
    report = progress or (lambda *_: None)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    ranks = world(settings.device)  # under torchrun every streamed pass splits its units across the ranks
    traj = open_trajectory(ckpts, base, max_memory, settings.device, svd, max_gpu_memory)
    traj.preflight(horizon, backtest=run_backtest)  # every pass fits the budget, before any reads
    # The inputs' fingerprints, on the rank that writes the manifest: beside the feature pass on one daemon thread
    # (an error or interrupt never waits for it) where torch leaves a core, else after it with every core (a
    # hashing thread beside as many torch threads as cores stalled the 28-layer 7B-shaped feature pass at 2
    # threads from 29.6 s to 59.6 s; benchmarks/RESULTS.md 4.4).
    beside = ranks.is_main and spare_cores(torch.device(settings.device), torch.get_num_threads(), cores()) > 0
    fingerprints = Background(traj.inputs, 1) if beside else None
    done = 0

    def on_units(k: int) -> None:
        nonlocal done
        done += k
        report("rank-1 features", done, len(traj.units))

    # Stored as the SVD gives them: next-paper trains on these (the reference does not align signs); next signs
    # each row against its own D, which makes the series' alignment irrelevant to it. relex projects every
    # checkpoint up to each fold's start on that start's direction: the pass that reads them can (``project``; the
    # starts a backtest can use at most, since which rows moved is not known yet).
    project = fold_starts(len(traj.steps), horizon, backtest_folds, methods) if run_backtest and "relex" in methods else []
    features = traj.features(horizon, progress=on_units, project=project)
    report("rank-1 features", len(traj.units), len(traj.units))  # under torchrun this rank did only its share
    seconds["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs: list[dict[str, Any]] = []
    if ranks.is_main:
        report("inputs' fingerprints", 0, 1)
        inputs = fingerprints.result() if fingerprints else traj.inputs(cores())
        report("inputs' fingerprints", 1, 1)
    seconds["inputs"] = time.perf_counter() - t0  # what the fit waited for them

    t0 = time.perf_counter()
    try:
        models = fit_models(features, methods, settings, on_epoch=lambda m, done, total: report(f"fit {m}", done, total),
                            trajectory=traj)
    except (ValueError, FloatingPointError) as e:
        raise NextrapError(f"{ckpts}: {e}") from None
    seconds["predictor"] = time.perf_counter() - t0

    results: list[BacktestResult] = []
    skipped = "" if run_backtest else "--no-backtest"
    if run_backtest and max_folds(features) < 1:
        skipped = (f"needs at least 2h + 1 = {2 * horizon + 1} checkpoints after the first move"
                   + save_limit_hint([c.path for c in traj.checkpoints]))
    elif run_backtest:
        t0 = time.perf_counter()
        report("backtest", 0, 1)
        try:
            results = backtest(features, traj, settings, methods=methods, folds=backtest_folds)
        except (ValueError, FloatingPointError) as e:
            skipped = str(e)
        report("backtest", 1, 1)
        seconds["backtest"] = time.perf_counter() - t0
    folds_used = results[0].folds if results else 0
    if results and folds_used < backtest_folds and ranks.is_main:
        warnings.warn(f"--backtest-folds {backtest_folds}: the trajectory allows {folds_used} (each fold needs 2h + 1 "
                      f"checkpoints after the first move, ending one earlier); backtested {folds_used}", NextrapWarning,
                      stacklevel=2)

    energy = torch.stack([features.get(m, "global", "energy") for m in features.modules
                          if not features.is_vector(m)])  # [modules, rows]; 1-D parameters have no SVD
    result = FitResult(
        out=out, steps=traj.steps, horizon=horizon, n_modules=len(features.modules),
        energy_median={s: float(energy[:, i].median()) for i, s in enumerate(traj.steps)},
        group_losses={g.key: (g.losses[0], g.losses[-1]) for g in models["next-paper"].groups} if "next-paper" in models else {},
        backtest=results, backtest_skipped=skipped, seconds=seconds, units_label=traj.units_label,
    )
    manifest = {
        "format": "nextrap-fit/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(Path(ckpts).absolute()), "inputs": inputs, "steps": traj.steps, "horizon": horizon,
        "settings": {"seed": seed, "epochs": epochs, "device": settings.device, "sign_align": sign_align, "backtest_folds": backtest_folds,
                     "backtest_folds_used": folds_used,  # the folds the trajectory allowed (0: no backtest)
                     "lr": settings.lr, "min_lr_ratio": settings.min_lr_ratio, "weight_decay": settings.weight_decay,
                     "hidden": settings.hidden, "methods": list(methods)},
        "versions": versions(), "summary": result.to_json(),
    }
    manifest.update(traj.manifest())  # kind, streaming (budget, peak, ...) and what else reopening it needs
    result.streaming = manifest["summary"]["streaming"] = manifest["streaming"]
    manifest["summary"].pop("out")
    if not ranks.is_main:
        return result  # under torchrun every rank holds the same result; rank 0 alone writes it
    with atomic_dir(out, overwrite=overwrite, kind="fit") as tmp:
        features.save(tmp / TRAJECTORY)
        result.models = save_models(models, tmp)
        manifest["summary"]["models"] = result.models
        write_json(tmp / MANIFEST, manifest)
    return result


@dataclass
class FitFolder:
    """A fit folder read back: what ``extend`` needs."""

    path: Path
    manifest: dict[str, Any]
    features: Features
    models: dict[str, Any]  # fitted model per method name
    trajectory: Trajectory


@one_line_os_errors
def load_fit(path: Path | str, verify_inputs: bool = True) -> FitFolder:
    """Read a fit folder and re-open its source trajectory, checking the checkpoints are the ones fitted."""
    path = Path(path)
    if not path.is_dir():
        raise NextrapError(f"{path}: not a fit folder (run `nextrap fit CKPTS --out {path}` first)")
    if not (path / MANIFEST).exists() and _holds_checkpoints(path):
        raise NextrapError(f"{path}: this is a checkpoint folder, not a fit folder (run `nextrap fit {path} --out FIT` "
                           "first, then extend --fit FIT)")
    manifest = read_json(path / MANIFEST)
    check_manifest(path / MANIFEST, manifest)
    features = Features.load(path / TRAJECTORY)
    models = load_models(path, FITTED, TrainSettings())
    traj = reopen(manifest)
    if traj.steps != manifest["steps"]:
        raise NextrapError(f"{manifest['source']}: now holds steps {traj.steps}, but {path} was fitted on {manifest['steps']}; refit")
    loaded = FitFolder(path, manifest, features, models, traj)
    if verify_inputs:
        check_inputs(loaded)
    return loaded


def check_inputs(loaded: FitFolder) -> None:
    """Refuse, naming the file, when a fitted input changed since the fit (its size, and sha256 or mtime)."""
    for entry in loaded.manifest["inputs"]:
        for f in entry["files"]:
            file = Path(entry["path"]) / f["name"]
            if not _unchanged(file, f):
                raise NextrapError(f"{file}: changed since it was fitted into {loaded.path}; refit")


@contextmanager
def inputs_checked_meanwhile(loaded: FitFolder) -> Iterator[Callable[[], None]]:
    """Run ``check_inputs`` on a background thread (hashing GBs of checkpoints costs as much as reading them;
    hashlib and file reads release the GIL) while the body works. The body calls the yielded ``wait`` before it
    commits anything; a changed input's error also replaces any error the body raised, which it explains."""
    check = Background(check_inputs, loaded)
    try:
        yield check.result
    except Exception:
        check.result()
        raise
    check.result()


def _holds_checkpoints(path: Path) -> bool:
    """Whether ``path`` is an adapter or model folder, or holds some (what `fit` reads, not what it writes)."""
    def is_checkpoint(folder: Path) -> bool:
        return is_adapter(folder) or is_model(folder)
    return is_checkpoint(path) or bool(find_folders(path, is_checkpoint))


def check_manifest(file: Path, m: Any) -> None:
    """Refuse a damaged fit manifest, naming it (not the checkpoints it describes): every field ``load_fit`` and
    ``extend`` read, with its type."""
    def bad(what: str) -> NoReturn:
        raise NextrapError(f"{file}: not a valid nextrap fit manifest ({what}); the fit folder is damaged")

    if not isinstance(m, dict) or m.get("format") != "nextrap-fit/1":
        bad("its format is not nextrap-fit/1")
    for key, kind in (("source", str), ("horizon", int), ("steps", list), ("inputs", list), ("summary", dict)):
        if not isinstance(m.get(key), kind):
            bad(f"{key} is missing or not a {kind.__name__}")
    if not all(isinstance(s, int) for s in m["steps"]):
        bad("steps are not all integers")
    problem = manifest_problem(m)
    if problem:
        bad(problem)
    for entry in m["inputs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("files"), list):
            bad("an inputs entry without path or files")
        for f in entry["files"]:
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("bytes"), int)
                    and (isinstance(f.get("sha256"), str) or isinstance(f.get("mtime_ns"), int))):
                bad(f"inputs entry {entry['path']} has a file without name, bytes, and sha256 or mtime_ns")
    try:
        [BacktestResult.from_json(b) for b in m["summary"].get("backtest", [])]
    except (KeyError, TypeError, ValueError, AttributeError):
        bad("summary.backtest has an entry it cannot read")


# A modification time within this much of the moment it was recorded is ambiguous: file systems stamp times from a
# coarse clock, so a write just after the record could keep the same time (git's "racily clean" entries).
RACY_NS = 2_000_000_000


def _unchanged(file: Path, record: dict[str, Any]) -> bool:
    """Whether ``file`` still matches its manifest record: the size, then for a LoRA fit the modification time
    when it is unambiguous (hashing 10 GB of adapters cost extend more than its whole write), else the sha256;
    a full-parameter fit (checkpoints too large to hash at all) records the modification time only."""
    if not file.is_file():
        return False
    st = file.stat()
    if st.st_size != record["bytes"]:
        return False
    same_time = st.st_mtime_ns == record.get("mtime_ns")
    if "sha256" not in record:
        return same_time
    if same_time and st.st_mtime_ns < record.get("seen_ns", 0) - RACY_NS:
        return True
    return sha256(file) == record["sha256"]

