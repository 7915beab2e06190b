"""NExt, improved by measurement (our default): keep the straight line W_c - W_{c-h} for everything but its
dominant rank-1 part, and replace that part by a predicted one.

Why this shape (benchmarks/RESULTS.md): on real GRPO trajectories the last h-checkpoint move predicts the next
one better (cosine ~0.7) than any rank-1 predictor did, the published NExt MLP included (cosine 0.2-0.5), and
its non-dominant part carries most of that skill, so it is kept. What a rank-1 model can add is how the
dominant direction turns and grows.

The rank-1 predictor is one small model shared by every module (inputs are unit vectors, so modules of any
shape and type pool their data): with D_i the top singular triple of W_i - W_{i-h}, G_i of the global and L_i
of the local delta (sign-aligned),
    u_hat = normalize(a_D u_D + a_G u_G + a_L u_L),   v_hat likewise with its own weights,
    sigma_hat = sigma_D * exp(mean log(sigma_T / sigma_D)),
with G and L signed to agree with D, fitted in closed form (ridge least squares) on the pairs whose D is a true
h-checkpoint move. How much of the prediction replaces D's own rank-1 part, rho in [0, 1], is chosen on the
last pair held out (weights refitted without it and without the pairs overlapping it): rho = 0, the straight
line, when the prediction does not beat D's own rank-1 part there or when there are too few pairs to check.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from nextrap.core.errors import NextrapError
from nextrap.io.files import write_json
from nextrap.methods.predictor import training_rows
from nextrap.trajectories.interface import Trajectory
from nextrap.core.features import Features
from nextrap.methods import Jump, JumpContext, combine, difference_jump, rank1_factors

CONFIG = "next.json"
RIDGE = 1e-6  # relative to the Gram matrix's trace: keeps the 3 x 3 solve defined when inputs coincide
INPUTS = ("D", "G", "L")


@dataclass
class NextModel:
    weights_u: list[float]  # over INPUTS
    weights_v: list[float]
    log_ratio: float  # mean log(sigma_T / sigma_D)
    rho: float  # share of the prediction replacing D's rank-1 part
    sign_align: bool
    pairs: int  # training pairs (checkpoints), pooled over modules
    validation: dict[str, float] = field(default_factory=dict)  # rank-1 errors on the held-out pair


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (sigma, u, v)


def _rank1(features: Features, module: str, kind: str, row: int) -> Triple:
    return tuple(features.get(module, kind, part)[row].double() for part in ("sigma", "u", "v"))  # type: ignore[return-value]


def _agree(x: Triple, ref: Triple) -> Triple:
    """x with the sign of its (u, v) pair chosen to agree with ref's: u v^T is unchanged, but the series are
    each sign-aligned only along their own checkpoints, so G's and L's sign relative to D is arbitrary."""
    if float(x[1] @ ref[1] + x[2] @ ref[2]) < 0:
        return x[0], -x[1], -x[2]
    return x


def inputs(features: Features, module: str, row: int) -> dict[str, Triple]:
    """Rank-1 triples at ``row``: D (of W_row - W_{row-h}, the straight line's move), G (global), L (local),
    G and L signed to agree with D."""
    h = features.horizon
    d = _rank1(features, module, "target", row - h) if row >= h else _rank1(features, module, "global", row)
    return {"D": d, "G": _agree(_rank1(features, module, "global", row), d),
            "L": _agree(_rank1(features, module, "local", row), d)}


def matrices(features: Features) -> list[str]:
    """The modules with a rank-1 decomposition (1-D parameters of a full-parameter fit have none)."""
    return [m for m in features.modules if not features.is_vector(m)]


def _rows(features: Features) -> list[int]:
    """Training rows: a known target and a moved global delta (step-0 adapters are the base model, not a
    pair); of those, the ones whose D is a true h-checkpoint move (i >= h) when there are any: before that D
    is the whole update so far, whose size relates differently to the next move's."""
    pairs = training_rows(features)
    return [i for i in pairs if i >= features.horizon] or pairs


def _fit_weights(features: Features, rows: list[int]) -> tuple[list[float], list[float], float]:
    """Ridge least squares u_T ~ sum_k w_k u_k (and v likewise) pooled over rows and modules, accumulated as
    3 x 3 normal equations; the mean log sigma ratio."""
    k = len(INPUTS)
    gram_u, rhs_u = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    gram_v, rhs_v = torch.zeros_like(gram_u), torch.zeros_like(rhs_u)
    logs = []
    for i in rows:
        for m in matrices(features):
            inp = inputs(features, m, i)
            target = _agree(_rank1(features, m, "target", i), inp["D"])
            if float(inp["D"][0]) <= 0 or float(target[0]) <= 0:
                continue  # a module that did not move: no direction to learn from
            xu = torch.stack([inp[name][1] for name in INPUTS])
            xv = torch.stack([inp[name][2] for name in INPUTS])
            gram_u += xu @ xu.T
            rhs_u += xu @ target[1]
            gram_v += xv @ xv.T
            rhs_v += xv @ target[2]
            logs.append(math.log(float(target[0]) / float(inp["D"][0])))
    if not logs:
        raise ValueError("no module moved on any training pair")
    return _solve(gram_u, rhs_u), _solve(gram_v, rhs_v), sum(logs) / len(logs)


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> list[float]:
    ridge = RIDGE * float(gram.trace()) / gram.shape[0] + 1e-30
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), rhs).tolist()


def _predict(features: Features, module: str, row: int, wu: list[float], wv: list[float],
             log_ratio: float) -> tuple[float, torch.Tensor, torch.Tensor, Triple]:
    """(sigma_hat, u_hat, v_hat) of the next move's rank-1 part, and D's own triple."""
    inp = inputs(features, module, row)
    u = sum(w * inp[k][1] for w, k in zip(wu, INPUTS))
    v = sum(w * inp[k][2] for w, k in zip(wv, INPUTS))
    u = u / u.norm().clamp_min(1e-12)
    v = v / v.norm().clamp_min(1e-12)
    return float(inp["D"][0]) * math.exp(log_ratio), u, v, inp["D"]


def _inner(a: Triple, b: Triple) -> float:
    """<sigma_a u_a v_a^T, sigma_b u_b v_b^T> without forming the matrices."""
    return float(a[0]) * float(b[0]) * float(a[1] @ b[1]) * float(a[2] @ b[2])


def _choose_rho(features: Features, rows: list[int], trajectory: Trajectory | None = None) -> tuple[float, dict[str, Any]]:
    """Fit without the last pair, predict it: the best share rho of (prediction P - D's rank-1 D1) to add to D.

    The error of D + rho (P - D1) against the true move T is quadratic in rho: ||D - T||^2 - 2 rho num +
    rho^2 den with num = <P - D1, T - D> and den = ||P - D1||^2. Where the trajectory affords passes of its own
    (``exact_checks``: LoRA factors) both are exact; otherwise only the rank-1 parts are known and T, D stand in
    as T1, D1 (a proxy that misses how the rest of D relates to P). The pairs whose target overlaps the held-out one (i > i* - h) are left out of
    that fit, or the held-out move would leak into it; rho is 0 when no pair is left for it."""
    held = rows[-1] if rows else None
    train_rows = [i for i in rows if held is not None and i <= held - features.horizon]
    if not train_rows:
        return 0.0, {"held_out_pairs": 0}
    try:
        wu, wv, lr = _fit_weights(features, train_rows)
    except ValueError:
        return 0.0, {"held_out_pairs": 0}
    preds = {}
    for m in matrices(features):
        sigma, u, v, d1 = _predict(features, m, held, wu, wv, lr)
        preds[m] = ((torch.tensor(sigma, dtype=torch.float64), u, v), d1)
    exact = trajectory is not None and trajectory.exact_checks
    if exact:
        num, straight = _exact_terms(trajectory, features, held, preds)
    else:
        num, straight = 0.0, 0.0
        for m, (pred, d1) in preds.items():
            t1 = _rank1(features, m, "target", held)
            num += _inner(pred, t1) - _inner(pred, d1) - _inner(d1, t1) + _inner(d1, d1)
            straight += _inner(d1, d1) - 2 * _inner(d1, t1) + _inner(t1, t1)
    den = sum(_inner(p, p) - 2 * _inner(p, d1) + _inner(d1, d1) for p, d1 in preds.values())
    rho = min(max(num / den, 0.0), 1.0) if den > 0 else 0.0
    after = straight - 2 * rho * num + rho**2 * den
    return rho, {"held_out_pairs": 1, "held_out_step": features.steps[held], "training_pairs": len(train_rows),
                 "exact": exact, "error_straight": math.sqrt(max(straight, 0.0)), "error_next": math.sqrt(max(after, 0.0))}


def _exact_terms(traj: Trajectory, features: Features, row: int, preds: dict[str, tuple[Triple, Triple]]) -> tuple[float, float]:
    """num = sum <P - D1, T - D> and ||D - T||^2 over modules, with D = W_row - W_{row-h}, T = W_{row+h} - W_row,
    exactly, from one pass of the trajectory's ``terms`` against T: <Y, T>, ||T||^2, <T, D>, ||D||^2 (Y = P - D1),
    and <Y, D> from the norms of Y, D and Y + D (one checkpoint pass fewer than measuring Y against D; all
    three are of the size of D, so float64 keeps their difference)."""
    h = features.horizon
    y = Jump("p - d1", {m: tuple(torch.cat(f, -1) for f in zip(rank1_factors(float(sigma), u, v), rank1_factors(-float(sd), ud, vd)))
                        for m, ((sigma, u, v), (sd, ud, vd)) in preds.items()}, {})
    d = traj.difference(row, row - h if row >= h else None, "d")
    against_t, t = traj.terms({"y": y, "d": d, "y+d": combine("y+d", d, y)}, row, row + h)
    y_d = (against_t["y+d"].j - against_t["y"].j - against_t["d"].j) / 2
    return against_t["y"].c - y_d, t - 2 * against_t["d"].c + against_t["d"].j


def fit(features: Features, settings: Any = None, on_epoch: Callable[[int, int], None] | None = None,
        trajectory: Trajectory | None = None) -> NextModel:
    # The stored features keep SVD's signs. Aligning them along the checkpoints (``Features.aligned``) could not
    # change this fit or its jump: every row's inputs and target are signed against that row's D (``_agree``),
    # and flipping a row's D with them flips u_hat and v_hat together. So it is skipped (it cost 3 s per call
    # at 7B shapes); ``sign_align`` is kept as the setting the fit was asked for.
    sign_align = getattr(settings, "sign_align", True)
    rows = _rows(features)
    if not rows:
        raise ValueError("no training pairs: need more checkpoints than the horizon")
    rho, validation = _choose_rho(features, rows, trajectory)
    wu, wv, log_ratio = _fit_weights(features, rows)
    if on_epoch:
        on_epoch(1, 1)  # closed form: one step
    return NextModel(wu, wv, log_ratio, rho, sign_align, len(rows), validation)


def jump(ctx: JumpContext) -> Jump:
    model = ctx.models.get("next")
    if model is None:
        raise ValueError("the next method needs a fitted model")
    straight = difference_jump(ctx, ctx.row - ctx.features.horizon, "next")
    factors, sigmas = {}, {}
    for m in matrices(ctx.features):  # unaligned features give the same move (``fit``)
        sigma, u, v, (sd, ud, vd) = _predict(ctx.features, m, ctx.row, model.weights_u, model.weights_v, model.log_ratio)
        # D + rho (sigma u v^T - sigma_D u_D v_D^T) as two appended rank-1 columns
        ra, rb = math.sqrt(model.rho * sigma), math.sqrt(model.rho * float(sd))
        factors[m] = (torch.stack([ra * u, -rb * ud], 1), torch.stack([ra * v, rb * vd], 1))
        sigmas[m] = sigma
    if model.rho == 0:  # the straight line: no zero columns in the adapter
        return straight
    return combine("next", straight, Jump("next", factors, sigmas))


def save(model: NextModel, folder: Path) -> dict[str, Any]:
    write_json(folder / CONFIG, {"model": "next-shared-rank1", "inputs": list(INPUTS), **asdict(model)})
    return {"files": [CONFIG], "rho": model.rho, "validation": model.validation}


def saved_in(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def load(folder: Path, settings: Any = None) -> NextModel:
    try:
        data = json.loads((folder / CONFIG).read_text())
        if len(data["weights_u"]) != len(INPUTS) or len(data["weights_v"]) != len(INPUTS):
            raise KeyError(f"weights_u and weights_v need {len(INPUTS)} values")
        return NextModel(data["weights_u"], data["weights_v"], data["log_ratio"], data["rho"], data["sign_align"], data["pairs"],
                         data.get("validation", {}))
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise NextrapError(f"{folder / CONFIG}: cannot read the next model ({e})") from None
