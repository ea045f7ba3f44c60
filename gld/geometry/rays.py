"""Plücker ray embeddings (docs/reference.md section 4).

For OpenCV camera-to-world `c2w` and pixel intrinsics `K`, the ray through image point (u, v)
has direction `d = normalize(R_c2w K^-1 [u, v, 1])` and origin `o` = the camera centre; its
Plücker embedding is `(d, o x d)` (6 channels). Pixel (i, j) is sampled at its centre
(j + 0.5, i + 0.5); at patch resolution (`stride` = patch size) patch (i, j) is sampled at the
centre of the patch, ((j + 0.5) * stride, (i + 0.5) * stride). `offset` moves the sample point
within the pixel: the GLD release samples pixel (i, j) at (j - 0.5, i + 0.5), `offset=(-0.5, 0.5)`
(docs/release-facts.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pixel_grid", "ray_directions", "plucker_rays"]


def pixel_grid(height: int, width: int, stride: int = 1, *, dtype=torch.float32,
               device=None, offset: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """(H/s, W/s, 3) homogeneous image points [u, v, 1]: ((j + ox) s, (i + oy) s) for cell
    (i, j), at pixel or patch centres with the default offset (ox, oy) = (0.5, 0.5)."""
    if height % stride or width % stride:
        raise ValueError(f"image size {(height, width)} is not divisible by stride {stride}")
    ox, oy = offset
    v = (torch.arange(height // stride, dtype=dtype, device=device) + oy) * stride
    u = (torch.arange(width // stride, dtype=dtype, device=device) + ox) * stride
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv, torch.ones_like(uu)], dim=-1)


def ray_directions(c2w: Tensor, K: Tensor, height: int, width: int, stride: int = 1,
                   offset: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """Unit world-space directions (..., H/s, W/s, 3) for c2w (..., 4, 4), K (..., 3, 3)."""
    if c2w.shape[-2:] != (4, 4) or K.shape[-2:] != (3, 3):
        raise ValueError(f"expected c2w (..., 4, 4) and K (..., 3, 3), got {tuple(c2w.shape)} "
                         f"and {tuple(K.shape)}")
    pts = pixel_grid(height, width, stride, dtype=c2w.dtype, device=c2w.device, offset=offset)
    cam = torch.einsum("...ij,hwj->...hwi", torch.linalg.inv(K), pts)
    world = torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], cam)
    return F.normalize(world, dim=-1)


def plucker_rays(c2w: Tensor, K: Tensor, height: int, width: int, stride: int = 1,
                 channels_first: bool = True, offset: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """Plücker embeddings of every pixel (or patch) ray.

    Args:
        c2w: (..., 4, 4) OpenCV camera-to-world.  K: (..., 3, 3) pixel intrinsics.
        height, width: image size in pixels.  stride: 1 for pixels, the patch size for patches.
        offset: where in its cell each ray is sampled (see the module docstring).
    Returns:
        (..., 6, H/s, W/s) [d, o x d] (or (..., H/s, W/s, 6) with channels_first=False).
    """
    d = ray_directions(c2w, K, height, width, stride, offset)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    out = torch.cat([d, torch.linalg.cross(o, d, dim=-1)], dim=-1)
    return out.movedim(-1, -3) if channels_first else out
