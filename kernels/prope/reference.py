"""PRoPE (projective positional encoding) attention in plain PyTorch: the reference.

Math (docs/reference.md section 3). Per camera c with pixel intrinsics K (image H x W) and
world-to-camera T:
    K_n = [[fx/W, 0, cx/W - 1/2], [0, fy/H, cy/H - 1/2], [0, 0, 1]],   P_c = lift(K_n) T.
Per token t (camera c, patch row y, column x; tokens ordered view, row, column) and head dim d:
    D_t = blockdiag(I_{d/8} (x) P_c, R(x)^T, R(y)^T)
    q' = D_t^T q,  k' = D_t^-1 k,  v' = D_t^-1 v,  o' = softmax(q' k'^T / sqrt(d)) v',  o = D_t o'.
Conventions (`CONVENTIONS`) differ only in the key/value camera matrix A_c that replaces P_c^-1
in D_t^-1 (docs/release-facts.md): "textbook" A = P^-1 = T^-1 lift(K_n^-1); "release" (the
published GLD weights) A = T^-1 lift(K_n). q, o and the RoPE part are the same in both.
Channels [0, d/2) form d/8 chunks of 4 transformed by the camera matrix; [d/2, 3d/4) are
rotated by the column index x and [3d/4, d) by the row index y, each quarter split into halves
(a, b) with frequencies 100^(-f/(d/8)), f = 0..d/8-1:
    forward (q, k, v): [a cos + b sin, -a sin + b cos];   inverse (o): [a cos - b sin, a sin + b cos].

Design: camera matrices and the transforms are computed in float32 (float64 for float64 inputs)
whatever the input dtype, so bf16 inputs work; `upcast=True` also runs the attention itself in
that precision (the accuracy baseline), `upcast=False` casts the transformed tensors back to
the input dtype around SDPA (what an unfused PyTorch implementation does, and the speed baseline
for the fused kernel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "prope_attention_ref", "prope_matrices", "rope_tables", "prope_transform",
    "check_prope_inputs", "check_convention", "compute_dtype", "CONVENTIONS",
]

ROPE_BASE = 100.0
CONVENTIONS = ("textbook", "release")


def check_convention(convention: str, where: str = "prope_attention") -> str:
    """convention itself, or a ValueError naming it, `where`, and the choices."""
    if convention not in CONVENTIONS:
        raise ValueError(f"{where}: convention={convention!r}; choose one of "
                         f"{', '.join(map(repr, CONVENTIONS))}")
    return convention


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the camera math: float64 stays float64, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_prope_inputs(q: Tensor, k: Tensor, v: Tensor, w2c: Tensor, K: Tensor,
                       patches: tuple[int, int], image_size: tuple[int, int]) -> int:
    """Validate shapes; returns the number of views V. Errors name the argument."""
    if q.dim() != 4:
        raise ValueError(f"prope_attention: q must be (B, h, N, d), got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"prope_attention: q, k, v must have one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, _, N, d = q.shape
    if d % 8:
        raise ValueError(f"prope_attention: head dim d={d} must be divisible by 8")
    ph, pw = patches
    if w2c.dim() != 4 or w2c.shape[0] != B or w2c.shape[-2:] != (4, 4):
        raise ValueError(f"prope_attention: w2c must be (B={B}, V, 4, 4), got {tuple(w2c.shape)}")
    V = w2c.shape[1]
    if K.shape != (B, V, 3, 3):
        raise ValueError(f"prope_attention: K must be (B={B}, V={V}, 3, 3), got {tuple(K.shape)}")
    if N != V * ph * pw:
        raise ValueError(f"prope_attention: N={N} tokens but V*ph*pw = {V}*{ph}*{pw} = "
                         f"{V * ph * pw} (tokens are ordered view, row, column)")
    H, W = image_size
    if H <= 0 or W <= 0:
        raise ValueError(f"prope_attention: image_size must be positive, got {image_size}")
    return V


def prope_matrices(w2c: Tensor, K: Tensor, image_size: tuple[int, int],
                   dtype: torch.dtype = torch.float32,
                   convention: str = "textbook") -> tuple[Tensor, Tensor]:
    """(P, A), both (B, V, 4, 4) in `dtype`: P = lift(K_n) w2c and the key/value matrix A of the
    convention in closed form, with T^-1 = [R^T | -R^T t] (T rigid):
    "textbook" A = P^-1 = T^-1 lift(K_n^-1), "release" A = T^-1 lift(K_n).
    """
    check_convention(convention, "prope_matrices")
    H, W = image_size
    T = w2c.to(dtype)
    Kd = K.to(dtype)
    fx, fy = Kd[..., 0, 0] / W, Kd[..., 1, 1] / H
    cx, cy = Kd[..., 0, 2] / W - 0.5, Kd[..., 1, 2] / H - 0.5
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    lift_k = torch.stack([fx, zero, cx, zero, zero, fy, cy, zero,
                          zero, zero, one, zero, zero, zero, zero, one], -1).unflatten(-1, (4, 4))
    lift_kinv = torch.stack([1 / fx, zero, -cx / fx, zero, zero, 1 / fy, -cy / fy, zero,
                             zero, zero, one, zero, zero, zero, zero, one],
                            -1).unflatten(-1, (4, 4))
    R, t = T[..., :3, :3], T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    T_inv = torch.cat([torch.cat([Rt, -Rt @ t], -1), T[..., 3:, :]], -2)
    return lift_k @ T, T_inv @ (lift_kinv if convention == "textbook" else lift_k)


def rope_tables(patches: tuple[int, int], d: int, dtype: torch.dtype = torch.float32,
                device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cos/sin of the column (x) and row (y) angles, each (ph*pw, d/8), tokens row-major."""
    ph, pw = patches
    nf = d // 8
    freq = ROPE_BASE ** (-torch.arange(nf, dtype=torch.float64, device=device) / nf)
    ys, xs = torch.meshgrid(torch.arange(ph, dtype=torch.float64, device=device),
                            torch.arange(pw, dtype=torch.float64, device=device), indexing="ij")
    ax = xs.reshape(-1, 1) * freq
    ay = ys.reshape(-1, 1) * freq
    return (ax.cos().to(dtype), ax.sin().to(dtype), ay.cos().to(dtype), ay.sin().to(dtype))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    if inverse:
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([a * cos + b * sin, -a * sin + b * cos], dim=-1)


def prope_transform(x: Tensor, mat: Tensor, tables: tuple[Tensor, ...], num_views: int,
                    transpose: bool = False, inverse_rope: bool = False) -> Tensor:
    """Apply one side of D_t to x (B, h, N, d) in the dtype of `mat`.

    The camera part multiplies each 4-channel chunk of token t by mat[c(t)] (or its transpose);
    the RoPE part rotates forward or inverse. q: (P, transpose=True); k, v: (A: P^-1 in the
    textbook convention); o: (P, inverse_rope=True).
    """
    B, h, N, d = x.shape
    cos_x, sin_x, cos_y, sin_y = tables
    xv = x.to(mat.dtype).reshape(B, h, num_views, N // num_views, d)
    proj = xv[..., : d // 2].unflatten(-1, (d // 8, 4))
    eq = "bvji,bhvnkj->bhvnki" if transpose else "bvij,bhvnkj->bhvnki"
    proj = torch.einsum(eq, mat, proj).flatten(-2)
    rx = _rotate(xv[..., d // 2: 3 * d // 4], cos_x, sin_x, inverse_rope)
    ry = _rotate(xv[..., 3 * d // 4:], cos_y, sin_y, inverse_rope)
    return torch.cat([proj, rx, ry], dim=-1).reshape(B, h, N, d)


def prope_attention_ref(q: Tensor, k: Tensor, v: Tensor, w2c: Tensor, K: Tensor,
                        patches: tuple[int, int], image_size: tuple[int, int],
                        upcast: bool = False, convention: str = "textbook") -> Tensor:
    """PRoPE attention over all views' tokens.

    Args:
        q, k, v: (B, h, N, d), N = V * ph * pw tokens ordered (view, row, column), d % 8 == 0.
        w2c: (B, V, 4, 4) OpenCV world-to-camera.  K: (B, V, 3, 3) pixel intrinsics.
        patches: (ph, pw) patch grid of every view.  image_size: (H, W) in pixels.
        upcast: run the attention in the camera-math precision too (accuracy reference).
        convention: "textbook" or "release" (the key/value matrix A, `prope_matrices`).
    Returns:
        o: (B, h, N, d) in q's dtype.
    """
    V = check_prope_inputs(q, k, v, w2c, K, patches, image_size)
    check_convention(convention)
    d = q.shape[-1]
    cdt = compute_dtype(q.dtype)
    P, A = prope_matrices(w2c, K, image_size, cdt, convention)
    tables = rope_tables(patches, d, cdt, q.device)
    qp = prope_transform(q, P, tables, V, transpose=True)
    kp = prope_transform(k, A, tables, V)
    vp = prope_transform(v, A, tables, V)
    att_dtype = cdt if upcast else q.dtype
    op = F.scaled_dot_product_attention(qp.to(att_dtype), kp.to(att_dtype), vp.to(att_dtype),
                                        scale=1.0 / math.sqrt(d))
    return prope_transform(op, P, tables, V, inverse_rope=True).to(q.dtype)
