import math

import pytest
import torch

from conftest import TRAJECTORY
from nextrap.core.errors import NextrapError
from nextrap.methods import METHODS, JumpContext, fit_models, jump
from nextrap.methods import next as next_method
from nextrap.trajectories.opening import open_trajectory
from nextrap.methods.predictor import TrainSettings

H = 5


@pytest.fixture(scope="module")
def setup():
    traj = open_trajectory(TRAJECTORY)
    return traj, traj.features(H, sign_align=True)


def _delta(traj, row, name):
    if row < 0:
        return 0
    b, a = traj.factors(row, [name])
    return traj.module(name).scale * b[0] @ a[0]


@pytest.mark.parametrize("row", [16, 3])  # 3 - h < 0: the move is measured from the base model
def test_linear_is_the_last_h_checkpoint_move(setup, row):
    traj, feats = setup
    j = traj.move_factors(jump("linear", JumpContext(feats, traj, row)))
    for m in traj.modules:
        p, q = j[m.name]
        assert torch.allclose(p @ q.mT, _delta(traj, row, m.name) - _delta(traj, row - H, m.name), atol=1e-12)


def test_next_paper_is_rank1_with_the_predicted_sigma(setup):
    traj, feats = setup
    models = fit_models(feats, ["next-paper"], TrainSettings(epochs=5))
    j = jump("next-paper", JumpContext(feats, traj, feats.n_rows - 1, models))
    for m in traj.modules:
        p, q = j.factors[m.name]
        assert p.shape == (m.out_features, 1) and q.shape == (m.in_features, 1)
        assert torch.linalg.matrix_norm(p @ q.mT, ord=2) == pytest.approx(abs(j.sigma[m.name]), rel=1e-6)


def test_next_without_predictor_and_unknown_method(setup):
    traj, feats = setup
    with pytest.raises(ValueError, match="needs a fitted predictor"):
        jump("next-paper", JumpContext(feats, traj, 16))
    with pytest.raises(ValueError, match="needs a fitted model"):
        jump("next", JumpContext(feats, traj, 16))
    with pytest.raises(NextrapError, match="^--method nope: use one of"):
        jump("nope", JumpContext(feats, traj, 16))
    assert set(METHODS) >= {"next", "next-paper", "linear", "expo", "relex"}


def test_expo_is_the_whole_update_so_far(setup):
    traj, feats = setup
    j = traj.move_factors(jump("expo", JumpContext(feats, traj, 12)))
    for m in traj.modules:
        p, q = j[m.name]
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


def test_next_is_the_straight_line_with_its_rank1_part_replaced(setup):
    traj, feats = setup
    row = 16
    model = next_method.fit(feats.truncate(row + 1))
    model.rho = 0.5  # whatever the held-out pair chose, check the algebra at a nonzero share
    j = traj.move_factors(jump("next", JumpContext(feats, traj, row, {"next": model})))
    aligned = feats.aligned()
    for m in traj.modules[:5]:
        sigma, u, v, (sd, ud, vd) = next_method._predict(aligned, m.name, row, model.weights_u, model.weights_v, model.log_ratio)
        straight = _delta(traj, row, m.name) - _delta(traj, row - H, m.name)
        expected = straight + 0.5 * (sigma * torch.outer(u, v) - sd * torch.outer(ud, vd))
        p, q = j[m.name]
        assert torch.allclose(p @ q.mT, expected, atol=1e-9)
        # D's rank-1 part is the top singular triple of the straight line's move
        assert float(torch.linalg.matrix_norm(straight, ord=2)) == pytest.approx(float(sd), rel=1e-5)


def test_next_gives_the_same_fit_and_jump_on_sign_aligned_features(setup):
    """next signs every row's inputs against that row's D, so aligning the series first (which next no longer
    does: it cost seconds at 7B shapes) cannot change its weights, rho or move: checked bit for bit."""
    traj, feats = setup
    row = 16
    past = feats.truncate(row + 1)
    raw, aligned = next_method.fit(past, trajectory=traj), next_method.fit(past.aligned(), trajectory=traj)
    assert (raw.weights_u, raw.weights_v, raw.log_ratio, raw.rho) == (aligned.weights_u, aligned.weights_v,
                                                                        aligned.log_ratio, aligned.rho)
    raw.rho = 0.5  # a nonzero share, whatever the held-out pair chose
    moves = [traj.move_factors(jump("next", JumpContext(f, traj, row, {"next": raw}))) for f in (feats, feats.aligned())]
    for m in traj.modules:
        (p1, q1), (p2, q2) = moves[0][m.name], moves[1][m.name]
        assert torch.equal(p1 @ q1.mT, p2 @ q2.mT)


def test_next_with_rho_zero_is_exactly_linear(setup):
    traj, feats = setup
    model = next_method.fit(feats)
    model.rho = 0.0
    j = traj.move_factors(jump("next", JumpContext(feats, traj, 16, {"next": model})))
    lin = traj.move_factors(jump("linear", JumpContext(feats, traj, 16)))
    for m in traj.modules:
        assert torch.equal(j[m.name][0], lin[m.name][0])
        assert torch.equal(j[m.name][1], lin[m.name][1])


def _turning_features(n: int = 16, h: int = 3, d: int = 12):
    """Features of modules whose rank-1 direction turns at a constant rate while growing linearly."""
    import math

    from nextrap.core.features import Features

    gen = torch.Generator().manual_seed(0)
    tensors, modules = {}, []

    def r1(x):
        uu, s, vh = torch.linalg.svd(x)
        return s[0], uu[:, 0], vh[0]

    for k in range(4):
        basis_u = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))[0]
        basis_v = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))[0]

        def w(i):
            u = basis_u @ torch.tensor([math.cos(0.08 * i), math.sin(0.08 * i)], dtype=torch.float64)
            return (1 + i) * torch.outer(u, basis_v[:, 0])

        name = f"m{k}"
        modules.append(name)
        rows = {"global": [r1(w(i)) for i in range(n)], "local": [r1(w(i) - (w(i - 1) if i else 0 * w(0))) for i in range(n)],
                "target": [r1(w(i + h) - w(i)) if i + h < n else None for i in range(n)]}
        for kind, triples in rows.items():
            signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)  # (u, v) -> (-u, -v) as an SVD may
            for j, part in enumerate(("sigma", "u", "v")):
                t = torch.full((n, d) if part != "sigma" else (n,), float("nan"))
                for i, tr in enumerate(triples):
                    if tr is not None:
                        t[i] = tr[j].float() * (signs[i] if part != "sigma" else 1.0)
                tensors[f"{name}:{kind}:{part}"] = t
        tensors[f"{name}:global:energy"] = torch.ones(n)
    return Features(list(range(0, 10 * n, 10)), h, False, modules, tensors)


def test_next_learns_a_turning_direction():
    """Constant turning: the shared predictor's direction beats the straight line's own rank-1 part clearly on
    the held-out pair (so rho > 0), and u_hat points closer to the true next direction than u_D does."""
    feats = _turning_features()
    model = next_method.fit(feats)
    assert model.rho > 0.5
    assert model.validation["error_next"] < 0.5 * model.validation["error_straight"]
    row = feats.n_rows - 1 - feats.horizon  # the last row with a known target
    aligned = feats.aligned()
    for m in feats.modules:
        sigma, u, v, (sd, ud, vd) = next_method._predict(aligned, m, row, model.weights_u, model.weights_v, model.log_ratio)
        u_true = aligned.get(m, "target", "u")[row].double()
        assert abs(float(u @ u_true)) > abs(float(ud @ u_true))


def test_next_fit_sees_only_the_rows_it_is_given():
    feats = _turning_features()
    k = 12
    changed = feats.truncate(feats.n_rows)
    for key, t in changed.tensors.items():
        t[k:] = torch.randn_like(t[k:])  # whatever comes after row k
    a, b = next_method.fit(feats.truncate(k)), next_method.fit(changed.truncate(k))
    assert (a.weights_u, a.weights_v, a.log_ratio, a.rho) == (b.weights_u, b.weights_v, b.log_ratio, b.rho)


def test_next_ignores_a_module_that_never_moves(setup):
    traj, feats = setup
    still = feats.truncate(feats.n_rows)
    name = feats.modules[0]
    for kind in ("global", "local", "target"):
        still.tensors[f"{name}:{kind}:sigma"] = torch.where(torch.isnan(still.get(name, kind, "sigma")), float("nan"), 0.0)
        for part in ("u", "v"):
            t = still.get(name, kind, part)
            still.tensors[f"{name}:{kind}:{part}"] = torch.where(torch.isnan(t), float("nan"), 0.0)
    model = next_method.fit(still)
    assert all(math.isfinite(w) for w in (*model.weights_u, *model.weights_v, model.log_ratio, model.rho))


def test_a_malformed_next_model_is_a_one_line_error(tmp_path):
    from nextrap.core.errors import NextrapError

    (tmp_path / "next.json").write_text('{"weights_u": [1.0], "weights_v": [1, 0, 0]}')
    with pytest.raises(NextrapError, match="next.json: cannot read the next model"):
        next_method.load(tmp_path)


def test_next_measures_its_held_out_pair_exactly_on_lora(setup):
    """The share rho is chosen on the true moves (from the LoRA factors), not only on their rank-1 parts."""
    traj, feats = setup
    row, h = 10, H
    gen = torch.Generator().manual_seed(3)
    preds = {}
    for m in traj.modules:  # every module: the passes measure the true moves over all of them
        u = torch.randn(m.out_features, generator=gen, dtype=torch.float64)
        v = torch.randn(m.in_features, generator=gen, dtype=torch.float64)
        d1 = next_method._rank1(feats, m.name, "target", row - h)
        preds[m.name] = ((torch.tensor(0.3, dtype=torch.float64), u / u.norm(), v / v.norm()), d1)
    num, straight = next_method._exact_terms(traj, feats, row, preds)
    want_num = want_straight = 0.0
    for name, (p, d1) in preds.items():
        d = _delta(traj, row, name) - _delta(traj, row - h, name)
        t = _delta(traj, row + h, name) - _delta(traj, row, name)
        pm, dm = p[0] * torch.outer(p[1], p[2]), d1[0] * torch.outer(d1[1], d1[2])
        want_num += float(((pm - dm) * (t - d)).sum())
        want_straight += float(((d - t) ** 2).sum())
    assert num == pytest.approx(want_num, rel=1e-9, abs=1e-12)
    assert straight == pytest.approx(want_straight, rel=1e-9)
    model = next_method.fit(feats, trajectory=traj)
    assert model.validation["exact"] is True and model.validation["error_next"] <= model.validation["error_straight"] + 1e-12
