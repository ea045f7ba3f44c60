"""Umeyama similarity alignment (Sim(3)), used by camera metrics (ATE)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["umeyama", "apply_sim3"]


def umeyama(src: Tensor, dst: Tensor, with_scale: bool = True,
            weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares s, R, t with dst ~= s R src + t (Umeyama 1991), batched.

    Args:
        src, dst: (..., N, 3) corresponding points, N >= 3 (not all collinear for a unique R).
        with_scale: estimate s (Sim(3)); otherwise s = 1 (SE(3)).
        weights: optional (..., N) non-negative point weights.
    Returns:
        s (...,), R (..., 3, 3) with det +1, t (..., 3).
    """
    if src.shape != dst.shape or src.shape[-1] != 3:
        raise ValueError(f"umeyama: expected matching (..., N, 3), got {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    if src.shape[-2] < 3:
        raise ValueError(f"umeyama: needs at least 3 points, got {src.shape[-2]}")
    dtype = src.dtype
    src, dst = src.double(), dst.double()
    if weights is None:
        w = torch.full(src.shape[:-1], 1.0 / src.shape[-2], dtype=src.dtype, device=src.device)
    else:
        w = weights.double() / weights.double().sum(-1, keepdim=True)
    mu_s = (w[..., None] * src).sum(-2)
    mu_d = (w[..., None] * dst).sum(-2)
    xs, xd = src - mu_s[..., None, :], dst - mu_d[..., None, :]
    cov = torch.einsum("...n,...ni,...nj->...ij", w, xd, xs)  # (..., 3, 3)
    U, S, Vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    D = torch.ones(*sign.shape, 3, dtype=src.dtype, device=src.device)
    D[..., 2] = sign
    R = U @ torch.diag_embed(D) @ Vh
    if with_scale:
        var_s = (w * xs.pow(2).sum(-1)).sum(-1)
        s = (S * D).sum(-1) / var_s.clamp_min(1e-300)
    else:
        s = torch.ones(src.shape[:-2], dtype=src.dtype, device=src.device)
    t = mu_d - s[..., None] * torch.einsum("...ij,...j->...i", R, mu_s)
    return s.to(dtype), R.to(dtype), t.to(dtype)


def apply_sim3(s: Tensor, R: Tensor, t: Tensor, pts: Tensor) -> Tensor:
    """s R p + t for points (..., N, 3)."""
    return s[..., None, None] * torch.einsum("...ij,...nj->...ni", R, pts) + t[..., None, :]
