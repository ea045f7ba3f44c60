"""Quaternions <-> rotation matrices, batched over leading dimensions.

Quaternions are unit, scalar-last (x, y, z, w) by default, as DA3 uses; `order="wxyz"` for
scalar-first (COLMAP). `rotmat_to_quat` returns the representative with w >= 0.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["quat_to_rotmat", "rotmat_to_quat", "rotation_angle"]


def _to_xyzw(q: Tensor, order: str) -> Tensor:
    if order == "xyzw":
        return q
    if order == "wxyz":
        return torch.cat([q[..., 1:], q[..., :1]], dim=-1)
    raise ValueError(f"quaternion order must be 'xyzw' or 'wxyz', got {order!r}")


def quat_to_rotmat(q: Tensor, order: Literal["xyzw", "wxyz"] = "xyzw") -> Tensor:
    """(..., 4) quaternions (normalised here) -> (..., 3, 3) rotation matrices."""
    if q.shape[-1] != 4:
        raise ValueError(f"quat_to_rotmat: expected (..., 4), got {tuple(q.shape)}")
    x, y, z, w = F.normalize(_to_xyzw(q, order), dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat(R: Tensor, order: Literal["xyzw", "wxyz"] = "xyzw") -> Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions with w >= 0.

    Numerically stable for every rotation: of the four candidate formulas (one per largest
    component), the one with the largest denominator is used.
    """
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"rotmat_to_quat: expected (..., 3, 3), got {tuple(R.shape)}")
    m = R.reshape(*R.shape[:-2], 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # 4 * component^2 for w, x, y, z
    sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22],
        dim=-1,
    ).clamp_min(0)
    r = torch.sqrt(sq)  # 2 * |component|
    # Row i: (w, x, y, z) * 4 * component_i
    cand = torch.stack(
        [
            torch.stack([sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, sq[..., 1], m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, sq[..., 2], m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    cand = cand / (2.0 * r.clamp_min(1e-12))[..., None]
    best = r.argmax(dim=-1)
    wxyz = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    wxyz = F.normalize(wxyz, dim=-1)
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)
    return wxyz if order == "wxyz" else _to_xyzw_from_wxyz(wxyz, order)


def _to_xyzw_from_wxyz(q: Tensor, order: str) -> Tensor:
    if order != "xyzw":
        raise ValueError(f"quaternion order must be 'xyzw' or 'wxyz', got {order!r}")
    return torch.cat([q[..., 1:], q[..., :1]], dim=-1)


def rotation_angle(R: Tensor, degrees: bool = True) -> Tensor:
    """Angle of rotation matrices (..., 3, 3): arccos((tr R - 1) / 2), clamped for safety."""
    tr = R.diagonal(dim1=-2, dim2=-1).sum(-1)
    ang = torch.arccos(((tr - 1) / 2).clamp(-1.0, 1.0))
    return torch.rad2deg(ang) if degrees else ang
