"""Jumps applied during training, saved as low-rank factors, and folded into a base model afterwards.

A jump made in place at step N (``jump_in_place``: the TRL callback ``nextrap.integrations.trl`` and the bundled
runner's ``nextrap grpo --jump-every``) fits the run's checkpoints saved since the previous jump, chooses the
method and alpha as ``extend`` does (``extend.plan``), or alpha among candidates by a score of each jumped model
(``choose_by_score``, e.g. the mean reward on held-out prompts), and adds alpha * P @ Q^T to the frozen base
weight of every LoRA module, so the adapters saved from step N on are relative to W_0 + alpha * P Q^T, not to W_0. Each
jump is saved beside the run's checkpoints as ``nextrap-jumps/step_N/`` (``jump.safetensors``: ``{module}:p``
and ``{module}:q`` in float64; ``jump.json``: step, method, alpha and the LoRA modules' shapes), and
``fold`` (``nextrap fold BASE JUMPS``) writes W_0 + sum_k alpha_k P_k Q_k^T over the jumps saved at steps
<= ``upto``: the base on which checkpoint ``upto`` (or any checkpoint from the last folded jump until the next
jump) loads and resumes as it was trained.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from nextrap.io.checkpoints import ADAPTER_CONFIG, Checkpoint, LoraModule, discover
from nextrap.core.errors import NextrapError
from nextrap.api.extend import parse_alphas, plan
from nextrap.io.files import atomic_dir, check_apart, read_json, write_json
from nextrap.api.fit import fit, load_fit
from nextrap.writers.merged import WeightDelta, module_deltas, write_merged
from nextrap.engine.budget import parse_size
from nextrap.methods import Jump

JUMPS = "nextrap-jumps"  # the folder of saved jumps, beside the checkpoints
JUMP_FORMAT = "nextrap-jump/1"
JUMP_INFO = "jump.json"
JUMP_WEIGHTS = "jump.safetensors"
PROVENANCE = "nextrap.json"


@dataclass
class SavedJump:
    """One jump read back: at ``step``, ``alpha`` times ``move`` was added to the base weights of ``modules``."""

    step: int
    method: str
    alpha: float
    modules: list[LoraModule]
    move: Jump
    info: dict[str, Any]


def jump_folder(root: Path | str, step: int) -> Path:
    return Path(root) / f"step_{step}"


def save_jump(root: Path | str, step: int, move: Jump, alpha: float, modules: list[LoraModule],
              info: dict[str, Any]) -> Path:
    """Write the jump made at ``step`` as ``root/step_N`` (atomically, replacing an earlier jump saved at that
    step); ``info`` is added to ``jump.json``."""
    folder = jump_folder(root, step)
    with atomic_dir(folder, overwrite=True, kind="jump") as tmp:  # a step jumped again (after a resume) replaces its jump
        tensors = {}
        for m in modules:
            p, q = move.factors[m.name]
            tensors[f"{m.name}:p"], tensors[f"{m.name}:q"] = p.double().contiguous(), q.double().contiguous()
        save_file(tensors, str(tmp / JUMP_WEIGHTS), metadata={"format": JUMP_FORMAT})
        write_json(tmp / JUMP_INFO, {**info, "format": JUMP_FORMAT, "step": step, "method": move.method, "alpha": alpha,
                                     "modules": [asdict(m) for m in modules]})
    return folder


def load_jump(folder: Path) -> SavedJump:
    file = folder / JUMP_INFO
    info = read_json(file)
    if not isinstance(info, dict) or info.get("format") != JUMP_FORMAT:
        raise NextrapError(f"{file}: not a saved nextrap jump (format "
                           f"{info.get('format') if isinstance(info, dict) else None!r})")
    for key, kinds in (("step", (int,)), ("method", (str,)), ("alpha", (int, float)), ("modules", (list,))):
        if not isinstance(info.get(key), kinds) or isinstance(info.get(key), bool):
            raise NextrapError(f"{file}: a saved jump needs {key} ({' or '.join(k.__name__ for k in kinds)}); "
                               f"it has {info.get(key)!r:.60}")
    if not (folder / JUMP_WEIGHTS).is_file():
        raise NextrapError(f"{folder}: has {JUMP_INFO} but no {JUMP_WEIGHTS}")
    tensors = load_file(str(folder / JUMP_WEIGHTS))
    try:
        modules = [LoraModule(**m) for m in info["modules"]]
    except TypeError:  # an entry that is not an object, or one with other fields
        raise NextrapError(f"{file}: a modules entry is not a LoRA module (name, out_features, in_features, rank, "
                           "scale, fan_in_fan_out)") from None
    factors = {}
    for m in modules:
        try:
            factors[m.name] = (tensors[f"{m.name}:p"], tensors[f"{m.name}:q"])
        except KeyError:
            raise NextrapError(f"{folder / JUMP_WEIGHTS}: no factors for module {m.name}") from None
    return SavedJump(info["step"], info["method"], info["alpha"], modules, Jump(info["method"], factors, {}), info)


def load_jumps(root: Path | str, upto: int | None = None) -> list[SavedJump]:
    """The jumps saved under ``root`` (``step_N`` folders), in step order, those after ``upto`` left out."""
    root = Path(root)
    if not root.is_dir():
        raise NextrapError(f"{root}: no such folder of saved jumps")
    jumps = sorted((load_jump(f) for f in root.iterdir() if f.is_dir() and (f / JUMP_INFO).is_file()),
                   key=lambda j: j.step)
    if not jumps:
        raise NextrapError(f"{root}: holds no saved jumps (step_N folders with {JUMP_INFO})")
    first = jumps[0]
    for j in jumps[1:]:
        if j.modules != first.modules:
            raise NextrapError(f"{jump_folder(root, j.step)}: LoRA modules differ from {jump_folder(root, first.step)}")
    kept = [j for j in jumps if upto is None or j.step <= upto]
    if not kept:
        raise NextrapError(f"{root}: no jump saved at or before step {upto} (steps {', '.join(str(j.step) for j in jumps)})")
    return kept


@dataclass
class FoldResult:
    out: Path
    steps: list[int]  # the jumps folded in
    shards: int

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "steps": self.steps, "shards": self.shards}


def fold(base: Path | str, jumps: Path | str, out: Path | str, upto: int | None = None, max_shard_size: str = "5GB",
         overwrite: bool = False) -> FoldResult:
    """Write ``base`` with every jump saved in ``jumps`` at a step <= ``upto`` added, in step order and rounded
    to the base dtype after each as the live model was (one tensor at a time, sharded as ``extend --format merged``)."""
    out = Path(out)
    check_apart(out, {"the base model": base, "the jumps folder": jumps})
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    saved = load_jumps(jumps, upto)
    deltas = module_deltas(saved[0].modules, [(j.move, j.alpha) for j in saved])
    with atomic_dir(out, overwrite=overwrite, kind="fold") as tmp:
        summary = write_merged(tmp, Path(base), deltas, shard_bytes)
        write_json(tmp / PROVENANCE, {
            "tool": "nextrap", "format": "fold", "base": str(Path(base).absolute()), "jumps": str(Path(jumps).absolute()),
            "folded": [{"step": j.step, "method": j.method, "alpha": j.alpha} for j in saved],
            "resume": f"checkpoints saved at steps >= {saved[-1].step}"
                      + ("" if upto is None else f" and <= {upto}") + " load on this model"})
    return FoldResult(out, [j.step for j in saved], summary["shards"])


def _base_weight(live: dict[str, torch.nn.Module], d: WeightDelta) -> torch.Tensor:
    weight = getattr(getattr(live.get(d.module), "base_layer", None), "weight", None)
    if weight is None:
        raise NextrapError(f"the model has no LoRA module {d.module} with a base_layer (the checkpoints' "
                           "modules differ from the model being trained)")
    if list(weight.shape) != d.shape:
        raise NextrapError(f"{d.module}: base weight has shape {list(weight.shape)}, the checkpoints say {d.shape}")
    return weight


def apply_in_place(model: torch.nn.Module, move: Jump, alpha: float, modules: list[LoraModule]) -> int:
    """Add alpha * move to the frozen base weight of every LoRA module of a live PEFT model (``base_layer``),
    computed as ``fold`` computes it (``WeightDelta.added_to``); returns the number of weights changed."""
    live = dict(model.named_modules())
    deltas = module_deltas(modules, [(move, alpha)])
    weights = [_base_weight(live, d) for d in deltas]  # every module checked before any weight changes
    with torch.no_grad():
        for d, weight in zip(deltas, weights):
            weight.copy_(d.added_to(weight))
    return len(deltas)


Score = Callable[[], float]  # how good the live model is now (higher is better), e.g. mean reward on held-out prompts


def choose_by_score(model: torch.nn.Module, move: Jump, alphas: list[float], modules: list[LoraModule],
                    score: Score) -> tuple[float, dict[float, float]]:
    """Jump the live model by each alpha in turn, score it, and put the base weights back (bit for bit, from a
    copy); returns the alpha with the highest score (the first of equal ones) and every alpha's score. The model
    is left as it was: apply the chosen alpha with ``apply_in_place``."""
    live = dict(model.named_modules())
    weights = [_base_weight(live, d) for d in module_deltas(modules, [(move, 0.0)])]
    saved = [w.detach().clone() for w in weights]
    scores: dict[float, float] = {}
    for alpha in alphas:
        if alpha != 0:
            apply_in_place(model, move, alpha, modules)
        try:
            scores[alpha] = float(score())
        finally:
            with torch.no_grad():
                for w, s in zip(weights, saved):
                    w.copy_(s)
    return max(alphas, key=lambda a: scores[a]), scores


def parse_jump_alpha(text: str) -> tuple[float | None, tuple[float, ...]]:
    """A jump's alpha: '1.5' -> (1.5, ()); 'auto' -> (None, ()): the backtest's; 'reward:0.5,1.0,1.5' (any
    ``--alpha`` list or range after 'reward:') -> (None, (0.5, 1.0, 1.5)): the candidate with the best score."""
    if text.strip().lower().startswith("reward:"):
        values = parse_alphas(text.split(":", 1)[1])
        if values is None:
            raise NextrapError(f"--jump-alpha {text!r}: list the candidates after reward:, e.g. reward:0.5,1.0,1.5,2.0")
        return None, tuple(values)
    values = parse_alphas(text)
    if values is not None and len(values) != 1:
        raise NextrapError(f"--jump-alpha {text!r}: one alpha, auto, or reward:A,B,... (candidates chosen by reward)")
    return (values[0] if values else None), ()


@dataclass(frozen=True)
class JumpSettings:
    """How a jump during training chooses. ``method`` / ``alpha``: as ``extend --method`` / ``--alpha`` ("auto" /
    None = the backtest's choice); ``reward_alphas``: choose alpha among these by a score of each jumped model
    instead; ``methods`` (the named ``method`` is always added), ``horizon``, ``backtest_folds``, ``epochs``: as
    ``nextrap fit``."""

    method: str = "auto"
    alpha: float | None = None
    reward_alphas: tuple[float, ...] = ()
    methods: tuple[str, ...] = ("linear", "next")
    horizon: int = 5
    backtest_folds: int = 1
    epochs: int = 1000

    @property
    def fitted(self) -> tuple[str, ...]:
        return self.methods + ((self.method,) if self.method != "auto" and self.method not in self.methods else ())


def since_last_jump(run: Path | str, step: int) -> list[Checkpoint]:
    """The run's checkpoints up to ``step`` that share one base: those saved at or after the last jump saved under
    ``run/nextrap-jumps`` before ``step`` (the jump's own checkpoint is its post-jump state's adapter)."""
    run = Path(run)
    previous = [j.step for j in load_jumps(run / JUMPS) if j.step < step] if (run / JUMPS).is_dir() else []
    start = max(previous, default=None)
    return [c for c in discover(run) if c.step <= step and (start is None or c.step >= start)]


def jump_in_place(model: torch.nn.Module, run: Path | str, step: int, settings: JumpSettings, save: bool = True,
                  score: Score | None = None) -> dict[str, Any]:
    """Jump a live PEFT model at ``step``, whose checkpoint is already saved under ``run``: fit the checkpoints
    since the last jump, choose (``settings``; by ``score`` among ``settings.reward_alphas`` when given), save the
    jump as ``run/nextrap-jumps/step_N`` (when ``save``: the process that writes) and add alpha * move to the LoRA
    base weights. Returns the record: method, alpha, backtest e, fitted steps, scores, seconds, saved folder.
    Alpha 0 (the backtest found nothing better than standing still) changes and saves nothing."""
    t0 = time.perf_counter()
    run = Path(run)
    ckpts = since_last_jump(run, step)
    if not ckpts or ckpts[-1].step != step:
        raise NextrapError(f"{run}: no checkpoint saved at step {step}; jump at steps at which the trainer saves")
    with tempfile.TemporaryDirectory(prefix="nextrap-jump-") as tmp:
        for c in ckpts:  # a copy of the adapters alone: fit reads exactly these checkpoints
            folder = Path(tmp) / "ckpts" / f"step_{c.step}"
            folder.mkdir(parents=True)
            shutil.copy2(c.path / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
            shutil.copy2(c.weights, folder / c.weights.name)
        fit(Path(tmp) / "ckpts", out=Path(tmp) / "fit", horizon=settings.horizon, methods=settings.fitted,
            backtest_folds=settings.backtest_folds, epochs=settings.epochs)
        fitted = load_fit(Path(tmp) / "fit")
        candidates = list(settings.reward_alphas) or None
        chosen = plan(fitted, candidates or (None if settings.alpha is None else [settings.alpha]), settings.method)
        # read the move's checkpoint factors while the copies exist (a checkpoint difference is read lazily)
        lazy = chosen.factored()
        move = Jump(lazy.method, {name: lazy.factors[name] for name in lazy.factors}, lazy.sigma)
    modules = fitted.trajectory.modules
    alpha, scores, score_seconds = chosen.alphas[0], {}, 0.0
    if candidates:
        if score is None:
            raise NextrapError("alpha by reward: no score to choose the candidates by")
        t1 = time.perf_counter()
        alpha, scores = choose_by_score(model, move, chosen.alphas, modules, score)
        score_seconds = time.perf_counter() - t1
    record = {"step": step, "method": chosen.method, "alpha": alpha, "fitted_steps": [c.step for c in ckpts],
              "choice": vars(chosen.choice) if chosen.choice else None, "backtest_error": chosen.errors.get(alpha),
              "scores": {f"{a:g}": s for a, s in scores.items()}, "score_seconds": score_seconds,
              "warnings": chosen.warnings, "saved": None}
    if alpha != 0:
        folder = jump_folder(run / JUMPS, step)
        if save:  # saved before the weights change: a failed save leaves the model as it was
            save_jump(run / JUMPS, step, move, alpha, modules,
                      {"checkpoint": str(ckpts[-1].path.absolute()), "fitted_steps": record["fitted_steps"],
                       "horizon": settings.horizon, "choice": record["choice"], "backtest_error": record["backtest_error"],
                       "scores": record["scores"]})
            record["saved"] = str(folder)
        apply_in_place(model, move, alpha, modules)
    record["seconds"] = time.perf_counter() - t0
    return record
