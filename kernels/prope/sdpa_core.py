"""PRoPE attention with PyTorch SDPA as its core (`PRoPEKernels(core="sdpa")`): Triton transform
passes (core.py `transform`) around `F.scaled_dot_product_attention` (kernels/sdpa.py: cuDNN
first on CUDA), so the attention itself runs at plain attention's best speed.

Math (core.py): forward q' = D^T q, k' = E k, v' = E v, o' = SDPA(q', k', v') in the primed frame,
o = D o'; backward do' = D^T do, SDPA's own backward on the primed tensors, dq = D dq',
dk = E^T dk', dv = E^T dv'. Each pass is a `_Transform` autograd Function whose backward is the
transposed per-token map (linear: it saves nothing), and SDPA is PyTorch's own autograd node, so
activation checkpointing and SDPA's backend choice work as for plain attention.

Memory trade-off: what stays saved for the backward is SDPA's: q', k', v', its output o' and its
log-sum-exp, nothing of q, k, v, o; as many tensors as the fused path keeps (q, k, v, o, LSE).
Saving o instead of o' and recomputing o' = D^-1 o for SDPA's backward would keep as much and
add a pass (and need SDPA's private backward ops, whose signatures change between torch
releases). Transient: q', k', v' while SDPA runs (the fused pre-pass forward: k', v'); in the
backward do' and SDPA's dq', dk', dv', each freed once its pass has run; dq, dk, dv get q, k, v's
strides where those are dense. 16-bit transforms round once to the input dtype, as the
reference's do (its error bound applies).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.prope.configs import PRoPEKernels
from kernels.prope.core import GKV, KV, OUT, QT, Geometry, transform
from kernels.sdpa import sdpa

__all__ = ["sdpa_core"]

# The transposed map of each forward transform (mats index, inverse rotation): D^T <-> D, E -> E^T.
_TRANSPOSED = {(QT, False): (OUT, True), (OUT, True): (QT, False), (KV, False): (GKV, True)}


class _Transform(torch.autograd.Function):
    """y = M x per token (Geometry.mats[which], RoPE inverse if `inverse`); dx = M^T dy."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Geometry, which: int, inverse: bool, cfg) -> Tensor:
        x = x if x.stride(-1) == 1 else x.contiguous()
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        transform(x, y, g, which, inverse, cfg)
        ctx.g, ctx.back, ctx.cfg = g, _TRANSPOSED[(which, inverse)], cfg
        ctx.layout = torch.empty_like(x, device="meta")   # x's strides where dense, no memory
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = torch.empty_like(ctx.layout, device=dy.device)
        transform(dy, dx, ctx.g, *ctx.back, ctx.cfg)
        return dx, None, None, None, None


def sdpa_core(q: Tensor, k: Tensor, v: Tensor, g: Geometry,
              kernels: PRoPEKernels = PRoPEKernels()) -> Tensor:
    """o (B, h, N, d), contiguous, in q's dtype, differentiable in q, k, v; q, k, v (B, h, N, d)
    of one dtype, g: their Geometry; kernels: the transform pass's launch config."""
    cfg = kernels.config("transform", q.shape[-1], not q.is_cuda)[0]
    qp = _Transform.apply(q, g, QT, False, cfg)
    kp = _Transform.apply(k, g, KV, False, cfg)
    vp = _Transform.apply(v, g, KV, False, cfg)
    return _Transform.apply(sdpa(qp, kp, vp), g, OUT, True, cfg)
