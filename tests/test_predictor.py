import math

import pytest
import torch
from torch import nn

from conftest import TRAJECTORY
from nextrap.core.features import VEC, Features
from nextrap.engine.lorafeatures import compute_features
from nextrap.io.checkpoints import load_trajectory
from nextrap.methods import predictor
from nextrap.methods.predictor import (SMALL_GROUP, NExtMLP, Predictor, TrainSettings, group_tensors, load, make_groups, predict,
                                       train, training_rows)


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


def with_vector(feats: Features, module: str, d: int, seed: int = 0) -> Features:
    """``feats`` plus a 1-D parameter ``module`` of length ``d`` (full fine-tuning's raw delta, ``vec``): it
    moves from row 1 on (row 0 is W_0, as in the fixture), its targets past the end NaN."""
    g = torch.Generator().manual_seed(seed)
    local = torch.randn(feats.n_rows, d, generator=g) * 1e-3
    local[0] = 0
    glob = local.cumsum(0)
    target = torch.full_like(glob, float("nan"))
    h = feats.horizon
    target[:-h] = glob[h:] - glob[:-h]
    tensors = {**feats.tensors, f"{module}:global:{VEC}": glob, f"{module}:local:{VEC}": local, f"{module}:target:{VEC}": target}
    return Features(feats.steps, feats.horizon, feats.sign_align, [*feats.modules, module], tensors)


def train_one_group_at_a_time(features: Features, settings: TrainSettings) -> Predictor:
    """The reference: the predictor as it was trained before the groups shared one loop, one NExtMLP after the
    other, each with its own AdamW and cosine schedule (one thread for a small group on the CPU)."""
    rows = training_rows(features)
    groups = make_groups(features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        models = {g.length: NExtMLP(g.length, settings.hidden) for g in groups}
    for g in groups:
        model = models[g.length]
        xg, xl, xt = group_tensors(features, g, rows)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs,
                                                           eta_min=settings.lr * settings.min_lr_ratio)
        old = torch.get_num_threads()
        torch.set_num_threads(1 if g.length <= SMALL_GROUP else old)
        try:
            for _ in range(settings.epochs):
                loss = (model(xg, xl) - xt).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                g.losses.append(loss.item())
        finally:
            torch.set_num_threads(old)
        if not math.isfinite(g.losses[-1]):
            raise FloatingPointError(f"predictor for length {g.length} diverged (loss {g.losses[-1]})")
    return Predictor(groups, models, settings)


def test_groups_trained_in_one_loop_match_training_each_alone(feats, monkeypatch):
    mixed = with_vector(feats, "model.norm", 64)  # a 1-D parameter's delta joins the u's and v's of length 64
    assert [(g.length, sum(p == VEC for _, p in g.members)) for g in make_groups(mixed)] == [(1, 0), (32, 0), (64, 1), (128, 0)]
    monkeypatch.setattr(predictor, "LOSS_CHUNK", 10)  # losses read back from the device after epochs 10, 20 and 25
    settings = TrainSettings(epochs=25, seed=1)
    epochs = []
    batched = train(mixed, settings, on_epoch=epochs.append)
    alone = train_one_group_at_a_time(mixed, settings)
    assert epochs == list(range(25))  # one report per epoch, not one per group and epoch
    sb, sa = batched.state_dict(), alone.state_dict()
    assert sb.keys() == sa.keys()
    for k in sa:  # disjoint parameters, equal settings: the same arithmetic, bit for bit
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)
    for gb, ga in zip(batched.groups, alone.groups):
        assert len(gb.losses) == 25 and gb.losses == ga.losses
        assert gb.losses[-1] < gb.losses[0]


def test_a_diverged_group_is_an_error(feats):
    with pytest.raises(FloatingPointError, match="diverged"):
        train(with_vector(feats, "model.norm", 48), TrainSettings(epochs=3, lr=float("inf")))
