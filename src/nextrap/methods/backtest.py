"""Backtests on the user's own trajectory: pretend checkpoint c is the future, refit on the checkpoints up to
c - h, jump from c - h, and measure how close the jump lands to the true c.

    error e(alpha) = ||W_from + alpha * move - W_to|| / ||W_from - W_to||   (Frobenius, all modules together)

e < 1 means the jump lands closer to the future than not jumping (e(0) = 1). With t = ||W_to - W_from||^2,
c = <W_to - W_from, move> and j = ||move||^2, e(alpha)^2 = 1 - 2 alpha c / t + alpha^2 j / t, so the error at
every alpha, and the best alpha c / j, follow exactly from three numbers per fold. Several folds (jumping
from c - h, c - h - 1, ...) pool those numbers. ``oracle-rank1`` jumps by the true move's own best rank-1
part: the ceiling for any rank-1 predictor such as NExt.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextrap.methods import FITTED, METHODS, JumpContext, fit_models, jump
from nextrap.core.moves import ALPHA_MAX, Jump, Terms  # noqa: F401 - re-exported: the backtest's value types
from nextrap.methods.predictor import TrainSettings
from nextrap.trajectories.interface import Trajectory
from nextrap.core.features import Features


@dataclass
class BacktestResult:
    method: str
    alpha: float  # the alpha of ``error`` (1: the move as predicted)
    error: float  # e(alpha)
    cosine: float  # cosine of the predicted move with the true move, all modules as one vector
    from_step: int  # the latest fold's start
    to_step: int
    best_alpha: float  # argmin of e over 0 <= alpha <= ALPHA_MAX (0: don't jump)
    best_error: float
    folds: int
    terms: Terms

    @classmethod
    def from_json(cls, d: dict) -> "BacktestResult":
        return cls(**{**d, "terms": Terms(**d["terms"])})


def jump_terms(traj: Trajectory, j: Jump, from_row: int, to_row: int) -> Terms:
    """t, c, j of a predicted move against the true W_to - W_from (one streamed pass)."""
    terms, _ = traj.terms({"jump": j}, from_row, to_row)
    return terms["jump"]


def evaluate_jump(traj: Trajectory, j: Jump, from_row: int, to_row: int, alpha: float) -> tuple[float, float]:
    """(error e, cosine) of ``W_from + alpha * move`` against the true ``W_to``."""
    terms = jump_terms(traj, j, from_row, to_row)
    return terms.error(alpha), terms.cosine()


def oracle_terms(features: Features, traj: Trajectory, from_row: int) -> Terms:
    """Terms of jumping by the true move's own best rank-1 part: c = j = sigma_1^2 per module."""
    kept = oracle_kept(features, from_row)
    _, t = traj.terms({}, from_row, from_row + features.horizon)
    return Terms(t, kept, kept)


def oracle_kept(features: Features, from_row: int) -> float:
    """sum of sigma_1^2 of every module's target delta (a 1-D parameter's raw delta is its own rank-1 part)."""
    return sum(float(features.get(m, "target", "vec")[from_row].double().square().sum()) if features.is_vector(m)
               else float(features.get(m, "target", "sigma")[from_row].double() ** 2) for m in features.modules)


def oracle_rank1(features: Features, traj: Trajectory, from_row: int) -> tuple[float, float]:
    """(error, cosine) of the rank-1 oracle at alpha 1."""
    terms = oracle_terms(features, traj, from_row)
    return terms.error(1.0), terms.cosine()


def fold_starts(n_rows: int, horizon: int, folds: int, methods: tuple[str, ...] = METHODS, first_moved: int = 0) -> list[int]:
    """The rows up to ``folds`` backtest folds jump from, c - h, c - h - 1, ..., as far as the trajectory allows:
    the earliest start must leave a fitted method (NExt) one training pair after the first row that moved
    (``first_moved``; before the features are known, row 0: the starts a backtest can use at most)."""
    c = n_rows - 1
    earliest = first_moved + horizon if any(m in FITTED for m in methods) else first_moved
    return [c - horizon - f for f in range(folds) if c - horizon - f >= earliest]


def max_folds(features: Features, methods: tuple[str, ...] = METHODS) -> int:
    """How many folds the trajectory allows (``fold_starts``)."""
    return len(fold_starts(features.n_rows, features.horizon, features.n_rows, methods, _first_moved(features)))


def _first_moved(features: Features) -> int:
    moved = features.moved_rows()
    return moved[0] if moved else features.n_rows


def backtest(features: Features, traj: Trajectory, settings: TrainSettings, methods: tuple[str, ...] = METHODS,
             alpha: float = 1.0, folds: int = 1) -> list[BacktestResult]:
    """One result per method plus the rank-1 oracle, pooled over ``folds`` starts c - h, c - h - 1, ...; each
    fold's moves are measured in one pass of the trajectory (``Trajectory.terms``)."""
    h, c = features.horizon, features.n_rows - 1
    starts = fold_starts(features.n_rows, h, folds, methods, _first_moved(features))
    if not starts:
        raise ValueError(f"backtest needs at least {2 * h + 1} checkpoints after the first move for horizon {h}; "
                         f"have {features.n_rows} in all")
    pooled = {m: Terms() for m in (*methods, "oracle-rank1")}
    for start in starts:
        past = features.truncate(start + 1)
        models = fit_models(past, methods, settings, trajectory=traj)
        jumps = {method: jump(method, JumpContext(past, traj, start, models)) for method in methods}
        terms, t = traj.terms(jumps, start, start + h)
        for method in methods:
            pooled[method] += terms[method]
        kept = oracle_kept(features, start)
        pooled["oracle-rank1"] += Terms(t, kept, kept)
    if pooled["oracle-rank1"].t == 0:
        raise ValueError(f"checkpoints at steps {features.steps[starts[-1]]}..{features.steps[c]} are identical: "
                         "there is no movement to backtest against")
    results = []
    for method, terms in pooled.items():
        best = 1.0 if method == "oracle-rank1" else terms.best_alpha()
        results.append(BacktestResult(method, alpha, terms.error(alpha), terms.cosine(), features.steps[starts[0]],
                                      features.steps[starts[0] + h], best, terms.error(best), len(starts), terms))
    return results


@dataclass
class Choice:
    """What ``extend --method auto`` / ``--alpha auto`` picked, and why."""

    method: str
    alpha: float
    error: float  # backtest e at that alpha (1.0 = no better than standing still)
    reason: str


MIN_GAIN = 0.02  # a jump must land at least 2% closer than standing still; smaller gains are within chance


def choose(results: list[BacktestResult], method: str | None = None, alphas: list[float] | None = None,
           min_gain: float = MIN_GAIN) -> Choice:
    """The (method, alpha) with the lowest backtest error, alpha taken from ``alphas`` or, when None, each
    method's best; alpha 0 (don't jump) when nothing lands ``min_gain`` closer than standing still.
    ``method`` fixes the method; None chooses it."""
    candidates = [r for r in results if r.method != "oracle-rank1" and (method is None or r.method == method)]
    if not candidates:
        raise ValueError(f"no backtest for method {method!r}")
    scored = []
    for r in candidates:
        options = [(r.best_error, r.best_alpha)] if alphas is None else [(r.terms.error(a), a) for a in alphas]
        error, alpha = min(options)
        scored.append((error, alpha, r))
    # on a tie (e.g. next falling back to the straight line in the backtest) the method without a fitted model
    # wins: the simpler jump is the one the backtest actually measured
    error, best_alpha, r = min(scored, key=lambda x: (round(x[0], 9), x[2].method in FITTED))
    if error > 1.0 - min_gain or best_alpha == 0:
        return Choice(method or r.method, 0.0, 1.0, f"no jump: nothing beat standing still by {min_gain:.0%} in the "
                                                    f"backtest (best e = {error:.3f} for {r.method} at alpha {best_alpha:g})")
    return Choice(r.method, best_alpha, error, f"lowest backtest error e = {error:.3f} ({r.folds} fold(s), "
                                               f"steps {r.from_step} -> {r.to_step})")
