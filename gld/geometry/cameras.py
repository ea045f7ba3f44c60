"""Camera conventions and intrinsics.

Conventions: OpenCV axes (x right, y down, z forward) unless a name says otherwise; extrinsics
are 4x4 homogeneous matrices; intrinsics K are 3x3 in pixels, with pixel (u, v) covering
[u, u+1) x [v, v+1) so that its centre is (u+0.5, v+0.5). Every function is batched over any
leading dimensions (written `...`) and keeps the input dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "rigid_inverse", "c2w_to_w2c", "w2c_to_c2w", "opencv_to_opengl", "opengl_to_opencv",
    "normalize_intrinsics", "denormalize_intrinsics", "resize_intrinsics", "crop_intrinsics",
    "make_intrinsics", "to_homogeneous", "check_rigid",
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


def check_rigid(T: Tensor, name: str = "pose", atol: float = 1e-3) -> None:
    """Raise ValueError naming `name` and the first bad index unless T (..., 4, 4) is a finite
    rigid transform (orthonormal rotation with det +1, last row [0, 0, 0, 1])."""
    _check_mat(T, 4, name)
    flat = T.reshape(-1, 4, 4).double()
    finite = torch.isfinite(flat).flatten(1).all(1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ValueError(f"{name}[{i}]: non-finite values in the pose matrix")
    R = flat[:, :3, :3]
    eye = torch.eye(3, dtype=R.dtype)
    orth_err = (R.transpose(-1, -2) @ R - eye).abs().flatten(1).amax(1)
    det = torch.linalg.det(R)
    bottom_err = (flat[:, 3] - flat.new_tensor([0, 0, 0, 1])).abs().amax(1)
    bad = (orth_err > atol) | ((det - 1).abs() > atol) | (bottom_err > atol)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}[{i}]: not a rigid transform (|R^T R - I|max={orth_err[i]:.3g}, "
            f"det R={det[i]:.4f}, last row={flat[i, 3].tolist()})"
        )
