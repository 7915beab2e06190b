import pytest
import torch
from torch import nn

from conftest import TRAJECTORY
from nextrap.io.checkpoints import load_trajectory
from nextrap.methods.predictor import NExtMLP, TrainSettings, load, make_groups, predict, train, training_rows
from nextrap.engine.features import compute_features


@pytest.fixture(scope="module")
def feats():
    return compute_features(load_trajectory(TRAJECTORY), 5)


def test_layer_shapes_are_the_reference_ones():
    m = NExtMLP(10)
    linears = lambda seq: [(l.in_features, l.out_features) for l in seq if isinstance(l, nn.Linear)]  # noqa: E731
    assert linears(m.f_G) == linears(m.f_L) == [(10, 256), (256, 10), (10, 256), (256, 10)]
    assert linears(m.f_D) == [(20, 256), (256, 20), (20, 256), (256, 10)]
    assert [type(l).__name__ for l in m.f_G] == ["Linear", "Linear", "ReLU", "Linear", "Linear"]
    assert m(torch.zeros(3, 7, 10), torch.zeros(3, 7, 10)).shape == (3, 7, 10)


def test_one_predictor_per_vector_length(feats):
    groups = make_groups(feats)
    lengths = [g.length for g in groups]
    assert lengths == sorted(set(lengths)) and lengths[0] == 1
    assert all(p == "sigma" for _, p in groups[0].members) and len(groups[0].members) == len(feats.modules)
    for g in groups[1:]:  # u's and v's of the same length share one model
        assert all(feats.get(m, "global", p).shape[-1] == g.length for m, p in g.members)
    assert sum(len(g.members) for g in groups) == 3 * len(feats.modules)


def test_training_pairs_are_rows_with_a_known_target(feats):
    assert training_rows(feats) == list(range(1, feats.n_rows - 5))
    assert training_rows(feats.truncate(16)) == list(range(1, 11))  # c = 15, h = 5: the paper's ten pairs (step 0 is W_0)


def test_training_is_seeded_and_reduces_the_loss(feats):
    a = train(feats, TrainSettings(epochs=40, seed=3))
    b = train(feats, TrainSettings(epochs=40, seed=3))
    c = train(feats, TrainSettings(epochs=40, seed=4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(g.losses[-1] < g.losses[0] for g in a.groups)


def test_cosine_schedule_ends_at_a_tenth_of_lr(feats, monkeypatch):
    seen = []
    real = torch.optim.lr_scheduler.CosineAnnealingLR

    def spy(opt, **kw):
        seen.append(kw)
        return real(opt, **kw)

    monkeypatch.setattr(torch.optim.lr_scheduler, "CosineAnnealingLR", spy)
    train(feats, TrainSettings(epochs=3))
    assert seen[0] == {"T_max": 3, "eta_min": pytest.approx(2e-6)}


def test_predict_gives_unit_vectors_and_roundtrips_through_state(feats):
    pred = train(feats, TrainSettings(epochs=5))
    out = predict(pred, feats, feats.n_rows - 1)
    for m in feats.modules:
        assert out[m]["u"].norm() == pytest.approx(1, abs=1e-5)
        assert out[m]["v"].norm() == pytest.approx(1, abs=1e-5)
        assert out[m]["u"].shape == feats.get(m, "global", "u").shape[1:]
    again = load(pred.state_dict(), make_groups(feats), pred.settings)
    out2 = predict(again, feats, feats.n_rows - 1)
    assert all(torch.equal(out[m]["u"], out2[m]["u"]) for m in feats.modules)
