"""The pre-pass PRoPE forward: k' = E k and v' = E v (core.py) written to transient scratch by the
transform pass, then a flash-attention kernel on them that transforms q as it loads its query
block and o = D o' as it stores it.

Design: the main loop is the standard online-softmax loop (one dot over the full head dim for
QK^T and one for PV, exp2, fp32 statistics; K / V tiles through TMA descriptors on Hopper), so
it runs at flash-attention speed; the price is k', v' (2 tensors the size of k) allocated for the
duration of the call. It is the fastest fused forward at every measured shape with gradients
(docs/gpu.md); the warp-specialised one (forward_ws.py) trades speed for no scratch. Returns o
and the fp32 log2-sum-exp (B, h, N) that the backwards read.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.prope.configs import PRoPEKernels, padded
from kernels.prope.core import (KV, LOG2E, OUT, QT, Geometry, key_tile, launch_blocks,
                                launch_kwargs, precision_kwargs, row_ptrs, token_block, transform,
                                transform_tile)

__all__ = ["forward_prepass", "launch_attention"]


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, s_kn, s_vn, lo, hi, N, qk_scale, KD, VD, bh,
               D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
               MPREC: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over key tiles [lo, hi) (MASK: keys >= N masked): the accumulator of
    p v', row sums l_i and row maxima m_i (log2 domain) carried across tiles."""
    for start in range(lo, hi, BN):
        key = start + tl.arange(0, BN)
        k = key_tile(KD, k_base, start, bh, s_kn, N, D, DP, BN, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=MPREC)
        if MASK:
            s = tl.where((key < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = key_tile(VD, v_base, start, bh, s_vn, N, D, DP, BN, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=MPREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prope_fwd(Q, KP, VP, O, LSE, MQ, MO, CT, ST, KD, VD,
               s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_ob, s_oh, s_on,
               NH, N, NV, NVIEW, PW, PMAX, qk_scale,
               D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               MPREC: tl.constexpr, XPREC: tl.constexpr, TMA: tl.constexpr):
    """o for one query block: q transformed as it is loaded, keys/values primed (KP, VP: k', v'
    with strides s_k*; or, if TMA, the tensor descriptors KD, VD over them), o = D o'
    transformed in registers as it is stored."""
    bh, b, h, tok, ok, t64, c, mask = token_block(NH, N, BM, D, DP)
    q = tl.load(row_ptrs(Q, b, h, t64, s_qb, s_qh, s_qn) + c, mask=mask, other=0.0).to(tl.float32)
    mats = b * NVIEW * 16
    q = transform_tile(q, tok, ok, MQ + mats, CT, ST, NV, PW, PMAX, D, DP, False,
                       XPREC).to(KP.dtype.element_ty)
    k_base = KP + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = VP + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    n_full = (N // BN) * BN
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, s_kn, s_kn, 0, n_full, N,
                               qk_scale, KD, VD, bh, D, DP, BN, False, MPREC, TMA)
    acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, s_kn, s_kn, n_full, N, N,
                               qk_scale, KD, VD, bh, D, DP, BN, True, MPREC, TMA)
    tl.store(LSE + bh.to(tl.int64) * N + tok, m_i + tl.log2(l_i), mask=ok)
    o = transform_tile(acc / l_i[:, None], tok, ok, MO + mats, CT, ST, NV, PW, PMAX, D, DP, True,
                       XPREC)
    tl.store(row_ptrs(O, b, h, t64, s_ob, s_oh, s_on) + c, o.to(O.dtype.element_ty), mask=mask)



def launch_attention(q: Tensor, kp: Tensor, vp: Tensor, o: Tensor, lse: Tensor, g: Geometry,
                     kernels: PRoPEKernels) -> None:
    """o, lse from q (B, h, N, d) and the primed kp, vp (equal strides)."""
    B, H, N, d = q.shape
    assert kp.stride() == vp.stride()

    def launch(cfg, tma, descs):
        _prope_fwd[(triton.cdiv(N, cfg.block_m), B * H)](
            q, kp, vp, o, lse, g.mats[QT], g.mats[OUT], g.ct, g.st, *descs,
            q.stride(0), q.stride(1), q.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
            o.stride(0), o.stride(1), o.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax,
            LOG2E / math.sqrt(d), D=d, DP=padded(d), BM=cfg.block_m, BN=cfg.block_n,
            TMA=tma, **precision_kwargs(q), **launch_kwargs(q, cfg))
    launch_blocks("prepass", q, kernels, [kp, vp], "block_n", launch)


def forward_prepass(q: Tensor, k: Tensor, v: Tensor, g: Geometry,
                    kernels: PRoPEKernels = PRoPEKernels()) -> tuple[Tensor, Tensor]:
    """(o (B, h, N, d) in q's dtype, contiguous; lse (B, h, N) fp32 log2-sum-exp) of PRoPE
    attention; q, k, v (B, h, N, d) with a unit last stride."""
    B, H, N, d = q.shape
    xcfg = kernels.config("transform", d, not q.is_cuda)[0]
    kp = torch.empty(B, H, N, d, dtype=k.dtype, device=k.device)
    vp = torch.empty_like(kp)
    transform(k, kp, g, KV, False, xcfg)
    transform(v, vp, g, KV, False, xcfg)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    launch_attention(q, kp, vp, o, lse, g, kernels)
    return o, lse
