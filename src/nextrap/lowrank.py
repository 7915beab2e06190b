"""Rank-1 math on low-rank products, pure tensor functions.

Every delta nextrap handles is a thin product ``P @ Q.T`` (P: m x k, Q: n x k, k << m, n), for example
``s * B_i @ A_i`` for a LoRA checkpoint. Its singular values and top singular vectors come exactly from two
thin QRs and one k x k SVD, at O((m + n) k^2) cost, without ever forming the m x n matrix.
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


def top1_factored(p: torch.Tensor, q: torch.Tensor) -> Rank1:
    """Top singular triple of ``p @ q.mT`` for batched thin factors p [..., m, k], q [..., n, k].

    A zero product gives sigma = 0, energy = 0 and zero vectors (never NaN): a step-0 LoRA (B = 0) is common.
    """
    qp, rp = torch.linalg.qr(p)  # reduced: qp [..., m, k], rp [..., k, k]
    qq, rq = torch.linalg.qr(q)
    us, s, vsh = torch.linalg.svd(rp @ rq.mT)
    u = (qp @ us[..., :, :1]).squeeze(-1)
    v = (qq @ vsh[..., :1, :].mT).squeeze(-1)
    sigma = s[..., 0]
    total = s.sum(-1)
    nonzero = sigma > 0
    energy = torch.where(nonzero, sigma / torch.where(nonzero, total, torch.ones_like(total)), torch.zeros_like(total))
    u = torch.where(nonzero[..., None], u, torch.zeros_like(u))
    v = torch.where(nonzero[..., None], v, torch.zeros_like(v))
    return Rank1(sigma=sigma, u=u, v=v, energy=energy)


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
