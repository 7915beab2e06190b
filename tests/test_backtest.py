import math

import pytest
import torch

from conftest import TRAJECTORY
from nextrap.backtest import backtest, evaluate_jump, oracle_rank1
from nextrap.checkpoints import load_trajectory
from nextrap.methods import Jump
from nextrap.predictor import TrainSettings
from nextrap.trajectory import compute_features

H = 5


@pytest.fixture(scope="module")
def setup():
    traj = load_trajectory(TRAJECTORY)
    return traj, compute_features(traj, H)


def _dense(traj, row):
    out = {}
    for m in traj.modules:
        b, a = traj.factors(row, [m.name])
        out[m.name] = m.scale * b[0] @ a[0]
    return out


def test_evaluate_jump_matches_dense_distances(setup):
    traj, _ = setup
    torch.manual_seed(0)
    j = Jump("test", {m.name: (torch.randn(m.out_features, 2, dtype=torch.float64) * 1e-2,
                               torch.randn(m.in_features, 2, dtype=torch.float64) * 1e-2) for m in traj.modules}, {})
    w_from, w_to = _dense(traj, 8), _dense(traj, 13)
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
    w_from, w_to = _dense(traj, 6), _dense(traj, 11)
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
    assert [r.method for r in results] == ["next", "linear", "oracle-rank1"]
    assert all(r.from_step == 110 and r.to_step == 160 for r in results)
    assert all(math.isfinite(r.error) and -1 <= r.cosine <= 1 for r in results)
    oracle = results[-1]
    assert oracle.error < 1 and oracle.error <= results[0].error  # Eckart-Young: no rank-1 jump does better


def test_backtest_needs_2h_plus_1_checkpoints(setup):
    traj, feats = setup
    with pytest.raises(ValueError, match="at least 11 checkpoints"):
        backtest(feats.truncate(10), traj, TrainSettings(epochs=1))
