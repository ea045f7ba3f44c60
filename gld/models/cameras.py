"""The diffusion model's camera inputs: pose normalisation, the 7-channel camera map and the
PRoPE cameras, under one named convention (docs/release-facts.md, docs/reference.md 3-4).

- "release": exactly what the published GLD weights were trained with. Poses relative to the
  LAST view, translations divided by (max over views and xyz of |t|) + 1e-8; Plücker rays sampled
  at (j - 0.5, i + 0.5) for pixel (i, j); PRoPE keys/values transformed by T^-1 lift(K_n) (not
  P^-1); the camera-dropped (CFG) branch zeroes the Plücker channels and sets w2c = I and the
  pixel K = I_3.
- "textbook": PRoPE and Plücker rays as their papers define them, for models trained from
  scratch. Poses relative to the last view, translations divided by the largest camera distance
  (1 if all cameras coincide); rays through pixel centres; keys/values by P^-1; the dropped
  branch zeroes the Plücker channels and makes every projective matrix the identity (K_n = I).
The last view is the pose reference and must be a target.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from gld.geometry.cameras import rigid_inverse
from gld.geometry.rays import plucker_rays
from kernels.attention import PRoPECameras

__all__ = ["CONVENTIONS", "Convention", "normalize_cameras", "camera_map", "prope_cameras",
           "check_camera_inputs"]

Convention = Literal["release", "textbook"]
CONVENTIONS = ("release", "textbook")
_RAY_OFFSET = {"release": (-0.5, 0.5), "textbook": (0.5, 0.5)}


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"camera convention must be one of {CONVENTIONS}, got {convention!r}")


def check_camera_inputs(c2w: Tensor, K: Tensor, is_src: Tensor) -> None:
    """Shapes (B, V, 4, 4), (B, V, 3, 3), (B, V) bool, and the last view a target."""
    if c2w.dim() != 4 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must be (B, V, 4, 4), got {tuple(c2w.shape)}")
    B, V = c2w.shape[:2]
    if K.shape != (B, V, 3, 3):
        raise ValueError(f"K must be (B, V, 3, 3) = {(B, V, 3, 3)}, got {tuple(K.shape)}")
    if is_src.shape != (B, V) or is_src.dtype != torch.bool:
        raise ValueError(f"is_src must be a (B, V) = {(B, V)} bool tensor, got "
                         f"{tuple(is_src.shape)} {is_src.dtype}")
    if bool(is_src[:, -1].any()):
        raise ValueError("the last view is the pose reference and must be a target "
                         "(is_src[:, -1] must be False)")


def normalize_cameras(c2w: Tensor, convention: Convention) -> Tensor:
    """(B, V, 4, 4) c2w -> relative to the last view, translations scaled (see module doc)."""
    _check_convention(convention)
    rel = rigid_inverse(c2w[:, -1:]) @ c2w
    t = rel[..., :3, 3]
    if convention == "release":
        scale = t.abs().amax(dim=(-1, -2)) + 1e-8
    else:
        scale = t.norm(dim=-1).amax(dim=-1)
        scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
    out = rel.clone()
    out[..., :3, 3] = t / scale[:, None, None]
    return out


def camera_map(c2w: Tensor, K: Tensor, is_src: Tensor, image_size: tuple[int, int],
               convention: Convention, drop: Optional[Tensor] = None) -> Tensor:
    """(B, V, 7, H, W) `[target mask, d, o x d]` at image resolution from normalised c2w.

    The mask is 0 for sources and 1 for targets; `drop` (B,) bool zeroes the 6 ray channels of
    those samples (the mask stays).
    """
    H, W = image_size
    rays = plucker_rays(c2w.float(), K.float(), H, W, offset=_RAY_OFFSET[convention])
    mask = (~is_src).to(rays.dtype)[:, :, None, None, None].expand(-1, -1, 1, H, W)
    if drop is not None:
        rays = rays * (~drop).to(rays.dtype).view(-1, 1, 1, 1, 1)
    return torch.cat([mask, rays], dim=2)


def prope_cameras(c2w: Tensor, K: Tensor, patches: tuple[int, int], image_size: tuple[int, int],
                  convention: Convention, drop: Optional[Tensor] = None) -> PRoPECameras:
    """PRoPE cameras (w2c, pixel K) of normalised c2w; dropped samples get the convention's
    identity cameras."""
    w2c = rigid_inverse(c2w.float())
    Kf = K.float()
    if drop is not None and bool(drop.any()):
        eye4 = torch.eye(4, dtype=w2c.dtype, device=w2c.device).expand_as(w2c)
        if convention == "release":
            k_drop = torch.eye(3, dtype=Kf.dtype, device=Kf.device)
        else:   # K_n = I: fx = W, fy = H, cx = W / 2, cy = H / 2
            H, W = image_size
            k_drop = torch.tensor([[W, 0, W / 2], [0, H, H / 2], [0, 0, 1]], dtype=Kf.dtype,
                                  device=Kf.device)
        sel = drop.view(-1, 1, 1, 1)
        w2c = torch.where(sel, eye4, w2c)
        Kf = torch.where(sel, k_drop.expand_as(Kf), Kf)
    return PRoPECameras(w2c=w2c, K=Kf, patches=patches, image_size=image_size,
                        convention=convention)
