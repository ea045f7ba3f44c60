"""Camera conventions and intrinsics.

Conventions: OpenCV axes (x right, y down, z forward) unless a name says otherwise; extrinsics
are 4x4 homogeneous matrices; intrinsics K are 3x3 in pixels, with pixel (u, v) covering
[u, u+1) x [v, v+1) so that its centre is (u+0.5, v+0.5). Every function is batched over any
leading dimensions (written `...`) and keeps the input dtype.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "rigid_inverse", "c2w_to_w2c", "w2c_to_c2w", "opencv_to_opengl", "opengl_to_opencv",
    "normalize_intrinsics", "denormalize_intrinsics", "resize_intrinsics", "crop_intrinsics",
    "make_intrinsics", "to_homogeneous", "check_cameras", "CameraError",
]

_FLIP_YZ = (1.0, -1.0, -1.0, 1.0)


def _check_mat(x: Tensor, n: int, name: str) -> None:
    if x.shape[-2:] != (n, n):
        raise ValueError(f"{name}: expected shape (..., {n}, {n}), got {tuple(x.shape)}")


def to_homogeneous(rt: Tensor) -> Tensor:
    """(..., 3, 4) [R | t] -> (..., 4, 4) with the row [0, 0, 0, 1]."""
    if rt.shape[-2:] == (4, 4):
        return rt
    if rt.shape[-2:] != (3, 4):
        raise ValueError(f"expected (..., 3, 4) or (..., 4, 4), got {tuple(rt.shape)}")
    bottom = torch.zeros(*rt.shape[:-2], 1, 4, dtype=rt.dtype, device=rt.device)
    bottom[..., 0, 3] = 1
    return torch.cat([rt, bottom], dim=-2)


def rigid_inverse(T: Tensor) -> Tensor:
    """Closed-form inverse of rigid transforms (..., 4, 4): [R^T | -R^T t]."""
    _check_mat(T, 4, "rigid_inverse")
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -Rt @ t], dim=-1)
    return torch.cat([top, T[..., 3:, :]], dim=-2)


def c2w_to_w2c(c2w: Tensor) -> Tensor:
    """Camera-to-world (..., 4, 4) -> world-to-camera (..., 4, 4)."""
    return rigid_inverse(c2w)


def w2c_to_c2w(w2c: Tensor) -> Tensor:
    """World-to-camera (..., 4, 4) -> camera-to-world (..., 4, 4)."""
    return rigid_inverse(w2c)


def opencv_to_opengl(c2w: Tensor) -> Tensor:
    """Camera-to-world with OpenCV camera axes -> OpenGL axes (x right, y up, z backward).

    Flips the camera's y and z axes (columns 1 and 2 of the rotation); the centre is unchanged.
    The map is its own inverse.
    """
    _check_mat(c2w, 4, "opencv_to_opengl")
    flip = c2w.new_tensor(_FLIP_YZ)
    return c2w * flip  # broadcasts over the last axis: scales columns


opengl_to_opencv = opencv_to_opengl


def make_intrinsics(fx, fy, cx, cy) -> Tensor:
    """Broadcast tensors (or floats) -> (..., 3, 3) pinhole matrices."""
    fx, fy, cx, cy = torch.broadcast_tensors(*[torch.as_tensor(v) for v in (fx, fy, cx, cy)])
    K = torch.zeros(*fx.shape, 3, 3, dtype=fx.dtype, device=fx.device)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2] = fx, fy, cx, cy
    K[..., 2, 2] = 1
    return K


def normalize_intrinsics(K: Tensor, height: int, width: int) -> Tensor:
    """Pixel intrinsics (..., 3, 3) -> intrinsics on the unit square (row 0 / W, row 1 / H)."""
    _check_mat(K, 3, "normalize_intrinsics")
    scale = K.new_tensor([1.0 / width, 1.0 / height, 1.0])
    return K * scale[:, None]


def denormalize_intrinsics(K: Tensor, height: int, width: int) -> Tensor:
    """Unit-square intrinsics (..., 3, 3) -> pixel intrinsics for an H x W image."""
    _check_mat(K, 3, "denormalize_intrinsics")
    scale = K.new_tensor([float(width), float(height), 1.0])
    return K * scale[:, None]


def resize_intrinsics(K: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Intrinsics after resizing an image from (H, W) to (H', W') (whole image, no crop).

    With pixel centres at +0.5, continuous image coordinates scale exactly, so fx, cx scale by
    W'/W and fy, cy by H'/H.
    """
    _check_mat(K, 3, "resize_intrinsics")
    (h0, w0), (h1, w1) = old_size, new_size
    scale = K.new_tensor([w1 / w0, h1 / h0, 1.0])
    return K * scale[:, None]


def crop_intrinsics(K: Tensor, top: int, left: int) -> Tensor:
    """Intrinsics after cropping the image so that pixel (left, top) becomes (0, 0)."""
    _check_mat(K, 3, "crop_intrinsics")
    out = K.clone()
    out[..., 0, 2] = K[..., 0, 2] - left
    out[..., 1, 2] = K[..., 1, 2] - top
    return out


class CameraError(ValueError):
    """A camera refused by `check_cameras`. `index`: the first bad camera (flat over the leading
    dimensions; None for a shape error); `what`: what is wrong with it."""

    def __init__(self, what: str, index: Optional[int] = None, name: str = "camera"):
        super().__init__(f"{name}[{index}]: {what}" if index is not None else f"{name}: {what}")
        self.what, self.index = what, index


def check_cameras(c2w, K=None, sizes=None, *, name: str = "camera", atol: float = 1e-3) -> None:
    """Raise `CameraError` for the first camera that is not a valid pinhole camera.

    c2w (..., 4, 4) camera-to-world: finite and rigid (|R^T R - I| <= atol, |det R - 1| <= atol,
    last row [0, 0, 0, 1] to atol). With K (..., 3, 3) and sizes (..., 2) of (H, W) (or one
    (H, W) for all): K finite, exactly [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], fx, fy > 0,
    fx >= 0.05 W and fy >= 0.05 H (a field of view below ~169 degrees: smaller values usually
    mean intrinsics normalised by the image size instead of pixels), the principal point inside
    [0, W] x [0, H]. Arrays or tensors; checked in float64 on the CPU.
    """
    T = _f64(c2w)
    Kf = None if K is None else _f64(K)
    lead = T.shape[:-2]
    if T.shape[-2:] != (4, 4) or (Kf is not None and Kf.shape != lead + (3, 3)):
        got = f"K {tuple(Kf.shape)}, " if Kf is not None else ""
        raise CameraError(f"expected K (..., 3, 3) and c2w (..., 4, 4) with the same leading "
                          f"dimensions, got {got}c2w {tuple(T.shape)}", name=name)
    T = T.reshape(-1, 4, 4)
    checks = []  # (ok per camera, message for camera i), in the order they are reported
    if Kf is not None:
        Kf = Kf.reshape(-1, 3, 3)
        try:
            h, w = np.broadcast_to(np.asarray(sizes, np.float64), lead + (2,)).reshape(-1, 2).T
        except ValueError:
            raise CameraError(f"image sizes {np.shape(sizes)} do not match the cameras "
                              f"{tuple(lead)}: expected (H, W) per camera", name=name) from None
        fx, fy, cx, cy = Kf[:, 0, 0], Kf[:, 1, 1], Kf[:, 0, 2], Kf[:, 1, 2]
        with np.errstate(invalid="ignore"):
            checks += [
                (np.isfinite(Kf).all((1, 2)), lambda i: f"non-finite intrinsics {Kf[i].tolist()}"),
                ((Kf[:, 2] == (0, 0, 1)).all(1) & (Kf[:, 0, 1] == 0) & (Kf[:, 1, 0] == 0),
                 lambda i: f"intrinsics must be [[fx,0,cx],[0,fy,cy],[0,0,1]], got "
                           f"{Kf[i].tolist()}"),
                ((fx > 0) & (fy > 0),
                 lambda i: f"non-positive focal length fx={fx[i]:.6g}, fy={fy[i]:.6g}"),
                ((fx >= 0.05 * w) & (fy >= 0.05 * h),
                 lambda i: f"focal lengths fx={fx[i]:.4g}, fy={fy[i]:.4g} are not pixels of a "
                           f"{w[i]:.0f}x{h[i]:.0f} image (expected >= 0.05 x size; normalised "
                           f"intrinsics?)"),
                ((cx >= 0) & (cx <= w) & (cy >= 0) & (cy <= h),
                 lambda i: f"principal point ({cx[i]:.4g}, {cy[i]:.4g}) lies outside the "
                           f"{w[i]:.0f}x{h[i]:.0f} image"),
            ]
    finite = np.isfinite(T).all((1, 2))
    R = np.where(finite[:, None, None], T[:, :3, :3], 0.0)
    orth = np.abs(R.transpose(0, 2, 1) @ R - np.eye(3)).max((1, 2))
    det = np.linalg.det(R)
    bottom = np.abs(T[:, 3] - (0, 0, 0, 1)).max(1)
    checks += [
        (finite, lambda i: f"non-finite camera-to-world pose {T[i].tolist()}"),
        ((orth <= atol) & (np.abs(det - 1) <= atol) & (bottom <= atol),
         lambda i: f"camera-to-world pose is not rigid (|R^T R - I|max={orth[i]:.3g}, "
                   f"det R={det[i]:.4f}, last row {T[i, 3].tolist()})"),
    ]
    ok = np.logical_and.reduce([c for c, _ in checks])
    if ok.all():
        return
    i = int(np.flatnonzero(~ok)[0])
    message = next(m for c, m in checks if not c[i])
    raise CameraError(message(i), i, name)


def _f64(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
