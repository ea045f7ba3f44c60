"""Fused PRoPE multi-view attention in Triton (forward and backward), beside `prope_ref.py`.

Math (reference.md section 3, names as in `prope_ref`): per token t of camera c,
    q' = D_t^T q,  k' = D_t^-1 k,  v' = D_t^-1 v,  o' = softmax(q' k'^T / sqrt(d)) v',  o = D_t o'
with D_t = blockdiag(I (x) P_c, R(x)^T, R(y)^T): channels [0, d/2) in 4-chunks through the camera
matrix, [d/2, d) rotated by the patch column / row (RoPE).

Design ("pre-applied in one pass", issue #3): the main loops are plain flash attention on primed
tensors, so they run at flash-attention speed; the per-token transforms happen outside them.
- Every transform is one per-token map x -> M_c x (4-chunks) + RoPE rotation, `_xform`, on an
  fp32 register tile: the camera part is a dot with blockdiag(M_c^T) (one per camera present in
  the tile, at most 2 when the tile is not longer than a view); the RoPE partners come from a
  second load of the same rows in the transform pass (cache hits) or a signed-permutation dot
  on register tiles (q, o, dq); cos/sin are gathered from (2, max(ph, pw), d/8) angle tables
  (a few KiB, L1-resident). The dots run in tf32 for bf16 (inside bf16's rounding), tf32x3 for
  fp16, exact for fp32. Camera matrices come from one small kernel (`_geometry_kernel`), the
  angle tables are cached per (patches, d, device).
- Forward, default ("ws", kernels/prope_fwd_ws.py: Hopper (sm_90), 16-bit, d 48 / 64 / 128): a
  warp-specialised Gluon kernel whose producer warps transform k, v tiles into shared memory
  while the consumer warpgroups run the attention loop with wgmma; q is transformed as it is
  loaded, o as it is stored. Nothing but o and the LSE is allocated: plain attention's peak.
- Forward ("prepass", the fallback elsewhere, and a choice: `set_forward("prepass")`, about
  20% faster at 2 transient tensors the size of k): one pass each writes k' and v' (input
  dtype) to scratch; the attention kernel transforms q as it loads its query block, runs the
  standard online-softmax loop (K/V tiles through TMA descriptors on Hopper; one dot over the
  full head dim for QK^T and one for PV, exp2, fp32 statistics) and transforms o = D o' in
  registers as it stores it. Saved for the backward (either forward): q, k, v, o (no copies)
  and the fp32 log2-sum-exp (B, h, N). `set_forward(..., "merged")` selects
  kernels/prope_fwd_inloop.py instead: no scratch (the transforms run inside the key loop),
  any GPU, slower.
- Backward ("two_kernel"): passes q' and do' = D^T do into scratch, k' and v' into the dk / dv
  buffers. The dq kernel (query block, loop over keys) also writes delta = rowsum(o * do)
  (equal to rowsum(o' * do')) and stores dq = D dq' like the forward's o; the dk/dv kernel (key
  block, loop over queries) reads its k', v' block and overwrites it with dk', dv'; a post-pass
  applies dk = D^-T dk', dv = D^-T dv' in place (in the dk/dv kernel the transform dots made
  ptxas serialise its wgmma). `set_backward("atomic")` (the default at d = 64 on Hopper, where
  it measured faster) runs kernels/prope_triton_bwd.py: one kernel, 5 matmuls, dq by TMA
  reduce-add into an fp32 accumulator.
- Transient memory: the prepass forward holds k', v' (2 tensors the size of k) during the
  call, the backward q', do' (2 tensors; the atomic one do' and the fp32 dq accumulator); all
  are freed before the call returns, none is saved. So the default forward's peak is plain
  attention's + LSE (the prepass's: + 2 tensors); the two-kernel forward+backward peak equals
  cuDNN's. dk and dv are rounded twice in 16-bit (dk', then dk), as in the unfused reference.
- Head dims that are not powers of two (d = 48) run padded to the next one (64) in registers
  (a third more tensor-core work; memory holds d columns only). Tokens need not align with
  blocks: each row carries its camera.
- Speed (H100, bf16, N = 10368, forward / forward+backward TFLOP/s, peak forward memory above
  the inputs; launch/results/profile_kernels_ws_default_h100_2026-11-24.md): default (ws
  forward) d = 64: 318 / 359 at 42 MiB; d = 48: 228 / 259 at 32 MiB; d = 128: 273 / 327 at 83
  MiB. With `set_forward("prepass")`: 379 / 376 at 123 MiB, 293 / 275 at 92 MiB, 347 / 354 at
  247 MiB. SDPA flash (no cameras) 315 / 284, cuDNN 446 / 430, the PyTorch reference 202 / 248
  at d = 64. The merged no-scratch forward: 231 at d = 64
  (launch/results/profile_kernels_h100_2026-11-24.md).

Supported: bf16/fp32 on CUDA with d % 8 == 0 and 16 <= d <= 128, fp16 with d <= 64 (see
`_precisions`); other d, fp16 at d > 64 and float64 use the reference. On CPU it runs under the
Triton interpreter (fp32) when the process started with TRITON_INTERPRET=1 (triton decides
compiled vs interpreted when it is first imported), else it uses the reference. No gradient
flows to the cameras (w2c, K).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kernels.prope_ref import check_prope_inputs, prope_attention_ref, rope_tables

__all__ = ["prope_attention", "FusedConfig", "supported", "interpreted", "set_config",
           "set_forward", "FORWARDS", "set_backward", "BACKWARDS"]

LOG2E = 1.4426950408889634
try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:   # older triton: pointer loads only
    _TensorDescriptor = None
_TMA = True   # benchmarks switch it off to compare


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _geometry_kernel(W2C, KI, MATS, BV, inv_h, inv_w):
    """Per camera (program): P = lift(K_n) T and P^-1 = T^-1 lift(K_n^-1) (prope_matrices' closed
    form, fp32), stored as MATS[0..3] = P^T, P^-1, P, P^-T, each (B*V, 4, 4)."""
    cam = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, 4)[:, None]
    c = tl.arange(0, 4)[None, :]
    t = tl.load(W2C + cam * 16 + r * 4 + c)
    tt = tl.load(W2C + cam * 16 + c * 4 + r)                     # T^T
    kb = KI + cam * 9
    fx = tl.load(kb) * inv_w
    fy = tl.load(kb + 4) * inv_h
    cx = tl.load(kb + 2) * inv_w - 0.5
    cy = tl.load(kb + 5) * inv_h - 0.5
    diag = tl.where(r == 0, fx, tl.where(r == 1, fy, 1.0))
    off = tl.where(r == 0, cx, cy)
    lk = tl.where(r == c, diag, 0.0) + tl.where((r < 2) & (c == 2), off, 0.0)
    lki = tl.where(r == c, 1.0 / diag, 0.0) + tl.where((r < 2) & (c == 2), -off / diag, 0.0)
    tvec = tl.sum(tl.where(c == 3, t, 0.0), 1)                    # T[:, 3]
    rt = tl.where((r < 3) & (c < 3), tt, 0.0)                     # R^T
    rt_t = tl.sum(rt * tvec[None, :], 1)                          # R^T t
    t_inv = rt + tl.where((c == 3) & (r < 3), -rt_t[:, None], 0.0) + tl.where(
        (r == 3) & (c == 3), 1.0, 0.0)
    p = tl.sum(lk[:, :, None] * t[None, :, :], 1)
    p_inv = tl.sum(t_inv[:, :, None] * lki[None, :, :], 1)
    out = MATS + cam * 16
    tl.store(out + c * 4 + r, p)                  # P^T
    tl.store(out + BV * 16 + r * 4 + c, p_inv)
    tl.store(out + 2 * BV * 16 + r * 4 + c, p)
    tl.store(out + 3 * BV * 16 + c * 4 + r, p_inv)


@triton.jit
def _xform(x, tok, ok, mat, CS, SN, NV, PW, PMAX, D: tl.constexpr, DP: tl.constexpr,
           INV: tl.constexpr, XPREC: tl.constexpr):
    return _xform_p(x, x, False, tok, ok, mat, CS, SN, NV, PW, PMAX, D, DP, INV, XPREC)


@triton.jit
def _xform_p(x, xp, HAVE_XP: tl.constexpr, tok, ok, mat, CS, SN, NV, PW, PMAX, D: tl.constexpr,
             DP: tl.constexpr, INV: tl.constexpr, XPREC: tl.constexpr):
    """Per-token transform of the fp32 register tile x (BT, DP), row r = token tok[r]:
    columns [0, D/2) in 4-chunks times M[camera] (out_i = sum_j M[i, j] x_j, M 4x4 row-major at
    mat + 16 * camera), columns [D/2, D) rotated by the token's RoPE angles (forward
    [a cos + b sin, -a sin + b cos], or the inverse if INV); columns >= D are 0.
    No gathers: the camera part is x @ blockdiag(M^T) (one dot per camera present in the tile,
    at most 2 when the tile is not longer than a view), the RoPE partner swap x @ (signed
    permutation), cos/sin gathered from the (2, PMAX, D/8) x / y angle tables (a few KiB: L1).
    With HAVE_XP, xp already holds each RoPE column's partner (a <-> b; the pass kernel loads
    it from memory, cache hits), which saves the permutation dot."""
    HALF: tl.constexpr = D // 2
    Q4: tl.constexpr = D // 4
    Q8: tl.constexpr = D // 8
    ri = tl.arange(0, DP)[:, None]
    c = tl.arange(0, DP)[None, :]
    okr = ok[:, None]
    cam = tok // NV
    rope = (c >= HALF) & (c < D)
    rel = tl.where(rope, c - HALF, 0)
    is_a = (rel % Q4) < Q8
    t = (tok % NV)[:, None]
    xy = rel // Q4
    tab = xy * (PMAX * Q8) + tl.where(xy == 0, t % PW, t // PW) * Q8 + rel % Q8
    cs = tl.load(CS + tab, mask=okr & rope, other=0.0)
    sn = tl.load(SN + tab, mask=okr & rope, other=0.0)
    sn = tl.where(is_a != INV, sn, -sn)
    swap = ((ri == tl.where(is_a, c + Q8, c - Q8)) & rope).to(tl.float32)
    if HAVE_XP:
        y = x * cs + xp * sn
    else:
        y = x * cs + tl.dot(x, swap, input_precision=XPREC) * sn
    blk = ((ri // 4) == (c // 4)) & (c < HALF)
    idx = (c % 4) * 4 + (ri % 4)                   # G[r, c] = M[c % 4, r % 4]
    lo = tl.min(tl.where(ok, cam, 2147483647), 0)
    hi = tl.max(tl.where(ok, cam, -1), 0)
    for cc in range(lo, hi + 1):
        g = tl.load(mat + cc * 16 + idx, mask=blk, other=0.0)
        y += tl.where((cam == cc)[:, None], tl.dot(x, g, input_precision=XPREC), 0.0)
    return y


@triton.jit
def _xform_kernel(X, Y, MAT, CT, ST, s_xb, s_xh, s_xn, s_yb, s_yh, s_yn, NH, N, NV, NVIEW, PW,
                  PMAX,
                  D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, INV: tl.constexpr,
                  XPREC: tl.constexpr):
    """Y = transform(X) for every token (the pre-pass)."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    ok = tok < N
    t64 = tok.to(tl.int64)[:, None]
    c = tl.arange(0, DP)[None, :]
    mask = ok[:, None] & (c < D)
    rows = X + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + t64 * s_xn
    x = tl.load(rows + c, mask=mask, other=0.0).to(tl.float32)
    # RoPE partners: column c of quarter [a | b] pairs with c +- D/8 (same rows: cache hits)
    rope = (c >= D // 2) & (c < D)
    rel = tl.where(rope, c - D // 2, 0)
    pc = tl.where(rope, tl.where((rel % (D // 4)) < D // 8, c + D // 8, c - D // 8), c)
    xp = tl.load(rows + pc, mask=mask & rope, other=0.0).to(tl.float32)
    y = _xform_p(x, xp, True, tok, ok, MAT + b * NVIEW * 16, CT, ST, NV, PW, PMAX, D, DP, INV,
                 XPREC)
    tl.store(Y + b.to(tl.int64) * s_yb + h.to(tl.int64) * s_yh + t64 * s_yn + c,
             y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, s_kn, s_vn, lo, hi, N, qk_scale, KD, VD, bh,
               D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
               MPREC: tl.constexpr, TMA: tl.constexpr):
    c = tl.arange(0, DP)[None, :]
    for start in range(lo, hi, BN):
        key = start + tl.arange(0, BN)
        kmask = (key < N)[:, None] & (c < D)
        if TMA:   # (B*h, N, d) descriptors: rows >= N and columns >= d read as zeros
            k = KD.load([bh, start, 0]).reshape(BN, DP)
        else:
            k = tl.load(k_base + key.to(tl.int64)[:, None] * s_kn + c, mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=MPREC)
        if MASK:
            s = tl.where((key < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = VD.load([bh, start, 0]).reshape(BN, DP)
        else:
            v = tl.load(v_base + key.to(tl.int64)[:, None] * s_vn + c, mask=kmask, other=0.0)
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
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = tok < N
    t64 = tok.to(tl.int64)[:, None]
    c = tl.arange(0, DP)[None, :]
    mask = ok[:, None] & (c < D)
    q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + t64 * s_qn + c, mask=mask,
                other=0.0).to(tl.float32)
    mats = b * NVIEW * 16
    q = _xform(q, tok, ok, MQ + mats, CT, ST, NV, PW, PMAX, D, DP, False,
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
    o = _xform(acc / l_i[:, None], tok, ok, MO + mats, CT, ST, NV, PW, PMAX, D, DP, True, XPREC)
    tl.store(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + t64 * s_on + c,
             o.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, s_kn, lo, hi, N, qk_scale, KD, VD, bh,
              D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
              MPREC: tl.constexpr, TMA: tl.constexpr):
    c = tl.arange(0, DP)[None, :]
    for start in range(lo, hi, BN):
        key = start + tl.arange(0, BN)
        kmask = (key < N)[:, None] & (c < D)
        if TMA:
            k = KD.load([bh, start, 0]).reshape(BN, DP)
            v = VD.load([bh, start, 0]).reshape(BN, DP)
        else:
            k = tl.load(k_base + key.to(tl.int64)[:, None] * s_kn + c, mask=kmask, other=0.0)
            v = tl.load(v_base + key.to(tl.int64)[:, None] * s_kn + c, mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=MPREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASK:
            p = tl.where((key < N)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=MPREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=MPREC)
    return dq


@triton.jit
def _prope_bwd_dq(QP, DOP, KP, VP, O, DO, DQ, LSE, DELTA, MO, CT, ST, KD, VD,
                  s_pb, s_ph, s_pn, s_kb, s_kh, s_kn, s_ob, s_oh, s_on, s_db, s_dh, s_dn,
                  s_gb, s_gh, s_gn, NH, N, NV, NVIEW, PW, PMAX, qk_scale, sm_scale,
                  D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  MPREC: tl.constexpr, XPREC: tl.constexpr, TMA: tl.constexpr):
    """dq for one query block from q', do' (QP, DOP: strides s_p*) and k', v' (KP, VP: strides
    s_k*); also writes delta = rowsum(o * do). dq = D dq' transformed as it is stored."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = tok < N
    t64 = tok.to(tl.int64)[:, None]
    c = tl.arange(0, DP)[None, :]
    mask = ok[:, None] & (c < D)
    p_off = b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph + t64 * s_pn + c
    q = tl.load(QP + p_off, mask=mask, other=0.0)
    do = tl.load(DOP + p_off, mask=mask, other=0.0)
    o_raw = tl.load(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + t64 * s_on + c,
                    mask=mask, other=0.0)
    do_raw = tl.load(DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + t64 * s_dn + c,
                     mask=mask, other=0.0)
    delta = tl.sum(o_raw.to(tl.float32) * do_raw.to(tl.float32), 1)
    stat = bh.to(tl.int64) * N + tok
    tl.store(DELTA + stat, delta, mask=ok)
    lse = tl.load(LSE + stat, mask=ok, other=0.0)
    k_base = KP + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = VP + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh

    dq = tl.zeros([BM, DP], tl.float32)
    n_full = (N // BN) * BN
    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, s_kn, 0, n_full, N, qk_scale, KD, VD,
                   bh, D, DP, BN, False, MPREC, TMA)
    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, s_kn, n_full, N, N, qk_scale, KD, VD,
                   bh, D, DP, BN, True, MPREC, TMA)
    dq = _xform(dq * sm_scale, tok, ok, MO + b * NVIEW * 16, CT, ST, NV, PW, PMAX, D, DP, True,
                XPREC)
    tl.store(DQ + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh + t64 * s_gn + c,
             dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _prope_bwd_dkdv(QP, DOP, DK, DV, LSE, DELTA, QD, DOD,
                    s_pb, s_ph, s_pn, s_kb, s_kh, s_kn, NH, N, qk_scale, sm_scale,
                    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    MPREC: tl.constexpr, TMA: tl.constexpr):
    """dk', dv' for one key block. DK / DV (strides s_k*) hold k', v' on entry: the block is
    read, dk', dv' accumulated over all queries (q', do' in QP / DOP), and the block overwritten
    with them (a post-pass then applies D^-T in place: transforming here, in registers, made
    ptxas serialise this kernel's wgmma and cost 57 registers)."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    key = tl.program_id(0) * BN + tl.arange(0, BN)
    kok = key < N
    k64 = key.to(tl.int64)[:, None]
    c = tl.arange(0, DP)[None, :]
    kmask = kok[:, None] & (c < D)
    dk_rows = DK + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + k64 * s_kn
    dv_rows = DV + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + k64 * s_kn
    k = tl.load(dk_rows + c, mask=kmask, other=0.0)
    v = tl.load(dv_rows + c, mask=kmask, other=0.0)
    q_base = QP + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    do_base = DOP + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    stat = LSE + bh.to(tl.int64) * N
    dstat = DELTA + bh.to(tl.int64) * N

    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    for start in range(0, N, BM):
        tok = start + tl.arange(0, BM)
        ok = tok < N
        off = tok.to(tl.int64)[:, None] * s_pn + c
        qmask = ok[:, None] & (c < D)
        if TMA:   # (B*h, N, d) descriptors over the q' / do' scratch: rows >= N read as 0
            q = QD.load([bh, start, 0]).reshape(BM, DP)
            do = DOD.load([bh, start, 0]).reshape(BM, DP)
        else:
            q = tl.load(q_base + off, mask=qmask, other=0.0)
            do = tl.load(do_base + off, mask=qmask, other=0.0)
        lse = tl.load(stat + tok, mask=ok, other=float("inf"))
        delta = tl.load(dstat + tok, mask=ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=MPREC)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=MPREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=MPREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=MPREC)
    tl.debug_barrier()   # every warp has read its k', v' rows (long ago) before they are replaced
    tl.store(dk_rows + c, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(dv_rows + c, dv.to(DV.dtype.element_ty), mask=kmask)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedConfig:
    """Block sizes and launch settings of one kernel (fwd / dq: block_m query rows per program,
    block_n keys per step; dkdv: block_n keys per program, block_m queries per step)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Chosen from the H100 sweep in launch/profile_kernels.py (results in launch/results/).
_DEFAULTS = {
    "fwd": {64: FusedConfig(128, 64, 4, 4), 128: FusedConfig(128, 128, 8, 3)},
    "dq": {64: FusedConfig(128, 64, 4, 4), 128: FusedConfig(128, 64, 8, 3)},
    "dkdv": {64: FusedConfig(32, 128, 4, 4), 128: FusedConfig(64, 128, 8, 3)},
    # no-scratch forward (kernels/prope_fwd_inloop.py): 256-row blocks halve the per-key
    # rotation work per query row (H100 sweep at d = 64 and 48); below d = 64 smaller blocks
    "merged": {32: FusedConfig(128, 64, 4, 3), 64: FusedConfig(256, 64, 8, 3),
               128: FusedConfig(128, 64, 8, 3)},
}
_XFORM_BLOCK = 64
_XFORM_WARPS = 4
_overrides: dict = {}


def set_config(kind: str, dp: int, cfg: Optional[FusedConfig]) -> None:
    """Override the launch config of one kernel ("fwd", "dq", "dkdv", "merged") for padded head
    dim dp (the next power of two >= d; benchmarks)."""
    if cfg is None:
        _overrides.pop((kind, dp), None)
    else:
        _overrides[(kind, dp)] = cfg


def _padded(d: int) -> int:
    return 1 << (d - 1).bit_length()


def _config(kind: str, d: int, interpret: bool) -> FusedConfig:
    if interpret:
        return FusedConfig(16, 16, 1, 1)
    dp = _padded(d)
    if (kind, dp) in _overrides:
        return _overrides[(kind, dp)]
    table = _DEFAULTS[kind]
    return table.get(dp, table[128 if dp > 64 else 64])


def supported(q: Tensor) -> bool:
    """Whether `prope_attention` runs the fused kernel for q (else it uses the reference)."""
    d = q.shape[-1]
    if d % 8 or not 16 <= d <= 128 or q.dtype not in (torch.float16, torch.bfloat16,
                                                       torch.float32):
        return False
    if q.dtype == torch.float16 and d > 64:
        return False   # see _precisions
    if q.is_cuda:
        return not interpreted()
    return q.device.type == "cpu" and interpreted() and q.dtype == torch.float32


def interpreted() -> bool:
    """True when this module's kernels are Triton-interpreter functions (TRITON_INTERPRET=1 was
    set before triton was first imported in this process): then they run on CPU tensors."""
    return not isinstance(_prope_fwd, JITFunction)


@dataclass
class _Geometry:
    mats: Tensor     # (4, B, V, 4, 4) fp32: P^T (q, do), P^-1 (k, v), P (o, dq), P^-T (dk, dv)
    ct: Tensor       # (2, pmax, d/8) fp32 cos of the x (by column) and y (by row) angles
    st: Tensor       # (2, pmax, d/8) fp32 sin of the same
    views: int
    per_view: int
    pw: int          # patch columns per view
    pmax: int        # max(ph, pw): rows of the angle tables


QT, KV, OUT, GKV = range(4)


def _geometry(w2c: Tensor, K: Tensor, patches, image_size, d: int, device) -> _Geometry:
    B, V = w2c.shape[:2]
    mats = torch.empty(4, B, V, 4, 4, dtype=torch.float32, device=device)
    _geometry_kernel[(B * V,)](w2c.detach().to(device, torch.float32).contiguous(),
                               K.detach().to(device, torch.float32).contiguous(), mats, B * V,
                               1.0 / image_size[0], 1.0 / image_size[1])
    ct, st, pmax = _rope_pairs_tables(tuple(patches), d, torch.device(device))
    return _Geometry(mats, ct, st, V, patches[0] * patches[1], patches[1], pmax)


def _dense(x: Tensor) -> Tensor:
    """x itself when its last dim is contiguous and empty_like keeps its strides (contiguous, or a
    permuted view such as (B, N, h, d).transpose(1, 2)): the backward then writes dq/dk/dv with
    q/k/v's strides. Otherwise a contiguous copy."""
    if x.stride(-1) == 1 and torch.empty_like(x, device="meta").stride() == x.stride():
        return x
    return x.contiguous()


def _precisions(dtype: torch.dtype, interpret: bool) -> tuple[str, str]:
    """(attention dots, transform dots). fp32 inputs: exact (ieee) everywhere. 16-bit: the
    attention dots take 16-bit operands (the setting is unused); the transform dots see 16-bit
    exact operands or fp32 accumulators and feed one 16-bit rounding: tf32 (2^-11) is inside
    bf16's 2^-9, fp16 rounds at 2^-11 itself and gets tf32x3 (fp32-accurate). At d > 64
    tf32x3's split operands (x and two (d, d) fp32 matrices, hi and lo) need 256-448 KiB of
    shared memory, over the H100's 227, and tf32 put fp16's o error at 2.4x the reference's
    (H100, d = 128): `supported` sends fp16 at d > 64 to the reference."""
    if interpret or dtype == torch.float32:
        return "ieee", "ieee"
    return "tf32", ("tf32x3" if dtype == torch.float16 else "tf32")


_FALLBACKS = (FusedConfig(64, 64, 4, 2), FusedConfig(32, 32, 4, 1))
_fell_back: dict = {}


def _with_fallback(kind: str, q: Tensor, launch) -> None:
    """launch(cfg) with the configured blocks; if the compiler runs out of shared memory or
    registers (e.g. fp32 at d=128), smaller configs."""
    d = q.shape[-1]
    want = _config(kind, d, not q.is_cuda)
    key = (kind, d, q.dtype, want)
    cfg = _fell_back.get(key, want)
    try:
        launch(cfg)
        return
    except triton.runtime.errors.OutOfResources:
        if not q.is_cuda:
            raise
    for fb in (FusedConfig(cfg.block_m, cfg.block_n, cfg.num_warps, 2),) + _FALLBACKS:
        try:
            launch(fb)
        except triton.runtime.errors.OutOfResources:
            continue
        _fell_back[key] = fb
        return
    raise RuntimeError(f"prope_attention: no launch config of the {kind} kernel fits d={d}, "
                       f"{q.dtype}")


def _precs(q: Tensor) -> dict:
    mprec, xprec = _precisions(q.dtype, not q.is_cuda)
    return dict(MPREC=mprec, XPREC=xprec)


def _launch(q: Tensor, cfg: FusedConfig) -> dict:
    return {} if not q.is_cuda else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _transform(x: Tensor, y: Tensor, g: _Geometry, which: int, inverse: bool) -> None:
    """y = per-token transform of x (B, h, N, d); y may be x (each program reads its rows into
    registers before it writes them)."""
    B, H, N, d = x.shape
    bt = 16 if not x.is_cuda else _XFORM_BLOCK
    launch = {} if not x.is_cuda else dict(num_warps=_XFORM_WARPS)
    _xform_kernel[(triton.cdiv(N, bt), B * H)](
        x, y, g.mats[which], g.ct, g.st, x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax,
        D=d, DP=_padded(d), BT=bt, INV=inverse, XPREC=_precisions(x.dtype, not x.is_cuda)[1],
        **launch)


@functools.lru_cache(maxsize=None)
def _sm_major(device: torch.device) -> int:
    """The device's compute capability major (9: Hopper), looked up once per device."""
    return torch.cuda.get_device_capability(device)[0]


def _hopper_or_newer(device: torch.device) -> bool:
    return _sm_major(device) >= 9


def _use_tma(x: Tensor) -> bool:
    """TMA descriptors for the forward's k' / v' loads (contiguous scratch on a Hopper+ GPU)."""
    return (_TMA and x.is_cuda and x.is_contiguous() and _TensorDescriptor is not None
            and _hopper_or_newer(x.device))


def _launch_fwd(q, kp, vp, o, lse, g: _Geometry) -> None:
    B, H, N, d = q.shape
    assert kp.stride() == vp.stride()
    tma = _use_tma(kp)

    def launch_with(cfg):
        if tma:
            kd, vd = (_TensorDescriptor(x, [B * H, N, d], [N * d, d, 1], [1, cfg.block_n,
                                                                         _padded(d)])
                      for x in (kp, vp))
        else:
            kd, vd = kp, vp
        _prope_fwd[(triton.cdiv(N, cfg.block_m), B * H)](
            q, kp, vp, o, lse, g.mats[QT], g.mats[OUT], g.ct, g.st, kd, vd,
            q.stride(0), q.stride(1), q.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
            o.stride(0), o.stride(1), o.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax,
            LOG2E / math.sqrt(d), D=d, DP=_padded(d), BM=cfg.block_m, BN=cfg.block_n,
            TMA=tma, **_precs(q), **_launch(q, cfg))
    _with_fallback("fwd", q, launch_with)


@functools.lru_cache(maxsize=64)
def _rope_pairs_tables(patches: tuple[int, int], d: int,
                       device: torch.device) -> tuple[Tensor, Tensor, int]:
    """cos / sin (2, PMAX, d/8) fp32 of the x (index 0, by column) and y (1, by row) RoPE angles
    for the in-loop kernel (a few KiB: they stay in L1), and PMAX = max(ph, pw)."""
    ph, pw = patches
    pmax = max(ph, pw)
    cx, sx, cy, sy = rope_tables((pmax, pmax), d, torch.float32, device)
    # rope_tables is row-major over (row, column): column angles of row 0, row angles of col 0.
    idx = torch.arange(pmax, device=device)
    cos = torch.stack([cx[idx], cy[idx * pmax]]).contiguous()
    sin = torch.stack([sx[idx], sy[idx * pmax]]).contiguous()
    return cos, sin, pmax


def _forward(q: Tensor, k: Tensor, v: Tensor, g: _Geometry) -> tuple[Tensor, Tensor]:
    B, H, N, d = q.shape
    kp = torch.empty(B, H, N, d, dtype=k.dtype, device=k.device)
    vp = torch.empty_like(kp)
    _transform(k, kp, g, KV, False)
    _transform(v, vp, g, KV, False)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    _launch_fwd(q, kp, vp, o, lse, g)
    return o, lse


def _descs(xs, cfg_rows: int, d: int, on: bool):
    """(B*h, N, d) TMA descriptors with (1, rows, padded d) blocks over contiguous xs, else xs."""
    if not on:
        return xs
    B, H, N, _ = xs[0].shape
    return [_TensorDescriptor(x, [B * H, N, d], [N * d, d, 1], [1, cfg_rows, _padded(d)])
            for x in xs]


def _launch_dq(qp, dop, kp, vp, o, do, dq, lse, delta, g: _Geometry) -> None:
    B, H, N, d = qp.shape
    assert qp.stride() == dop.stride() and kp.stride() == vp.stride()
    tma = _use_tma(kp) and _use_tma(vp)

    def launch_with(cfg):
        kd, vd = _descs([kp, vp], cfg.block_n, d, tma)
        _prope_bwd_dq[(triton.cdiv(N, cfg.block_m), B * H)](
            qp, dop, kp, vp, o, do, dq, lse, delta, g.mats[OUT], g.ct, g.st, kd, vd,
            qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
            o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax,
            LOG2E / math.sqrt(d), 1.0 / math.sqrt(d), D=d, DP=_padded(d), BM=cfg.block_m,
            BN=cfg.block_n, TMA=tma, **_precs(qp), **_launch(qp, cfg))
    _with_fallback("dq", qp, launch_with)


def _launch_dkdv(qp, dop, dk, dv, lse, delta) -> None:
    B, H, N, d = qp.shape
    assert qp.stride() == dop.stride() and dk.stride() == dv.stride()
    tma = _use_tma(qp) and _use_tma(dop)

    def launch_with(cfg):
        qd, dod = _descs([qp, dop], cfg.block_m, d, tma)
        _prope_bwd_dkdv[(triton.cdiv(N, cfg.block_n), B * H)](
            qp, dop, dk, dv, lse, delta, qd, dod,
            qp.stride(0), qp.stride(1), qp.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            H, N, LOG2E / math.sqrt(d), 1.0 / math.sqrt(d),
            D=d, DP=_padded(d), BM=cfg.block_m, BN=cfg.block_n,
            MPREC=_precs(qp)["MPREC"], TMA=tma, **_launch(qp, cfg))
    _with_fallback("dkdv", qp, launch_with)


def _backward(q, k, v, o, lse, do, g: _Geometry):
    B, H, N, d = q.shape
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # dk / dv share strides (k and v are dense alike or copied), dq has q's.
    if dk.stride() != dv.stride():
        dk, dv = dk.contiguous(), dv.contiguous()
    qp = torch.empty(B, H, N, d, dtype=q.dtype, device=q.device)
    dop = torch.empty_like(qp)
    _transform(q, qp, g, QT, False)
    _transform(do, dop, g, QT, False)
    _transform(k, dk, g, KV, False)      # k' and v' live in the gradient buffers
    _transform(v, dv, g, KV, False)
    delta = torch.empty_like(lse)
    _launch_dq(qp, dop, dk, dv, o, do, dq, lse, delta, g)      # also writes delta
    _launch_dkdv(qp, dop, dk, dv, lse, delta)                   # overwrites k', v' with dk', dv'
    _transform(dk, dk, g, GKV, True)                             # dk = D^-T dk', in place
    _transform(dv, dv, g, GKV, True)
    return dq, dk, dv


def _run_forward(kind: str, q, k, v, g: _Geometry, patches) -> tuple[Tensor, Tensor]:
    """(o, lse) from the forward kernel `kind` (see `set_forward`); "ws" runs where
    kernels/prope_fwd_ws.py supports q and the pre-pass forward elsewhere."""
    if kind == "merged":
        from kernels.prope_fwd_inloop import forward_merged
        return forward_merged(q, k, v, g, patches)
    if kind == "ws":
        from kernels import prope_fwd_ws
        if prope_fwd_ws.supported(q):
            return prope_fwd_ws.forward_ws(q, k, v, g)
    return _forward(q, k, v, g)


class _PRoPEAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g: _Geometry, patches):
        q, k, v = (_dense(x) for x in (q, k, v))
        o, lse = _run_forward(_FORWARD["train"], q, k, v, g, patches)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geometry = g
        ctx.backward_kind = _backward_kind(q)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        if ctx.backward_kind == "atomic":
            from kernels.prope_triton_bwd import backward_fused
            dq, dk, dv = backward_fused(q, k, v, o, lse, do, ctx.geometry)
        else:
            dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.geometry)
        return dq, dk, dv, None, None


# Which forward runs, for calls that record a graph for the backward ("train") and for the rest
# ("infer"): "ws" (default; kernels/prope_fwd_ws.py where it runs, else the prepass: o and the
# LSE are all it allocates), "prepass" (fastest; k', v' in transient scratch during the call)
# or "merged" (kernels/prope_fwd_inloop.py: no scratch, any GPU; slower).
_FORWARD = {"train": "ws", "infer": "ws"}
FORWARDS = ("prepass", "merged", "ws")
# Which backward runs: "two_kernel" (dq kernel + dk/dv kernel, 7 matmuls, scratch q', do'),
# "atomic" (kernels/prope_triton_bwd.py: one kernel, 5 matmuls, dq by TMA reduce-add into an fp32
# accumulator: one more tensor's worth of memory) or "auto": atomic at d = 64 on Hopper, where it
# measured faster (H100: 8.06 vs 8.38 ms forward+backward at N = 10368; equal time at d = 48,
# 128 and on short sequences, where the two-kernel one needs less memory). Recorded with the
# forward call.
_BACKWARD = {"kind": "auto"}
BACKWARDS = ("auto", "two_kernel", "atomic")


def _backward_kind(q: Tensor) -> str:
    kind = _BACKWARD["kind"]
    if kind == "auto":
        from kernels.prope_triton_bwd import dq_tma_available
        kind = "atomic" if q.shape[-1] == 64 and dq_tma_available(q) else "two_kernel"
    return kind


def set_backward(kind: str) -> None:
    """Choose the backward kernel(s) for later forward calls (one of `BACKWARDS`)."""
    if kind not in BACKWARDS:
        raise ValueError(f"set_backward: {kind!r}; choose one of {BACKWARDS}")
    _BACKWARD["kind"] = kind


def set_forward(train: Optional[str] = None, infer: Optional[str] = None) -> None:
    """Choose the forward kernel per mode (one of `FORWARDS`): "ws" (default: plain attention's
    peak memory, o + the LSE; Hopper, 16-bit, d 48 / 64 / 128, else the prepass), "prepass" for
    speed (about 20% faster; 2 transient tensors the size of k), "merged" (no scratch on any
    GPU, slower)."""
    for mode, kind in (("train", train), ("infer", infer)):
        if kind is not None:
            if kind not in FORWARDS:
                raise ValueError(f"set_forward: {mode}={kind!r}; choose one of {FORWARDS}")
            _FORWARD[mode] = kind


def prope_attention(q: Tensor, k: Tensor, v: Tensor, w2c: Tensor, K: Tensor,
                    patches: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Fused PRoPE attention; same arguments and result as `prope_attention_ref`.

    q, k, v: (B, h, N, d), N = V * ph * pw tokens ordered (view, row, column);
    w2c: (B, V, 4, 4) OpenCV world-to-camera; K: (B, V, 3, 3) pixel intrinsics;
    patches: (ph, pw); image_size: (H, W) pixels. Returns o: (B, h, N, d) in q's dtype.
    Falls back to the reference where the kernel does not apply (see `supported`).
    """
    check_prope_inputs(q, k, v, w2c, K, patches, image_size)
    if not supported(q) or k.dtype != q.dtype or v.dtype != q.dtype:
        return prope_attention_ref(q, k, v, w2c, K, patches, image_size)
    g = _geometry(w2c, K, patches, image_size, q.shape[-1], q.device)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _PRoPEAttention.apply(q, k, v, g, tuple(patches))
    q, k, v = (_dense(x) for x in (q, k, v))
    return _run_forward(_FORWARD["infer"], q, k, v, g, tuple(patches))[0]
