"""No-scratch PRoPE forward with a flash-attention-shaped main loop (`_prope_fwd_merged`).

Same contract as the pre-pass forward `prope_triton._forward` (o in q's dtype, fp32
log2-sum-exp (B, h, N) as `_prope_fwd` stores it) but nothing else is allocated; per key tile
ONE QK^T dot over the full padded head dim DP and ONE PV dot into ONE accumulator, like the
pre-pass kernel `_prope_fwd`. Selected by `prope_triton.set_forward(infer="merged")`.

Math (reference.md section 3; q' = D^T q, k' = D^-1 k, v' = D^-1 v, o = D o'):
- Channel order. Dot products are invariant to a common permutation of q and k channels and o's
  channels follow v's, so the kernel works in a "merged" channel order: camera half first, in
  natural order, padded to DP/2 columns; then the RoPE half, per quarter (x, y) either natural
  (ORDER=0: a block then b block, each padded to Q8P = DP/8) or pair-interleaved (ORDER=1:
  a_0 b_0 a_1 b_1 ...). For d a power of two with ORDER=0 the merged order IS the natural order:
  K/V tiles are loaded as contiguous rows (16-byte vectors, cp.async-pipelined) and the RoPE
  partners are separated in registers by reshape/permute/split (no gathers). Otherwise (d = 48,
  or ORDER=1) q, k, v are loaded and o stored through a column map (a gather / scatter).
- RoPE half: each K and V tile is rotated in registers (fp32, rounded once to 16 bits like the
  pre-pass's k', v') with cos/sin of its tokens from small (2, PMAX, d/8) tables; the camera half
  passes through untouched (raw k, v).
- Camera half on one accumulator, in the frame of the current key camera c: for keys of camera
  c, q'.k' = (P_c^-T P_a^T q).k, so the query tile is rebuilt once per key camera with the
  per-token matrix Mq[a, c] = P_c^-T P_a^T (a = the query token's camera, at most 2 per block);
  acc's camera half holds P_c sum_j p_j v'_j, so raw v of camera c adds in directly, and at the
  switch c -> c+1 it is multiplied by Msw[c] = P_{c+1} P_c^-1 (tf32x3 for 16-bit inputs: fp32
  accurate; ieee for fp32), and at the end by Mend[a] = P_a P_last^-1 per query token (that one
  feeds the 16-bit rounding of o: tf32 like the pre-pass's output transform). All these 4x4
  products are formed on the host in float64 from `g.mats`.
- Key loops per camera (blocks start at the camera's first token; a masked tail block when BN
  does not divide the tokens per view).
- d = 48 (d/8 = 6): padded column map (each a / b block of 6 padded to 8, camera half of 24 to
  32); pads read a real column (aligned 4-byte pairs, so cp.async still applies) and are made
  harmless by the math (see `_cols`).

SASS of the full-tile main loop (sm_90a, Triton 3.6 / ptxas, bf16, d = 64; per thread, per
tile), against `_prope_fwd` (TMA=False) at its H100 config 128x64, 4 warps, 4 stages:
  prepass 128x64/4w/4s: 539 instr, 16 HGMMA.64x64x16 (QK 8 + PV 8), 3 WARPGROUP, 2 BAR, 8 LDGSTS
  merged  128x64/4w/4s: 766 instr, 16 HGMMA.64x64x16, 4 WARPGROUP, 4 BAR, 12 LDGSTS, 29 LDS,
                        16 STS (rotated K/V back to shared memory), no spills in the loop
  merged  256x64/8w/3s: 614 instr for twice the query rows (9.6 instr-threads per (q, k) pair
                        against the prepass's 8.4, 128x64/4w's 12.0)
The extra work per tile is the K/V round trip shared -> registers -> rotate -> shared (two
more barriers) and the cos/sin loads; per query row it shrinks with BM.
H100 (launch/results/profile_kernels_h100_2026-11-24.md, sweeps beside it): 231 TFLOP/s at
d = 64 (256x64, 8 warps, 3 stages; 128-row configs 110-116), 135 at d = 48, 225 at d = 128,
against the pre-pass forward's 389 / 293 / 349; its peak memory is plain attention's.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.prope_triton import LOG2E, _Geometry, _padded, _precisions, _with_fallback

__all__ = ["forward_merged", "SWEEP_CONFIGS", "merged_order"]


@triton.jit
def _mix_one(x, mat, HALF: tl.constexpr, DH: tl.constexpr, XPREC: tl.constexpr):
    """x (BT, DH) fp32 -> every 4-chunk of columns [0, HALF) times the one 4x4 matrix at mat
    (out_i = sum_j M[i, j] x_j), as a dot with blockdiag(M^T); columns >= HALF become 0."""
    ri = tl.arange(0, DH)[:, None]
    c = tl.arange(0, DH)[None, :]
    blk = ((ri // 4) == (c // 4)) & (c < HALF)
    g = tl.load(mat + (c % 4) * 4 + (ri % 4), mask=blk, other=0.0)
    return tl.dot(x, g, input_precision=XPREC)


@triton.jit
def _rot(a, b, cs, sn, INV: tl.constexpr):
    """RoPE on pairs: forward [a cos + b sin, -a sin + b cos], inverse [a cos - b sin,
    a sin + b cos]."""
    if INV:
        return a * cs - b * sn, a * sn + b * cs
    return a * cs + b * sn, b * cs - a * sn


# ----------------------------------------------------------------------------------------------
# register-tile helpers (tiles are (BT, DP) in merged order unless said otherwise)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _halves(x, BT: tl.constexpr, DP: tl.constexpr):
    """(BT, DP) -> camera half, RoPE half, each (BT, DP/2)."""
    return tl.split(tl.permute(tl.reshape(x, (BT, 2, DP // 2)), (0, 2, 1)))


@triton.jit
def _unhalves(xc, xr, BT: tl.constexpr, DP: tl.constexpr):
    return tl.reshape(tl.permute(tl.join(xc, xr), (0, 2, 1)), (BT, DP))


@triton.jit
def _pairs(xr, BT: tl.constexpr, DP: tl.constexpr, Q8P: tl.constexpr, ORDER: tl.constexpr):
    """RoPE half (BT, DP/2) in ORDER -> partners a, b (BT, DP/4), pair m = xy * Q8P + f."""
    if ORDER == 1:
        a, b = tl.split(tl.reshape(xr, (BT, DP // 4, 2)))
    else:
        a, b = tl.split(tl.reshape(tl.permute(tl.reshape(xr, (BT, 2, 2, Q8P)), (0, 1, 3, 2)),
                                   (BT, DP // 4, 2)))
    return a, b


@triton.jit
def _unpairs(a, b, BT: tl.constexpr, DP: tl.constexpr, Q8P: tl.constexpr, ORDER: tl.constexpr):
    j = tl.join(a, b)
    if ORDER == 1:
        r = tl.reshape(j, (BT, DP // 2))
    else:
        r = tl.reshape(tl.permute(tl.reshape(j, (BT, 2, Q8P, 2)), (0, 1, 3, 2)), (BT, DP // 2))
    return r


@triton.jit
def _cossin(t, ok, CS, SN, PW, PMAX, Q8: tl.constexpr, Q8P: tl.constexpr, DP: tl.constexpr):
    """cos / sin (BT, DP/4) of pair m = xy * Q8P + f of tokens-in-view t (0 on padding)."""
    m = tl.arange(0, DP // 4)[None, :]
    xy = m // Q8P
    f = m % Q8P
    pos = tl.where(xy == 0, (t % PW)[:, None], (t // PW)[:, None])
    idx = xy * (PMAX * Q8) + pos * Q8 + f
    msk = ok[:, None] & (f < Q8)
    return tl.load(CS + idx, mask=msk, other=0.0), tl.load(SN + idx, mask=msk, other=0.0)


@triton.jit
def _rotate(x, cs, sn, BT: tl.constexpr, DP: tl.constexpr, Q8P: tl.constexpr,
            IN_ORDER: tl.constexpr, OUT_ORDER: tl.constexpr, INV: tl.constexpr):
    """RoPE half of x (any dtype) rotated in fp32, camera half passed through; result in x's
    dtype, RoPE half in OUT_ORDER."""
    xc, xr = _halves(x, BT, DP)
    a, b = _pairs(xr.to(tl.float32), BT, DP, Q8P, IN_ORDER)
    a, b = _rot(a, b, cs, sn, INV)
    return _unhalves(xc, _unpairs(a, b, BT, DP, Q8P, OUT_ORDER).to(x.dtype), BT, DP)


@triton.jit
def _cols(D: tl.constexpr, DP: tl.constexpr, Q8: tl.constexpr, Q8P: tl.constexpr,
          ORDER: tl.constexpr):
    """(1, DP) memory column of each merged-order column, and whether it is a real one."""
    p = tl.arange(0, DP)[None, :]
    H2: tl.constexpr = DP // 2
    r = tl.maximum(p - H2, 0)
    xy = r // (DP // 4)
    s = r % (DP // 4)
    if ORDER == 1:
        f = s // 2
        ab = s % 2
    else:
        ab = s // Q8P
        f = s % Q8P
    valid = tl.where(p < H2, p < D // 2, f < Q8)
    # Padding columns read a real column instead (finite data, so no column mask on k, v):
    # RoPE pads are zeroed by the rotation (cos = sin = 0 there), camera pads meet zero q
    # columns and zero rows of the frame-change matrices. With D/8 even, columns come in
    # aligned pairs (4-byte cp.async).
    col = tl.where(p < H2, tl.where(p < D // 2, p, p - (H2 - D // 2)),
                   D // 2 + xy * (D // 4) + ab * Q8 + tl.where(f < Q8, f, f - (Q8P - Q8)))
    if ORDER == 0 and Q8 % 2 == 0:
        col = tl.max_contiguous(tl.multiple_of(col, [1, 2]), [1, 2])
    return col, valid


@triton.jit
def _mix_cam(x, cam, ok, mat, stride_a, HALF: tl.constexpr, BT: tl.constexpr,
             DP: tl.constexpr, PREC: tl.constexpr):
    """Camera half of x (BT, DP) fp32: row r's 4-chunks times the 4x4 at mat + cam[r] * stride_a
    (out_i = sum_j M[i, j] x_j); RoPE half unchanged. Dots over DP/2 columns (DP when DP/2 < 16,
    a dot's minimum)."""
    lo = tl.min(tl.where(ok, cam, 2147483647), 0)
    hi = tl.max(tl.where(ok, cam, -1), 0)
    if DP >= 32:
        xc, xr = _halves(x, BT, DP)
        y = tl.zeros_like(xc)
        for cc in range(lo, hi + 1):
            y += tl.where((cam == cc)[:, None], _mix_one(xc, mat + cc * stride_a, HALF, DP // 2,
                                                         PREC), 0.0)
        out = _unhalves(y, xr, BT, DP)
    else:
        c = tl.arange(0, DP)[None, :]
        out = tl.where(c >= DP // 2, x, 0.0)
        for cc in range(lo, hi + 1):
            out += tl.where((cam == cc)[:, None], _mix_one(x, mat + cc * stride_a, HALF, DP,
                                                           PREC), 0.0)
    return out


@triton.jit
def _mix_one_cam(x, mat, HALF: tl.constexpr, BT: tl.constexpr, DP: tl.constexpr,
                 PREC: tl.constexpr):
    """Camera half of x (BT, DP) fp32 times the one 4x4 at mat; RoPE half unchanged."""
    if DP >= 32:
        xc, xr = _halves(x, BT, DP)
        out = _unhalves(_mix_one(xc, mat, HALF, DP // 2, PREC), xr, BT, DP)
    else:
        c = tl.arange(0, DP)[None, :]
        out = tl.where(c >= DP // 2, x, 0.0) + _mix_one(x, mat, HALF, DP, PREC)
    return out


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _merged_keys(acc, l_i, m_i, q, k_base, v_base, s_kn, lo, hi, kend, t0, kcol, kvalid,
                 CS, SN, PW, PMAX, qk_scale, Q8: tl.constexpr, Q8P: tl.constexpr,
                 DP: tl.constexpr, BN: tl.constexpr, ORDER: tl.constexpr,
                 GATHER: tl.constexpr, MASK: tl.constexpr, MPREC: tl.constexpr):
    """Key blocks [lo, hi) of one camera (keys < kend valid; token-in-view of key lo is t0):
    k, v rotated per tile in registers (camera half raw), then the standard online-softmax step
    with one QK^T dot and one PV dot."""
    IN_ORDER: tl.constexpr = ORDER if GATHER else 0
    for start in range(lo, hi, BN):
        key = start + tl.arange(0, BN)
        kok = key < kend
        k64 = key.to(tl.int64)[:, None] * s_kn
        kmask = kok[:, None] & (kcol >= 0)
        if MASK:
            k = tl.load(k_base + k64 + kcol, mask=kmask, other=0.0)
        else:
            k = tl.load(k_base + k64 + kcol)
        cs, sn = _cossin(key - lo + t0, kok, CS, SN, PW, PMAX, Q8, Q8P, DP)
        k = _rotate(k, cs, sn, BN, DP, Q8P, IN_ORDER, ORDER, False)
        s = tl.dot(q, tl.trans(k), input_precision=MPREC)
        if MASK:
            s = tl.where(kok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_base + k64 + kcol, mask=kmask, other=0.0)
        else:
            v = tl.load(v_base + k64 + kcol)
        v = _rotate(v, cs, sn, BN, DP, Q8P, IN_ORDER, ORDER, False)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=MPREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prope_fwd_merged(Q, K, V, O, LSE, MQ, MSW, MEND, CS, SN,
                      s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_ob, s_oh, s_on,
                      NH, N, NV, NVIEW, PW, PMAX, qk_scale,
                      D: tl.constexpr, DP: tl.constexpr, Q8: tl.constexpr, Q8P: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, ORDER: tl.constexpr,
                      GATHER: tl.constexpr, MPREC: tl.constexpr, XPREC: tl.constexpr,
                      APREC: tl.constexpr):
    """o for one query block, no scratch (module docstring). MQ (B, V, V, 4, 4): P_c^-T P_a^T at
    [b, a, c]; MSW (B, V, 4, 4): P_{c+1} P_c^-1; MEND (B, V, 4, 4): P_a P_last^-1."""
    HALF: tl.constexpr = D // 2
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = tok < N
    t64 = tok.to(tl.int64)[:, None]
    qcam = tok // NV
    if GATHER:
        col, valid = _cols(D, DP, Q8, Q8P, ORDER)
    else:
        col = tl.arange(0, DP)[None, :]
        valid = col >= 0
    qmask = ok[:, None] & valid
    q_rows = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + t64 * s_qn
    qcs, qsn = _cossin(tok % NV, ok, CS, SN, PW, PMAX, Q8, Q8P, DP)
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    mq = MQ + b * (NVIEW * NVIEW * 16)
    msw = MSW + b * (NVIEW * 16)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    n_full = (NV // BN) * BN
    for cam in range(0, NVIEW):
        if cam > 0:   # acc's camera half to the frame of this camera
            acc = _mix_one_cam(acc, msw + (cam - 1) * 16, HALF, BM, DP, APREC)
        # query tile for this key camera: RoPE half rotated, camera half P_c^-T P_a^T q
        q = tl.load(q_rows + col, mask=qmask, other=0.0).to(tl.float32)
        q = _rotate(q, qcs, qsn, BM, DP, Q8P, ORDER, ORDER, False)
        q = _mix_cam(q, qcam, ok, mq + cam * 16, NVIEW * 16, HALF, BM, DP, XPREC)
        q = q.to(K.dtype.element_ty)
        lo = cam * NV
        acc, l_i, m_i = _merged_keys(
            acc, l_i, m_i, q, k_base, v_base, s_kn, lo, lo + n_full, lo + NV, 0, col, valid,
            CS, SN, PW, PMAX, qk_scale, Q8, Q8P, DP, BN, ORDER, GATHER, False, MPREC)
        if n_full < NV:
            acc, l_i, m_i = _merged_keys(
                acc, l_i, m_i, q, k_base, v_base, s_kn, lo + n_full, lo + n_full + BN, lo + NV,
                n_full, col, valid, CS, SN, PW, PMAX, qk_scale, Q8, Q8P, DP, BN, ORDER, GATHER,
                True, MPREC)
    tl.store(LSE + bh.to(tl.int64) * N + tok, m_i + tl.log2(l_i), mask=ok)
    o = acc * (1.0 / l_i)[:, None]
    o = _mix_cam(o, qcam, ok, MEND + b * (NVIEW * 16), 16, HALF, BM, DP, XPREC)
    o = _rotate(o, qcs, qsn, BM, DP, Q8P, ORDER, ORDER, True)
    tl.store(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + t64 * s_on + col,
             o.to(O.dtype.element_ty), mask=qmask)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
# (BM, BN, warps, stages) to time on the H100, per head dim d (48 runs padded to 64). Ranked by
# the main loop's SASS per (query, key) pair (sm_90a, Triton 3.6; see the module's notes):
# BM = 256 on 8 warps halves the per-key rotation work per query row.
SWEEP_CONFIGS = {
    64: [(256, 64, 8, 3), (256, 64, 8, 2), (256, 32, 8, 3), (128, 64, 4, 4),
         (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4)],
    48: [(256, 64, 8, 3), (256, 64, 8, 2), (128, 64, 4, 4), (128, 64, 8, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
}
# Defaults per padded head dim: prope_triton's config table (kind "merged"), with its
# set_config overrides and out-of-resources fallbacks.


def merged_order(d: int) -> tuple[int, bool]:
    """(ORDER, GATHER) used for head dim d: natural order and contiguous tiles for powers of
    two; d = 48 (d/8 = 6) through the padded column map (each a/b block padded to 8)."""
    return (0, False) if _padded(d) == d else (0, True)


def _frame_mats(mats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mq (B, V, V, 4, 4) [b, a, c] = P_c^-T P_a^T; Msw (B, V, 4, 4) [b, c] = P_{c+1} P_c^-1
    (identity for the last); Mend (B, V, 4, 4) [b, a] = P_a P_last^-1. float64, stored fp32."""
    pt_, pinv, p, pinvt = (m.double() for m in mats)
    mq = pinvt[:, None] @ pt_[:, :, None]
    msw = torch.eye(4, dtype=torch.float64, device=mats.device).repeat(*p.shape[:2], 1, 1)
    msw[:, :-1] = p[:, 1:] @ pinv[:, :-1]
    mend = p @ pinv[:, -1:]
    return tuple(m.float().contiguous() for m in (mq, msw, mend))


def forward_merged(q: Tensor, k: Tensor, v: Tensor, g: _Geometry, patches,
                   order: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(o, lse) like `prope_triton._forward`: o in q's dtype, lse fp32 (B, h, N)
    log2-sum-exp as `_prope_fwd` stores it. q, k, v (B, h, N, d) with unit last stride."""
    B, H, N, d = q.shape
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    dp = _padded(d)
    ordr, gather = merged_order(d)
    if order is not None:      # tests / experiments: force the interleaved order (a gather)
        ordr, gather = order, gather or order == 1
    mq, msw, mend = _frame_mats(g.mats)
    mprec, xprec = _precisions(q.dtype, not q.is_cuda)
    aprec = xprec if xprec == "ieee" else "tf32x3"

    def launch_with(c):
        launch = {} if not q.is_cuda else dict(num_warps=c.num_warps, num_stages=c.num_stages)
        _prope_fwd_merged[(triton.cdiv(N, c.block_m), B * H)](
            q, k, v, o, lse, mq, msw, mend, g.ct, g.st,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            o.stride(0), o.stride(1), o.stride(2), H, N, g.per_view, g.views, g.pw,
            g.pmax, LOG2E / math.sqrt(d), D=d, DP=dp, Q8=d // 8, Q8P=dp // 8, BM=c.block_m,
            BN=c.block_n, ORDER=ordr, GATHER=gather, MPREC=mprec, XPREC=xprec, APREC=aprec,
            **launch)
    _with_fallback("merged", q, launch_with)
    return o, lse
