"""Lens undistortion for the OpenCV (Brown-Conrady) model: k1, k2, k3 radial, p1, p2 tangential.

On normalised coordinates (x, y) = ((u - cx) / fx, (v - cy) / fy), with r^2 = x^2 + y^2:
    x_d = x (1 + k1 r^2 + k2 r^4 + k3 r^6) + 2 p1 x y + p2 (r^2 + 2 x^2)
    y_d = y (1 + k1 r^2 + k2 r^4 + k3 r^6) + p1 (r^2 + 2 y^2) + 2 p2 x y
(OpenCV's `projectPoints` / COLMAP's OPENCV model; SIMPLE_RADIAL and RADIAL are special cases).

`undistort_image` resamples a distorted image onto the pinhole camera with the SAME K: each
output pixel centre (u + 0.5, v + 0.5) is mapped through K^-1, distorted forward (exact, no
iteration) and projected with K; the source is sampled bilinearly (float64 `grid_sample`,
pixel centres at +0.5), pixels that fall outside the source are 0 (black), as `cv2.undistort`
does. With all coefficients zero nothing is resampled: the caller keeps the original bytes.
`undistort_points` is the iterative inverse (used to make distorted test fixtures).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["distort_points", "undistort_points", "undistort_image", "is_zero"]


def is_zero(dist: dict) -> bool:
    return all(float(dist.get(k, 0.0)) == 0.0 for k in ("k1", "k2", "k3", "p1", "p2"))


def distort_points(x, y, dist: dict):
    """Forward model on normalised coordinates (arrays or tensors of one shape)."""
    k1, k2, k3, p1, p2 = (float(dist.get(k, 0.0)) for k in ("k1", "k2", "k3", "p1", "p2"))
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd, yd


def undistort_points(xd, yd, dist: dict, iters: int = 100, tol: float = 1e-14):
    """Inverse of `distort_points` by fixed-point iteration (numpy float64 arrays)."""
    xd = np.asarray(xd, dtype=np.float64)
    yd = np.asarray(yd, dtype=np.float64)
    x, y = xd.copy(), yd.copy()
    for _ in range(iters):
        fx_, fy_ = distort_points(x, y, dist)
        ex, ey = fx_ - xd, fy_ - yd
        x, y = x - ex, y - ey
        if max(np.abs(ex).max(initial=0), np.abs(ey).max(initial=0)) < tol:
            break
    return x, y


def undistort_image(rgb: np.ndarray, K: np.ndarray, dist: dict) -> np.ndarray:
    """(H, W, 3) uint8 distorted image -> (H, W, 3) uint8 undistorted with the same K."""
    h, w = rgb.shape[:2]
    K = np.asarray(K, dtype=np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    u = (torch.arange(w, dtype=torch.float64) + 0.5 - cx) / fx
    v = (torch.arange(h, dtype=torch.float64) + 0.5 - cy) / fy
    y, x = torch.meshgrid(v, u, indexing="ij")
    xd, yd = distort_points(x, y, dist)
    # continuous source pixel coordinates (centres at +0.5) -> grid_sample's [-1, 1]
    gx = (xd * fx + cx) * (2.0 / w) - 1.0
    gy = (yd * fy + cy) * (2.0 / h) - 1.0
    grid = torch.stack([gx, gy], dim=-1)[None]
    src = torch.tensor(np.asarray(rgb), dtype=torch.float64).permute(2, 0, 1)[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
