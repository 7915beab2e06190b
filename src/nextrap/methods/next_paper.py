"""NExt exactly as published (arXiv 2604.11446 and its reference code; see shared METHOD.md): the predictor
(``nextrap.methods.predictor``) maps the last checkpoint's global and local rank-1 components to the target one, on the
features as the SVD gives them (no sign alignment), and the move is sigma_hat * u_hat v_hat^T with u_hat,
v_hat normalized. Kept for reproduction; ``next`` is our measured improvement."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from nextrap.core.errors import first_line
from nextrap.core.errors import NextrapError
from nextrap.io.files import read_json, write_json
from nextrap.methods.predictor import Group, Predictor, TrainSettings, legacy_key, load as load_predictor, predict, train
from nextrap.core.features import Features
from nextrap.methods import Jump, JumpContext, rank1_factors

WEIGHTS = "predictor.safetensors"
CONFIG = "predictor.json"


def fit(features: Features, settings: TrainSettings, on_epoch: Callable[[int, int], None] | None = None,
        trajectory: Any = None) -> Predictor:
    report = (lambda e: on_epoch(e + 1, settings.epochs)) if on_epoch else None
    return train(features, settings, on_epoch=report)


def jump(ctx: JumpContext) -> Jump:
    model = ctx.models.get("next-paper")
    if model is None:
        raise ValueError("the next-paper method needs a fitted predictor")
    pred = predict(model, ctx.features, ctx.row)
    # a 1-D parameter's prediction is its raw delta vector: P = vec [m, 1], Q = [[1]]
    factors = {m: (p["vec"].double()[:, None], torch.ones(1, 1, dtype=torch.float64)) if "vec" in p
               else rank1_factors(float(p["sigma"]), p["u"], p["v"]) for m, p in pred.items()}
    return Jump("next-paper", factors, {m: float(p["vec"].norm() if "vec" in p else p["sigma"]) for m, p in pred.items()})


def save(model: Predictor, folder: Path) -> dict[str, Any]:
    save_file(model.state_dict(), str(folder / WEIGHTS), metadata={"format": "pt"})
    s = model.settings
    write_json(folder / CONFIG, {
        "architecture": "NExtMLP", "hidden": s.hidden, "epochs": s.epochs, "lr": s.lr, "min_lr_ratio": s.min_lr_ratio,
        "weight_decay": s.weight_decay, "seed": s.seed,
        "groups": [{"key": g.key, "length": g.length, "members": [f"{m}:{p}" for m, p in g.members],
                    "loss_first": g.losses[0], "loss_last": g.losses[-1]} for g in model.groups],
    })
    return {"files": [WEIGHTS, CONFIG], "loss": {g.key: {"first": g.losses[0], "last": g.losses[-1]} for g in model.groups}}


def saved_in(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def load(folder: Path, settings: TrainSettings) -> Predictor:
    config = read_json(folder / CONFIG)
    try:
        settings = TrainSettings(epochs=config["epochs"], lr=config["lr"], min_lr_ratio=config["min_lr_ratio"],
                                 weight_decay=config["weight_decay"], hidden=config["hidden"], seed=config["seed"])
        # a fit saved before the groups had keys grouped by length alone (``predictor.legacy_key``)
        groups = [Group(g.get("key", legacy_key(g["length"])), g["length"], [tuple(m.rsplit(":", 1)) for m in g["members"]])
                  for g in config["groups"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise NextrapError(f"{folder / CONFIG}: missing or malformed field ({first_line(e)})") from None
    try:
        return load_predictor(load_file(str(folder / WEIGHTS)), groups, settings)
    except Exception as e:  # noqa: BLE001 - corrupt file or weights that do not fit the config
        raise NextrapError(f"{folder / WEIGHTS}: cannot load the predictor ({first_line(e)})") from None
