"""Rank-1 math on low-rank products, pure tensor functions.

Every delta nextrap handles is a thin product ``P @ Q.T`` (P: m x k, Q: n x k, k << m, n), for example
``s * B_i @ A_i`` for a LoRA checkpoint. Its singular values and top singular vectors come exactly from the
k x k Grams P^T P and Q^T Q and one k x k SVD (``top1_gram``), at O((m + n) k^2) cost, without ever forming the
m x n matrix; the Grams of a trajectory's factors are shared by every delta they appear in (``lorastream``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rank1:
    """Top singular triple of a batch of matrices, plus the rank-1 energy sigma_1 / sum_j sigma_j."""

    sigma: torch.Tensor  # [...]
    u: torch.Tensor  # [..., m]
    v: torch.Tensor  # [..., n]
    energy: torch.Tensor  # [...]


def gram_root(g: torch.Tensor) -> torch.Tensor:
    """R [..., k, k] with R^T R = g for positive semi-definite g [..., k, k]: Cholesky's factor where it exists, else
    the eigen square root diag(sqrt(w)) V^T (a singular Gram: a zero B at step 0, an A that did not move)."""
    low, info = torch.linalg.cholesky_ex(g)
    r = low.mT  # a view: the fallback below writes into low, which nothing else holds
    failed = info != 0
    if failed.any():
        w, v = torch.linalg.eigh(g[failed])
        r[failed] = w.clamp_min(0).sqrt()[..., :, None] * v.mT
    return r


def top1_gram(gp: torch.Tensor, gq: torch.Tensor, spectrum: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The singular values of X = P @ Q.T and its top singular vectors as combinations of P's and Q's columns,
    from the Grams alone: gp = P^T P, gq = Q^T Q [..., k, k] (float64). Returns (s [..., k] descending, or
    [..., 1] the top one only without ``spectrum``; cu [..., k]; cv [..., k]) with u = P cu, v = Q cv (zeros where
    X = 0).

    With R_P^T R_P = gp, R_Q^T R_Q = gq (``gram_root``), P = U_P R_P and Q = U_Q R_Q for some orthonormal U_P,
    U_Q, so X = U_P (R_P R_Q^T) U_Q^T: the k x k core C = R_P R_Q^T = U S W^T has X's singular values, and
    u = U_P U_0 = X v / s_0 = P R_Q^T W_0 / s_0 = P cu, v = X^T u / s_0 = Q (P^T P) cu / s_0 = Q gp cu / s_0: no
    inverse of R is ever formed, so a rank-deficient P or Q (B = 0, near-collinear B_i and B_{i-1}) needs no
    special case. The Grams carry the cancellation of a difference B_i A_i - B_j A_j squared: float64 Grams keep
    sigma to ~1e-16 (||G|| / ||L||)^2. W_0 is the top eigenvector of C^T C = R_Q gp R_Q^T (R_P is never needed:
    one Cholesky instead of two). With ``spectrum`` its float64 eigenvalues are the singular values squared (a
    value near zero is known to ~sqrt(eps64) s_0 = 1.5e-8 s_0 in absolute terms, which moves the rank-1 energy
    by at most k x 1.5e-8 relative, where C's SVD took 7x as long; measured 2e-17 on random Grams); without,
    W_0 alone in float32 (its error enters sigma^2 = W_0^T C^T C W_0 squared, and u, v linearly: ~1e-7 over the
    relative gap sigma_1 - sigma_2), four times cheaper than C's SVD."""
    rq = gram_root(gq)
    ctc = rq @ gp @ rq.mT
    if spectrum:
        lam, vecs = torch.linalg.eigh(ctc)
        s = lam.flip(-1).clamp_min(0).sqrt()
        w0 = vecs[..., -1]
    else:
        _, vecs = torch.linalg.eigh(ctc.float())
        w0 = vecs[..., -1].double()
        s = (w0[..., None, :] @ ctc @ w0[..., :, None])[..., 0].clamp_min(0).sqrt()
    sigma = s[..., 0]
    nonzero = (sigma > 0)[..., None]
    safe = torch.where(nonzero, sigma[..., None], torch.ones_like(sigma[..., None]))
    cu = (rq.mT @ w0[..., None])[..., 0] / safe
    cv = (gp @ cu[..., None])[..., 0] / safe
    return s, torch.where(nonzero, cu, torch.zeros_like(cu)), torch.where(nonzero, cv, torch.zeros_like(cv))


def energy_of(s: torch.Tensor) -> torch.Tensor:
    """Rank-1 energy sigma_1 / sum_j sigma_j of singular values s [..., k] (0 for a zero matrix)."""
    sigma, total = s[..., 0], s.sum(-1)
    nonzero = sigma > 0
    return torch.where(nonzero, sigma / torch.where(nonzero, total, torch.ones_like(total)), torch.zeros_like(total))


def top1_factored(p: torch.Tensor, q: torch.Tensor, products: torch.dtype = torch.float64) -> Rank1:
    """Top singular triple of ``p @ q.mT`` for batched thin factors p [..., m, k], q [..., n, k], exactly
    (``top1_gram`` on Grams multiplied in ``products``), in the factors' dtype.

    float64 products keep sigma whatever the factors; float32 ones (2.5x faster on CPU) only where nothing
    cancels, e.g. a checkpoint difference in the difference form (``lorastream.LoraMove``): a pair form
    [B_i, -B_j] would lose eps32 (||B_i A_i|| / ||delta||)^2 of sigma.
    A zero product gives sigma = 0, energy = 0 and zero vectors (never NaN): a step-0 LoRA (B = 0) is common.
    """
    pm, qm = p.to(products), q.to(products)
    s, cu, cv = top1_gram((pm.mT @ pm).double(), (qm.mT @ qm).double())
    u, v = (pm @ cu.to(products)[..., None])[..., 0], (qm @ cv.to(products)[..., None])[..., 0]
    return Rank1(sigma=s[..., 0].to(p.dtype), u=u.to(p.dtype), v=v.to(p.dtype), energy=energy_of(s).to(p.dtype))


def top1_dense(x: torch.Tensor) -> Rank1:
    """Top singular triple of dense matrices x [..., m, n] by a full SVD (the reference computation)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    sigma = s[..., 0]
    total = s.sum(-1)
    energy = torch.where(sigma > 0, sigma / total.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(sigma))
    return Rank1(sigma=sigma, u=u[..., :, 0], v=vh[..., 0, :], energy=energy)


def inner_factored(p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """<p @ q.mT, r @ s.mT> (Frobenius inner product) for batched thin factors: sum((p^T r) * (q^T s))."""
    return ((p.mT @ r) * (q.mT @ s)).sum((-2, -1))


def frobenius_factored(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """||p @ q.mT||_F for batched thin factors, exactly, without forming the product."""
    return inner_factored(p, q, p, q).clamp_min(0).sqrt()


def canonical_sign(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip (u, v) -> (-u, -v) so that the largest-magnitude entry of u is positive (batched over leading dims)."""
    idx = u.abs().argmax(-1, keepdim=True)
    sign = torch.sign(torch.gather(u, -1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, v * sign


def align_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove SVD's arbitrary sign along a trajectory u [..., T, m], v [..., T, n].

    u v^T is unchanged by flipping both, so each row is flipped to agree with the last nonzero row before it
    (u.u' + v.v' >= 0); the first nonzero row gets the canonical sign. Without this, u trajectories jump between
    +u and -u and no predictor can follow them (the reference code does no alignment).
    """
    u, v = canonical_sign(u.clone(), v.clone())
    prev_u, prev_v = u[..., 0, :].clone(), v[..., 0, :].clone()
    for t in range(1, u.shape[-2]):
        ut, vt = u[..., t, :], v[..., t, :]
        agree = (ut * prev_u).sum(-1) + (vt * prev_v).sum(-1)
        has_prev = (prev_u.abs().sum(-1) > 0)
        flip = (agree < 0) & has_prev
        sign = torch.where(flip, -torch.ones_like(agree), torch.ones_like(agree))[..., None]
        u[..., t, :] = ut * sign
        v[..., t, :] = vt * sign
        nonzero = (ut.abs().sum(-1) > 0)[..., None]
        prev_u = torch.where(nonzero, u[..., t, :], prev_u)
        prev_v = torch.where(nonzero, v[..., t, :], prev_v)
    return u, v
