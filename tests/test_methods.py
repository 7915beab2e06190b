import pytest
import torch

from conftest import TRAJECTORY
from nextrap.checkpoints import load_trajectory
from nextrap.methods import METHODS, JumpContext, jump
from nextrap.predictor import TrainSettings, train
from nextrap.trajectory import compute_features

H = 5


@pytest.fixture(scope="module")
def setup():
    traj = load_trajectory(TRAJECTORY)
    return traj, compute_features(traj, H)


def _delta(traj, row, name):
    if row < 0:
        return 0
    b, a = traj.factors(row, [name])
    return traj.module(name).scale * b[0] @ a[0]


@pytest.mark.parametrize("row", [16, 3])  # 3 - h < 0: the move is measured from the base model
def test_linear_is_the_last_h_checkpoint_move(setup, row):
    traj, feats = setup
    j = jump("linear", JumpContext(feats, traj, row))
    for m in traj.modules:
        p, q = j.factors[m.name]
        assert torch.allclose(p @ q.mT, _delta(traj, row, m.name) - _delta(traj, row - H, m.name), atol=1e-12)


def test_next_is_rank1_with_the_predicted_sigma(setup):
    traj, feats = setup
    pred = train(feats, TrainSettings(epochs=5))
    j = jump("next", JumpContext(feats, traj, feats.n_rows - 1, pred))
    for m in traj.modules:
        p, q = j.factors[m.name]
        assert p.shape == (m.out_features, 1) and q.shape == (m.in_features, 1)
        assert torch.linalg.matrix_norm(p @ q.mT, ord=2) == pytest.approx(abs(j.sigma[m.name]), rel=1e-6)


def test_next_without_predictor_and_unknown_method(setup):
    traj, feats = setup
    with pytest.raises(ValueError, match="needs a fitted predictor"):
        jump("next", JumpContext(feats, traj, 16))
    with pytest.raises(ValueError, match="unknown method"):
        jump("nope", JumpContext(feats, traj, 16))
    assert set(METHODS) >= {"next", "linear"}


def test_expo_is_the_whole_update_so_far(setup):
    traj, feats = setup
    j = jump("expo", JumpContext(feats, traj, 12))
    for m in traj.modules:
        p, q = j.factors[m.name]
        assert torch.allclose(p @ q.mT, _delta(traj, 12, m.name), atol=1e-12)


def test_relex_moves_along_the_latest_direction_by_the_fitted_line(setup):
    traj, feats = setup
    row = 16
    j = jump("relex", JumpContext(feats, traj, row))
    steps = torch.tensor(feats.steps, dtype=torch.float64)
    for m in traj.modules[:4]:
        u = feats.get(m.name, "global", "u")[row].double()
        v = feats.get(m.name, "global", "v")[row].double()
        coeff = torch.stack([u @ _delta(traj, i, m.name) @ v for i in range(row + 1)])
        x, y = steps[1:], coeff[1:]  # step 0 has no delta
        slope, intercept = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution[:, 0]
        expected = float(slope * (160 + 5 * 10) + intercept - coeff[-1])
        p, q = j.factors[m.name]
        assert torch.allclose(p @ q.mT, expected * torch.outer(u, v), atol=1e-9)
