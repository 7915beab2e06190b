import torch

from nextrap.core.lowrank import align_signs, canonical_sign, frobenius_factored, gram_root, top1_dense, top1_factored, top1_gram


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
    # the 5 zero singular values come from eigenvalues of C^T C: each within sqrt(eps64) sigma_1 of zero
    assert abs(float(a.energy - b.energy)) <= 7 * 1.5e-8 * float(b.energy)


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


def test_a_difference_of_near_equal_products_keeps_its_precision_from_float64_grams():
    """L = B1 A1 - B0 A0 with B1 ~ B0, A1 ~ A0 (a local delta late in a run): the Grams carry the cancellation
    squared, float64 keeps it far below the 1e-5 the features promise; the top-only path (a float32 eigenvector of
    the small core, here of a flat spectrum, its worst case) agrees with the SVD."""
    torch.manual_seed(3)
    for ratio in (1e-1, 1e-2, 1e-3):
        b0, a0 = torch.randn(300, 16), torch.randn(16, 200)  # float32 inputs, as PEFT saves them
        b1, a1 = b0 + ratio * torch.randn(300, 16), a0 + ratio * torch.randn(16, 200)
        p, q = torch.cat([b1, -b0], 1).double(), torch.cat([a1.T, a0.T], 1).double()
        ref = top1_dense(p @ q.mT)
        s, cu, cv = top1_gram(p.mT @ p, q.mT @ q, spectrum=False)
        assert float((s[0] - ref.sigma).abs() / ref.sigma) < 1e-6
        assert abs(float((p @ cu) @ ref.u)) > 1 - 1e-6 and abs(float((q @ cv) @ ref.v)) > 1 - 1e-6
        got = top1_factored(p, q)
        assert torch.allclose(got.sigma, ref.sigma, rtol=1e-8) and torch.allclose(got.energy, ref.energy, rtol=1e-6)


def test_a_singular_gram_falls_back_to_the_eigen_square_root():
    """A that did not move between the two checkpoints: Q = [A^T, A^T] has a singular Gram, Cholesky fails."""
    torch.manual_seed(4)
    b0, a = _rand(40, 3), _rand(3, 30)
    b1 = b0 + 0.1 * _rand(40, 3)
    p, q = torch.cat([b1, -b0], 1), torch.cat([a.T, a.T], 1)
    root = gram_root(q.mT @ q)
    assert torch.allclose(root.mT @ root, q.mT @ q, atol=1e-10)
    r1, ref = top1_factored(p, q), top1_dense(p @ q.mT)
    assert torch.allclose(r1.sigma, ref.sigma, rtol=1e-10) and abs(float(r1.u @ ref.u)) > 1 - 1e-10
