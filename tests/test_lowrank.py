import torch

from nextrap.lowrank import align_signs, canonical_sign, frobenius_factored, top1_dense, top1_factored


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_factored_top1_matches_dense_svd():
    torch.manual_seed(0)
    p, q = _rand(5, 70, 12), _rand(5, 40, 12)
    a, b = top1_factored(p, q), top1_dense(p @ q.mT)
    assert torch.allclose(a.sigma, b.sigma, rtol=1e-10)
    assert torch.allclose(a.energy, b.energy, rtol=1e-10)
    assert ((a.u * b.u).sum(-1).abs() > 1 - 1e-10).all()
    assert ((a.v * b.v).sum(-1).abs() > 1 - 1e-10).all()
    # the triple reproduces the rank-1 approximation, signs included
    assert torch.allclose(a.sigma[:, None, None] * a.u[..., None] * a.v[..., None, :],
                          b.sigma[:, None, None] * b.u[..., None] * b.v[..., None, :], atol=1e-10)


def test_rank_deficient_and_wider_than_tall_factors():
    torch.manual_seed(1)
    base = _rand(30, 2)
    p = torch.cat([base, base * 2, torch.zeros(30, 3, dtype=torch.float64)], 1)  # rank 2, k = 7
    q = _rand(9, 7)  # k close to n
    a, b = top1_factored(p, q), top1_dense(p @ q.mT)
    assert torch.allclose(a.sigma, b.sigma, rtol=1e-10)
    assert abs(float((a.u * b.u).sum())) > 1 - 1e-10


def test_zero_product_gives_zeros_not_nan():
    r1 = top1_factored(torch.zeros(2, 10, 3, dtype=torch.float64), _rand(2, 8, 3))
    for t in (r1.sigma, r1.u, r1.v, r1.energy):
        assert torch.isfinite(t).all() and (t == 0).all()


def test_frobenius_factored():
    p, q = _rand(3, 20, 4), _rand(3, 15, 4)
    assert torch.allclose(frobenius_factored(p, q), (p @ q.mT).norm(dim=(-2, -1)))


def test_align_signs_removes_flips_and_keeps_the_matrices():
    torch.manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64) * 0.05 + torch.ones(5, dtype=torch.float64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64) * 0.05 + torch.ones(4, dtype=torch.float64), dim=-1)
    flips = torch.tensor([1, -1, -1, 1, -1, 1], dtype=torch.float64)[:, None]
    u_f, v_f = u * flips, v * flips
    u_f[3] = 0  # a zero row (sigma 0) in the middle is skipped over
    v_f[3] = 0
    au, av = align_signs(u_f, v_f)
    rows = [0, 1, 2, 4, 5]
    assert ((au[rows] @ au[rows].T) > 0).all()
    assert (au[3] == 0).all()
    outer = lambda a, b: a[:, :, None] * b[:, None, :]  # noqa: E731
    assert torch.allclose(outer(au, av), outer(u_f, v_f))
    cu, _ = canonical_sign(-u[:1], -v[:1])
    assert cu[0, cu[0].abs().argmax()] > 0
