"""DA3 camera modules and the 9-d pose encoding they speak (docs/da3.md "Heads"), run in fp32.

Pose encoding (B, V, 9) = [t (3), quaternion xyzw (4), fov_h, fov_w] of a camera-to-world pose;
intrinsics are pinhole with the principal point at the image centre:
fy = (H/2) / tan(fov_h/2), fx = (W/2) / tan(fov_w/2).

The quaternion helpers below reproduce the official formulas operation for operation (rotation
from an unnormalised quaternion via 2/|q|^2; matrix -> quaternion by the best-conditioned of four
candidates, denominator floored at 0.1, w >= 0) so that fp32 results are bit-identical;
`gld.geometry` holds the project's general-purpose versions, equal to rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from gld.encoders.da3.backbone import Block, Mlp
from gld.geometry import rigid_inverse, to_homogeneous

__all__ = [
    "CameraDecoder", "CameraEncoder", "quat_to_rotmat_da3", "rotmat_to_quat_da3",
    "pose_encoding_to_cameras", "cameras_to_pose_encoding", "normalize_extrinsics",
]


def quat_to_rotmat_da3(q: Tensor) -> Tensor:
    """(..., 4) xyzw quaternions, not necessarily unit -> (..., 3, 3) rotations."""
    i, j, k, r = q.unbind(-1)
    two_s = 2.0 / (q * q).sum(-1)
    m = torch.stack([
        1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
        two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
        two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
    ], dim=-1)
    return m.reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat_da3(R: Tensor) -> Tensor:
    """(..., 3, 3) rotations -> (..., 4) xyzw quaternions with w >= 0."""
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = R.reshape(*R.shape[:-2], 9).unbind(-1)
    sq = torch.stack([1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22,
                      1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22], dim=-1)
    r = torch.where(sq > 0, torch.sqrt(sq), torch.zeros_like(sq))  # 2 |w|, 2 |x|, 2 |y|, 2 |z|
    cand = torch.stack([  # row a: (w, x, y, z) * 4 * component_a
        torch.stack([r[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, r[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, r[..., 2] ** 2, m12 + m21], dim=-1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, r[..., 3] ** 2], dim=-1),
    ], dim=-2)
    cand = cand / (2.0 * r[..., None].clamp_min(0.1))
    best = r.argmax(dim=-1)
    wxyz = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def pose_encoding_to_cameras(enc: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, V, 9) encoding -> (w2c (B, V, 4, 4) OpenCV world-to-camera, K (B, V, 3, 3) pixels)."""
    H, W = image_size
    R = quat_to_rotmat_da3(enc[..., 3:7])
    c2w = to_homogeneous(torch.cat([R, enc[..., :3, None]], dim=-1))
    fy = (H / 2.0) / torch.clamp(torch.tan(enc[..., 7] / 2.0), 1e-6)
    fx = (W / 2.0) / torch.clamp(torch.tan(enc[..., 8] / 2.0), 1e-6)
    K = torch.zeros(*enc.shape[:-1], 3, 3, dtype=enc.dtype, device=enc.device)
    K[..., 0, 0], K[..., 1, 1] = fx, fy
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = W / 2, H / 2, 1.0
    return rigid_inverse(c2w), K


def cameras_to_pose_encoding(w2c: Tensor, K: Tensor, image_size: tuple[int, int]) -> Tensor:
    """w2c (B, V, 4, 4), K (B, V, 3, 3) pixels, (H, W) -> (B, V, 9) fp32 encoding of c2w."""
    c2w = rigid_inverse(w2c)
    H, W = image_size
    fov_h = 2 * torch.atan((H / 2) / K[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / K[..., 0, 0])
    quat = rotmat_to_quat_da3(c2w[..., :3, :3])
    return torch.cat([c2w[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], dim=-1).float()


def normalize_extrinsics(w2c: Tensor) -> Tensor:
    """The official API's pose normalisation: (B, V, 4, 4) w2c -> (B, V, 4, 4) w2c.

    Poses become relative to view 0 (its w2c becomes the identity); translations are divided by
    the median camera distance from view 0 (lower median over the V views, at least 0.1).
    """
    w2c_rel = w2c @ rigid_inverse(w2c[:, :1])
    dist = rigid_inverse(w2c_rel)[..., :3, 3].norm(dim=-1)  # (B, V)
    scale = dist.median(dim=-1).values.clamp_min(0.1)
    out = w2c_rel.clone()
    out[..., :3, 3] = w2c_rel[..., :3, 3] / scale[:, None, None]
    return out


class CameraDecoder(nn.Module):
    """Last level's camera token (B, V, 2C) -> pose encoding (B, V, 9) (fp32)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_qvec = nn.Linear(dim, 4)
        self.fc_fov = nn.Sequential(nn.Linear(dim, 2), nn.ReLU())

    def forward(self, cam_token: Tensor) -> Tensor:
        B, V = cam_token.shape[:2]
        h = self.backbone(cam_token.reshape(B * V, -1)).float()
        return torch.cat([self.fc_t(h).reshape(B, V, 3), self.fc_qvec(h).reshape(B, V, 4),
                          self.fc_fov(h).reshape(B, V, 2)], dim=-1)


class CameraEncoder(nn.Module):
    """Known cameras -> one backbone camera token per view (B, V, C) (fp32).

    9-d encoding -> MLP (GELU, hidden C/2) -> LayerNorm -> 4 transformer blocks over the views
    (16 heads, LayerScale, LayerNorm eps 1e-5) -> LayerNorm. `attention_backend`: see
    `gld.encoders.da3.backbone.Attention`.
    """

    def __init__(self, dim: int, heads: int = 16, depth: int = 4,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        self.pose_branch = Mlp(9, dim // 2, dim)
        self.token_norm = nn.LayerNorm(dim)
        self.trunk = nn.Sequential(*(
            Block(dim, heads, eps=1e-5, ls_init=0.01, attention_backend=attention_backend)
            for _ in range(depth)))
        self.trunk_norm = nn.LayerNorm(dim)

    def forward(self, w2c: Tensor, K: Tensor, image_size: tuple[int, int]) -> Tensor:
        """w2c (B, V, 4, 4), K (B, V, 3, 3) pixels for an (H, W) image -> (B, V, C)."""
        tokens = self.token_norm(self.pose_branch(cameras_to_pose_encoding(w2c, K, image_size)))
        return self.trunk_norm(self.trunk(tokens))
