"""Pose normalisation for multi-view samples.

Poses are OpenCV camera-to-world (B, V, 4, 4). Two schemes:
- `normalize_poses(..., scale="max")` (GLD): express every pose relative to a chosen view (that
  view becomes the identity), then scale translations so that the largest camera distance from
  it is 1.
- `normalize_poses(..., scale="median")` (DA3's posed-input API): relative to view 0, then
  divide translations by the median camera distance, floored at `min_scale` (0.1).
Both return the scale that was divided out, so depths can be mapped the same way.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gld.geometry.cameras import rigid_inverse

__all__ = ["relative_poses", "normalize_poses"]


def relative_poses(c2w: Tensor, ref_index: int = -1) -> Tensor:
    """(..., V, 4, 4) c2w -> poses in the frame of view `ref_index` (it becomes identity)."""
    if c2w.shape[-2:] != (4, 4) or c2w.dim() < 3:
        raise ValueError(f"relative_poses: expected (..., V, 4, 4), got {tuple(c2w.shape)}")
    ref = c2w[..., ref_index:ref_index + 1, :, :] if ref_index != -1 else c2w[..., -1:, :, :]
    return rigid_inverse(ref) @ c2w


def normalize_poses(c2w: Tensor, ref_index: int = -1, scale: Literal["max", "median"] = "max",
                    min_scale: float = 0.1, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Returns (normalised c2w (..., V, 4, 4), scale (...,)) with translations divided by scale.

    "max": scale = the largest camera distance from the reference (1 if all cameras coincide).
    "median": scale = max(median camera distance, min_scale) (the reference's own zero counts).
    """
    rel = relative_poses(c2w, ref_index)
    dist = rel[..., :3, 3].norm(dim=-1)  # (..., V)
    if scale == "max":
        s = dist.amax(dim=-1)
        s = torch.where(s > eps, s, torch.ones_like(s))
    elif scale == "median":
        s = dist.median(dim=-1).values.clamp_min(min_scale)
    else:
        raise ValueError(f"normalize_poses: scale must be 'max' or 'median', got {scale!r}")
    out = rel.clone()
    out[..., :3, 3] = rel[..., :3, 3] / s[..., None, None]
    return out, s
