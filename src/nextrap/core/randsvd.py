"""Top singular triple of dense matrices by randomized subspace iteration, with an a-posteriori error bound.

For full-parameter deltas (m x n, no thin factors) a full SVD costs O(m n min(m, n)); ``--svd fast`` needs only
the top triple. Block subspace iteration (Halko, Martinsson & Tropp 2011) on a k-column random start gives it
from a few products with X. Its sigma is a Ritz value, so never above the true sigma_1, and with
Q the final orthonormal basis and R = (I - Q Q^T) X,

    sigma_1^2 = max_v ||X v||^2 = max_v (||Q^T X v||^2 + ||R v||^2) <= sigma^2 + ||R||_2^2,

so ``sqrt(1 + (||R||_2 / sigma)^2) - 1`` bounds the relative sigma error. ||R||_2 is bounded by the Frobenius
residual ||R||_F = sqrt(||X||_F^2 - ||Q^T X||_F^2) (Q^T X is already formed), which makes the bound rigorous
(a power-iteration estimate of ||R||_2 would be a slight underestimate); a few float epsilons of ||X||_F^2 are
added for the rounding of the two sums.
"""

from __future__ import annotations

import torch

from nextrap.core.lowrank import Rank1


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def top1_randomized(x: torch.Tensor, block: int = 16, iters: int = 8, seed: int = 0) -> tuple[Rank1, torch.Tensor]:
    """(Rank1, relative sigma error bound) of dense matrices x [..., m, n], batched over leading dims.

    ``energy`` is sigma_1 over the sum of the block's k Ritz values: an upper bound of the full-SVD energy
    sigma_1 / sum_j sigma_j (the tail beyond k is not seen; the exact sum is the nuclear norm, a full SVD's
    cost). The manifest says so (``streaming.energy: "upper bound"``). Zero matrices give zeros, never NaN.
    """
    m, n = x.shape[-2:]
    k = min(block, m, n)
    g = torch.Generator(device=x.device).manual_seed(seed)
    # one random start for every matrix of the batch: a matrix's triple does not depend on the batch it is in
    # (the memory budget's batching, a rank's share under torchrun)
    omega = torch.randn(n, k, generator=g, device=x.device, dtype=x.dtype).expand(*x.shape[:-2], n, k)
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
    rho = _residual_frobenius(x, b)
    ratio = rho / torch.where(nonzero, sigma, torch.ones_like(sigma))
    bound = torch.where(nonzero, torch.sqrt(1 + ratio**2) - 1, torch.zeros_like(sigma))
    return Rank1(sigma=sigma, u=u, v=v, energy=energy), bound


def _residual_frobenius(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||(I - Q Q^T) X||_F from ||X||_F^2 - ||Q^T X||_F^2 (Pythagoras, Q orthonormal), with a rounding margin."""
    total = torch.linalg.vector_norm(x, dim=(-2, -1)).double() ** 2
    seen = torch.linalg.vector_norm(b, dim=(-2, -1)).double() ** 2
    margin = 16 * torch.finfo(x.dtype).eps * total
    return ((total - seen).clamp_min(0) + margin).sqrt().to(x.dtype)
