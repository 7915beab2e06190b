import math
import warnings

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


def test_one_predictor_per_matrix_shape_of_the_reference(feats):
    """The reference stores u as m x 1, v as 1 x n, sigma as 1 x 1 and trains one model per shape: u's and v's of
    one length apart (the fixture has u's and v's of length 64), a 1-D delta with the u's."""
    groups = make_groups(with_vector(feats, "model.norm", 64))
    assert [g.key for g in groups] == ["sigma", "u32", "u64", "v64", "u128", "v128"]
    assert all(p == "sigma" for _, p in groups[0].members) and len(groups[0].members) == len(feats.modules)
    for g in groups[1:]:
        assert g.key == f"{g.key[0]}{g.length}"
        for m, p in g.members:
            if m == "model.norm":
                assert (p, g.key) == (VEC, "u64")
            else:
                assert p == g.key[0] and feats.get(m, "global", p).shape[-1] == g.length
    assert sum(len(g.members) for g in groups) == 3 * len(feats.modules) + 1


def with_matrix(feats: Features, module: str, m: int, n: int, seed: int = 0) -> Features:
    """``feats`` plus a module ``module`` of shape m x n with random rank-1 features (targets past the end NaN)."""
    g = torch.Generator().manual_seed(seed)
    rows, tensors = feats.n_rows, dict(feats.tensors)
    for kind in ("global", "local", "target"):
        tensors[f"{module}:{kind}:sigma"] = torch.rand(rows, generator=g)
        for part, d in (("u", m), ("v", n)):
            x = torch.randn(rows, d, generator=g)
            tensors[f"{module}:{kind}:{part}"] = x / x.norm(dim=-1, keepdim=True)
    for part in ("sigma", "u", "v"):
        tensors[f"{module}:target:{part}"][rows - feats.horizon:] = float("nan")
    tensors[f"{module}:global:energy"] = torch.ones(rows)
    return Features(feats.steps, feats.horizon, feats.sign_align, [*feats.modules, module], tensors)


def test_a_length_one_singular_vector_joins_the_sigmas(feats):
    """A module with one output (a score head): its u is 1 x 1 like a sigma, so one model, trained once per epoch
    (two groups of length 1 once shared a model that AdamW stepped twice)."""
    feats1 = with_matrix(feats, "score", 1, 64)
    groups = make_groups(feats1)
    assert len({g.key for g in groups}) == len(groups)
    assert ("score", "u") in groups[0].members and groups[0].key == "sigma"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AdamW warns of duplicate parameters
        pred = train(feats1, TrainSettings(epochs=3))
    assert sum(k.startswith("sigma.") for k in pred.state_dict()) == len(NExtMLP(1).state_dict())
    assert abs(float(predict(pred, feats1, feats.n_rows - 1)["score"]["u"])) == pytest.approx(1)


def test_the_loss_is_the_references_sum_over_vectors_averaged_over_pairs(feats):
    """Per training pair, the L1 loss summed over the group's vectors and their entries; averaged over the pairs
    (the reference's per-checkpoint sum divided by the number of checkpoints). At lr 0 the model stays as it
    started, so the first loss recorded is that of the weights the test evaluates."""
    pred = train(feats, TrainSettings(epochs=1, lr=0.0))
    rows = training_rows(feats)
    for g in pred.groups:
        xg, xl, xt = group_tensors(feats, g, rows)
        with torch.no_grad():
            per_pair = [float((pred.models[g.key](xg[i], xl[i]) - xt[i]).abs().sum()) for i in range(len(rows))]
        assert g.losses[0] == pytest.approx(sum(per_pair) / len(rows), rel=1e-5), g.key


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
        models = {g.key: NExtMLP(g.length, settings.hidden) for g in groups}
    for g in groups:
        model = models[g.key]
        xg, xl, xt = group_tensors(features, g, rows)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs,
                                                           eta_min=settings.lr * settings.min_lr_ratio)
        old = torch.get_num_threads()
        torch.set_num_threads(1 if g.length <= SMALL_GROUP else old)
        try:
            for _ in range(settings.epochs):
                loss = (model(xg, xl) - xt).abs().sum((1, 2)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                g.losses.append(loss.item())
        finally:
            torch.set_num_threads(old)
        if not math.isfinite(g.losses[-1]):
            raise FloatingPointError(f"predictor {g.key} diverged (loss {g.losses[-1]})")
    return Predictor(groups, models, settings)


def test_groups_trained_in_one_loop_match_training_each_alone(feats, monkeypatch):
    mixed = with_vector(feats, "model.norm", 64)  # a 1-D parameter's delta joins the u's of length 64
    assert [(g.key, sum(p == VEC for _, p in g.members)) for g in make_groups(mixed)] == [
        ("sigma", 0), ("u32", 0), ("u64", 1), ("v64", 0), ("u128", 0), ("v128", 0)]
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
