"""Top singular triple of dense matrices by randomized subspace iteration, with an a-posteriori error bound.

For full-parameter deltas (m x n, no thin factors) a full SVD costs O(m n min(m, n)); ``--svd fast`` needs only
the top triple. Block subspace iteration (Halko, Martinsson & Tropp 2011) on a k-column random start gives it
from a few products with X. Its sigma is a Ritz value, so never above the true sigma_1, and with
Q the final orthonormal basis and R = (I - Q Q^T) X,

    sigma_1^2 = max_v ||X v||^2 = max_v (||Q^T X v||^2 + ||R v||^2) <= sigma^2 + ||R||_2^2,

so ``sqrt(1 + (||R||_2 / sigma)^2) - 1`` bounds the relative sigma error; ||R||_2 is estimated by a few power
iterations (a slight underestimate that the quadratic slack of the bound absorbs in practice).
"""

from __future__ import annotations

import torch

from .lowrank import Rank1


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def top1_randomized(x: torch.Tensor, block: int = 16, iters: int = 8, seed: int = 0) -> tuple[Rank1, torch.Tensor]:
    """(Rank1, relative sigma error bound) of dense matrices x [..., m, n], batched over leading dims.

    ``energy`` is sigma_1 over the sum of the block's k Ritz values: an upper bound of the full-SVD energy
    sigma_1 / sum_j sigma_j (the tail beyond k is not seen). Zero matrices give zeros, never NaN.
    """
    m, n = x.shape[-2:]
    k = min(block, m, n)
    g = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(*x.shape[:-2], n, k, generator=g, device=x.device, dtype=x.dtype)
    q = _orth(x @ omega)
    for _ in range(iters):  # re-orthonormalise every half-step: plain powers lose the smaller directions
        q = _orth(x @ _orth(x.mT @ q))
    b = q.mT @ x  # [..., k, n]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    sigma = s[..., 0]
    u = (q @ ub[..., :, :1]).squeeze(-1)
    v = vh[..., 0, :]
    nonzero = sigma > 0
    total = torch.where(nonzero, s.sum(-1), torch.ones_like(sigma))
    energy = torch.where(nonzero, sigma / total, torch.zeros_like(sigma))
    u = torch.where(nonzero[..., None], u, torch.zeros_like(u))
    v = torch.where(nonzero[..., None], v, torch.zeros_like(v))
    rho = _residual_norm(x, q, iters + 2, g)
    ratio = rho / torch.where(nonzero, sigma, torch.ones_like(sigma))
    bound = torch.where(nonzero, torch.sqrt(1 + ratio**2) - 1, torch.zeros_like(sigma))
    return Rank1(sigma=sigma, u=u, v=v, energy=energy), bound


def _residual_norm(x: torch.Tensor, q: torch.Tensor, iters: int, g: torch.Generator) -> torch.Tensor:
    """||(I - Q Q^T) X||_2 by power iteration on R^T R with a 2-column block (the largest column norm)."""
    w = _orth(torch.randn(*x.shape[:-2], x.shape[-1], 2, generator=g, device=x.device, dtype=x.dtype))
    norm = torch.zeros(x.shape[:-2], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        r = x @ w
        r = r - q @ (q.mT @ r)  # R w
        norm = r.norm(dim=-2).amax(-1)
        w = _orth(x.mT @ r)  # R^T R w = X^T R w: R w is already orthogonal to Q
    return norm
