import math

import pytest
import torch

from conftest import TRAJECTORY, dense_deltas
from nextrap.methods.backtest import BacktestResult, Terms, backtest, choose, evaluate_jump, fold_starts, max_folds, oracle_rank1
from nextrap.methods import METHODS, Jump
from nextrap.trajectories.opening import open_trajectory
from nextrap.methods.predictor import TrainSettings

H = 5


@pytest.fixture(scope="module")
def setup():
    traj = open_trajectory(TRAJECTORY)
    return traj, traj.features(H, sign_align=True)


def test_evaluate_jump_matches_dense_distances(setup):
    traj, _ = setup
    torch.manual_seed(0)
    j = Jump("test", {m.name: (torch.randn(m.out_features, 2, dtype=torch.float64) * 1e-2,
                               torch.randn(m.in_features, 2, dtype=torch.float64) * 1e-2) for m in traj.modules}, {})
    w_from, w_to = dense_deltas(traj, 8), dense_deltas(traj, 13)
    alpha = 1.7
    miss = sum(float(((w_from[n] + alpha * p @ q.mT - w_to[n]) ** 2).sum()) for n, (p, q) in j.factors.items())
    base = sum(float(((w_from[n] - w_to[n]) ** 2).sum()) for n in w_to)
    dot = sum(float(((w_to[n] - w_from[n]) * (p @ q.mT)).sum()) for n, (p, q) in j.factors.items())
    jn = sum(float(((p @ q.mT) ** 2).sum()) for p, q in j.factors.values())
    err, cos = evaluate_jump(traj, j, 8, 13, alpha)
    assert err == pytest.approx(math.sqrt(miss / base), rel=1e-9)
    assert cos == pytest.approx(dot / math.sqrt(base * jn), rel=1e-9)


def test_oracle_is_the_true_moves_best_rank1(setup):
    traj, feats = setup
    w_from, w_to = dense_deltas(traj, 6), dense_deltas(traj, 11)
    miss = base = 0.0
    for n in w_to:
        t = w_to[n] - w_from[n]
        u, s, vh = torch.linalg.svd(t)
        miss += float(((t - s[0] * torch.outer(u[:, 0], vh[0])) ** 2).sum())
        base += float((t ** 2).sum())
    err, _ = oracle_rank1(feats, traj, 6)
    assert err == pytest.approx(math.sqrt(miss / base), rel=1e-5)


def test_backtest_reports_each_method_and_the_oracle(setup):
    traj, feats = setup
    results = backtest(feats, traj, TrainSettings(epochs=5))
    assert [r.method for r in results] == [*METHODS, "oracle-rank1"]
    assert all(r.from_step == 110 and r.to_step == 160 and r.folds == 1 for r in results)
    assert all(math.isfinite(r.error) and -1 <= r.cosine <= 1 for r in results)
    oracle = results[-1]
    assert oracle.error < 1 and oracle.error <= results[0].error  # Eckart-Young: no rank-1 jump does better
    for r in results[:-1]:
        assert 0 <= r.best_alpha <= 4 and r.best_error <= min(1.0, r.error) + 1e-3
        # the closed form agrees with a direct evaluation at the chosen alpha
        assert r.terms.error(r.best_alpha) == pytest.approx(r.best_error)


def test_terms_closed_form():
    t = Terms(t=4.0, c=2.0, j=2.0)  # best alpha = c / j = 1, e(1)^2 = 1 - 2*2/4 + 2/4 = 0.5
    assert t.error(0) == 1.0 and t.error(1) == pytest.approx(math.sqrt(0.5))
    assert t.best_alpha() == 1.0 and t.cosine() == pytest.approx(2 / math.sqrt(8))
    assert Terms(t=1.0, c=-0.5, j=1.0).best_alpha() == 0.0  # pointing backwards: don't jump
    assert Terms(t=1.0, c=10.0, j=1.0).best_alpha() == 4.0  # capped


def test_folds_pool_several_starts(setup):
    traj, feats = setup
    one = {r.method: r for r in backtest(feats, traj, TrainSettings(epochs=2), methods=("linear",), folds=1)}
    three = {r.method: r for r in backtest(feats, traj, TrainSettings(epochs=2), methods=("linear",), folds=3)}
    assert three["linear"].folds == 3 and three["linear"].terms.t > one["linear"].terms.t
    # step 0 is the base (no move): NExt needs a training pair before the earliest start
    assert max_folds(feats) == 16 - 5 - (1 + 5) + 1 and max_folds(feats, ("linear",)) == 16 - 5 - 1 + 1


def test_fold_starts_are_those_the_trajectory_allows():
    """Before the features a fit asks for the starts with row 0 as the first move (a superset of those used)."""
    assert fold_starts(17, 5, 1) == [11]
    assert fold_starts(17, 5, 100, ("relex", "next")) == list(range(11, 4, -1))  # next needs a pair before it
    assert fold_starts(17, 5, 100, ("relex",)) == list(range(11, -1, -1))
    assert fold_starts(17, 5, 100, ("relex", "next"), first_moved=1) == list(range(11, 5, -1))
    assert fold_starts(10, 5, 3, ("next",)) == []


def _result(method, t, c, j):
    terms = Terms(t, c, j)
    best = terms.best_alpha()
    return BacktestResult(method, 1.0, terms.error(1), terms.cosine(), 0, 1, best, terms.error(best), 1, terms)


def test_choose_picks_the_lowest_error_or_no_jump():
    results = [_result("next", 1, 0.2, 1), _result("linear", 1, 0.6, 1), _result("oracle-rank1", 1, 0.9, 0.9)]
    best = choose(results)
    assert (best.method, best.alpha) == ("linear", 0.6) and best.error == pytest.approx(0.8)
    assert choose(results, method="next").alpha == 0.2
    assert choose(results, alphas=[1.0]).method == "linear"
    pick = choose(results, alphas=[0.25, 0.5])
    assert (pick.method, pick.alpha) == ("linear", 0.5)
    bad = [_result("next", 1, -0.3, 1), _result("linear", 1, 0.01, 1)]  # 0.01 gain: chance, not skill
    none = choose(bad)
    assert none.alpha == 0.0 and none.error == 1.0 and "no jump" in none.reason


def test_backtest_needs_2h_plus_1_checkpoints(setup):
    traj, feats = setup
    with pytest.raises(ValueError, match="at least 11 checkpoints"):
        backtest(feats.truncate(10), traj, TrainSettings(epochs=1))
