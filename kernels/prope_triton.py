"""Fused PRoPE multi-view attention in Triton (forward and backward), beside `prope_ref.py`.

Math (reference.md section 3, names as in `prope_ref`): per token t of camera c,
    q' = D_t^T q,  k' = D_t^-1 k,  v' = D_t^-1 v,  o' = softmax(q' k'^T / sqrt(d)) v',  o = D_t o'
with D_t = blockdiag(I (x) P_c, R(x)^T, R(y)^T): channels [0, d/2) in 4-chunks through the camera
matrix, [d/2, d) rotated by the patch column / row (RoPE).

Design (why it is fast and lean):
- Query blocks and key blocks never straddle two cameras: each view's ph*pw tokens are cut into
  blocks of their own, the last one masked. So a (query block, key camera) pair has ONE camera
  pair (ci, cj), and the camera part folds into a single 4x4 matrix A = P_ci P_cj^-1
  (q'.k' = q^T P_ci P_cj^-1 k over the projective channels): per key camera the query tile is
  multiplied once by blockdiag(A) (a small tensor-core dot), keys stay raw. Values are
  accumulated raw per key camera and the accumulator is multiplied by blockdiag(A^T) at the end
  of that camera's blocks (linear, so it commutes with the online-softmax rescale); this also
  applies the output's P_ci. Nothing camera-dependent runs per key block.
- RoPE is per token: inputs are rotated as they are loaded (a second load of the partner
  channels, cos/sin from a (ph*pw, d1) table), outputs are rotated back in registers (the
  partner channels come from a 0/1 permutation dot in fp32-exact precision).
- Head dim d is split into two power-of-two column tiles, T0 = [0, d0) (all projective) and
  T1 = [d0, d) (the rest of the projective channels and all RoPE channels), so d = 48 runs as
  16 + 32 and wastes nothing on padding to 64 (d = 64: 32 + 32, d = 128: 64 + 64).
- Statistics: fp32 log2-sum-exp per row (B, h, N) saved for the backward; no transformed copy
  of q, k, v or o is ever written to memory. Extra memory over plain attention: the LSE, and in
  the backward the fp32 delta = rowsum(o * do) (equal to rowsum(o' * do')).
- Backward: dq kernel (also writes delta) then dk/dv kernel; each folds A the same way
  (dq: q'' = blockdiag(A) q, do'' likewise; dk/dv: k'' = A k, v'' = A v per query camera).
- The cost of aligned blocks: partial blocks at each view's end (1296 tokens: 3.6% of work at
  block 64, 8.6% at 128; 324 tokens: 18% at 64).

Supported: fp16/bf16/fp32 on CUDA; d with d0 = d - 2^floor(log2 d) (or d/2 for a power of two) a
power of two >= 16 (32, 48, 64, 80, 96, 128, 160, 192, 256); other d and float64 use the
reference. On CPU it runs under the Triton interpreter (fp32) when the process started with
TRITON_INTERPRET=1 (triton decides compiled vs interpreted when it is first imported), else it
uses the reference.
No gradient flows to the cameras (w2c, K).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kernels.prope_ref import check_prope_inputs, prope_attention_ref, prope_matrices, rope_tables

__all__ = ["prope_attention", "FusedConfig", "head_tiles", "supported", "interpreted", "set_config"]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _blockdiag(a_ptr, OFF: tl.constexpr, DT: tl.constexpr, HALF: tl.constexpr,
               TRANSPOSE: tl.constexpr):
    """(DT, DT) tile of the d x d matrix blockdiag(A, ..., A, I) at rows/cols OFF.. (A: 4x4 at
    a_ptr, row-major, on the projective channels < HALF; identity on the RoPE channels)."""
    r = OFF + tl.arange(0, DT)[:, None]
    c = OFF + tl.arange(0, DT)[None, :]
    inblk = ((r // 4) == (c // 4)) & (c < HALF)
    if TRANSPOSE:
        idx = (c % 4) * 4 + (r % 4)
    else:
        idx = (r % 4) * 4 + (c % 4)
    val = tl.load(a_ptr + idx, mask=inblk, other=0.0)
    return val + ((r == c) & (c >= HALF)).to(tl.float32)


@triton.jit
def _load_rot(base, tok, ok, stride_n, cos, ssin, PART, D0: tl.constexpr, D1: tl.constexpr,
              HALF: tl.constexpr):
    """Tile T1 of rows `tok`, RoPE-rotated forward (x * cos + partner(x) * ssin), fp32."""
    c1 = tl.arange(0, D1)
    part = tl.load(PART + c1)
    rows = base + tok[:, None].to(tl.int64) * stride_n
    x = tl.load(rows + (D0 + c1)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    xp = tl.load(rows + part[None, :], mask=ok[:, None] & ((D0 + c1) >= HALF)[None, :],
                 other=0.0).to(tl.float32)
    return x * cos + xp * ssin


@triton.jit
def _tables(COS, SSIN, pix, ok, D1: tl.constexpr):
    c1 = tl.arange(0, D1)
    off = pix[:, None] * D1 + c1[None, :]
    cos = tl.load(COS + off, mask=ok[:, None], other=0.0)
    ssin = tl.load(SSIN + off, mask=ok[:, None], other=0.0)
    return cos, ssin


@triton.jit
def _unrotate(x, cos, ssin, PART, D0: tl.constexpr, D1: tl.constexpr, XPREC: tl.constexpr):
    """Inverse RoPE of an fp32 T1 tile in registers: x * cos - partner(x) * ssin; the partner
    channels come from a 0/1 permutation dot (exact in fp32 / tf32x3)."""
    c1 = tl.arange(0, D1)
    part = tl.load(PART + c1)
    perm = ((D0 + c1)[:, None] == part[None, :]).to(tl.float32)
    xp = tl.dot(x, perm, input_precision=XPREC)
    return x * cos - xp * ssin


@triton.jit
def _prope_fwd(Q, K, V, O, LSE, A, COS, SSIN, PART,
               s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
               NH, NVIEW, NV, qk_scale,
               D0: tl.constexpr, D1: tl.constexpr, HALF: tl.constexpr, T1_PROJ: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, XPREC: tl.constexpr, MPREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    dt = Q.dtype.element_ty
    nqb = tl.cdiv(NV, BM)
    nkb = tl.cdiv(NV, BN)
    ci = pid // nqb
    pix_m = (pid % nqb) * BM + tl.arange(0, BM)
    row_ok = pix_m < NV
    tok_m = ci * NV + pix_m
    c0 = tl.arange(0, D0)
    c1 = tl.arange(0, D1)
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh

    cos_m, ssin_m = _tables(COS, SSIN, pix_m, row_ok, D1)
    q0 = tl.load(q_base + tok_m[:, None].to(tl.int64) * s_qn + c0[None, :], mask=row_ok[:, None],
                 other=0.0).to(tl.float32)
    q1 = _load_rot(q_base, tok_m, row_ok, s_qn, cos_m, ssin_m, PART, D0, D1, HALF)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    m_tot = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc0 = tl.zeros([BM, D0], tl.float32)
    acc1 = tl.zeros([BM, D1], tl.float32)
    cacc1 = tl.zeros([BM, D1], tl.float32)
    a_row = A + ((b * NVIEW + ci) * NVIEW).to(tl.int64) * 16
    for cj in range(0, NVIEW):
        a_ptr = a_row + cj * 16
        qq0 = tl.dot(q0, _blockdiag(a_ptr, 0, D0, HALF, False), input_precision=XPREC).to(dt)
        if T1_PROJ:
            qq1 = tl.dot(q1, _blockdiag(a_ptr, D0, D1, HALF, False), input_precision=XPREC).to(dt)
            cacc1 = tl.zeros([BM, D1], tl.float32)
        else:
            qq1 = q1.to(dt)
        cacc0 = tl.zeros([BM, D0], tl.float32)
        for n in range(0, nkb):
            pix_n = n * BN + tl.arange(0, BN)
            key_ok = pix_n < NV
            tok_n = cj * NV + pix_n
            cos_n, ssin_n = _tables(COS, SSIN, pix_n, key_ok, D1)
            k0 = tl.load(k_base + tok_n[:, None].to(tl.int64) * s_kn + c0[None, :],
                         mask=key_ok[:, None], other=0.0)
            k1 = _load_rot(k_base, tok_n, key_ok, s_kn, cos_n, ssin_n, PART, D0, D1, HALF).to(dt)
            s = tl.dot(qq0, tl.trans(k0), input_precision=MPREC)
            s = tl.dot(qq1, tl.trans(k1), s, input_precision=MPREC)
            s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v0 = tl.load(v_base + tok_n[:, None].to(tl.int64) * s_vn + c0[None, :],
                         mask=key_ok[:, None], other=0.0)
            v1 = _load_rot(v_base, tok_n, key_ok, s_vn, cos_n, ssin_n, PART, D0, D1, HALF).to(dt)
            pd = p.to(dt)
            cacc0 = tl.dot(pd, v0, cacc0 * alpha[:, None], input_precision=MPREC)
            if T1_PROJ:
                cacc1 = tl.dot(pd, v1, cacc1 * alpha[:, None], input_precision=MPREC)
            else:
                acc1 = tl.dot(pd, v1, acc1 * alpha[:, None], input_precision=MPREC)
            m_i = m_new
        # End of key camera cj: v' = P_cj^-1 v and o = P_ci o' fold into blockdiag(A^T).
        rescale = tl.exp2(m_tot - m_i)[:, None]
        acc0 = acc0 * rescale + tl.dot(cacc0, _blockdiag(a_ptr, 0, D0, HALF, True),
                                       input_precision=XPREC)
        if T1_PROJ:
            acc1 = acc1 * rescale + tl.dot(cacc1, _blockdiag(a_ptr, D0, D1, HALF, True),
                                           input_precision=XPREC)
        m_tot = m_i

    inv_l = 1.0 / l_i[:, None]
    o0 = acc0 * inv_l
    o1 = _unrotate(acc1 * inv_l, cos_m, ssin_m, PART, D0, D1, XPREC)
    o_rows = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + tok_m[:, None].to(tl.int64) * s_on
    tl.store(o_rows + c0[None, :], o0.to(dt), mask=row_ok[:, None])
    tl.store(o_rows + (D0 + c1)[None, :], o1.to(dt), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * (NVIEW * NV) + tok_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _prope_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, A, COS, SSIN, PART,
                  s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  s_ob, s_oh, s_on, s_db, s_dh, s_dn,
                  NH, NVIEW, NV, qk_scale, sm_scale,
                  D0: tl.constexpr, D1: tl.constexpr, HALF: tl.constexpr, T1_PROJ: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, XPREC: tl.constexpr, MPREC: tl.constexpr):
    """dq for one query block (grid like the forward); also writes delta = rowsum(o * do).
    DQ has Q's strides."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    dt = Q.dtype.element_ty
    nqb = tl.cdiv(NV, BM)
    nkb = tl.cdiv(NV, BN)
    ci = pid // nqb
    pix_m = (pid % nqb) * BM + tl.arange(0, BM)
    row_ok = pix_m < NV
    tok_m = ci * NV + pix_m
    tok64 = tok_m[:, None].to(tl.int64)
    c0 = tl.arange(0, D0)
    c1 = tl.arange(0, D1)
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    o_rows = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + tok64 * s_on
    do_base = DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh
    do_rows = do_base + tok64 * s_dn

    cos_m, ssin_m = _tables(COS, SSIN, pix_m, row_ok, D1)
    q0 = tl.load(q_base + tok64 * s_qn + c0[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1 = _load_rot(q_base, tok_m, row_ok, s_qn, cos_m, ssin_m, PART, D0, D1, HALF)
    do0 = tl.load(do_rows + c0[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    do1_raw = tl.load(do_rows + (D0 + c1)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    o0 = tl.load(o_rows + c0[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    o1 = tl.load(o_rows + (D0 + c1)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o0 * do0, 1) + tl.sum(o1 * do1_raw, 1)
    stat = bh.to(tl.int64) * (NVIEW * NV) + tok_m
    tl.store(DELTA + stat, delta, mask=row_ok)
    lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
    do1 = _load_rot(do_base, tok_m, row_ok, s_dn, cos_m, ssin_m, PART, D0, D1, HALF)

    dq0 = tl.zeros([BM, D0], tl.float32)
    dq1 = tl.zeros([BM, D1], tl.float32)
    cdq1 = tl.zeros([BM, D1], tl.float32)
    a_row = A + ((b * NVIEW + ci) * NVIEW).to(tl.int64) * 16
    for cj in range(0, NVIEW):
        a_ptr = a_row + cj * 16
        g0 = _blockdiag(a_ptr, 0, D0, HALF, False)
        qq0 = tl.dot(q0, g0, input_precision=XPREC).to(dt)
        dd0 = tl.dot(do0, g0, input_precision=XPREC).to(dt)
        if T1_PROJ:
            g1 = _blockdiag(a_ptr, D0, D1, HALF, False)
            qq1 = tl.dot(q1, g1, input_precision=XPREC).to(dt)
            dd1 = tl.dot(do1, g1, input_precision=XPREC).to(dt)
            cdq1 = tl.zeros([BM, D1], tl.float32)
        else:
            qq1 = q1.to(dt)
            dd1 = do1.to(dt)
        cdq0 = tl.zeros([BM, D0], tl.float32)
        for n in range(0, nkb):
            pix_n = n * BN + tl.arange(0, BN)
            key_ok = pix_n < NV
            tok_n = cj * NV + pix_n
            cos_n, ssin_n = _tables(COS, SSIN, pix_n, key_ok, D1)
            k0 = tl.load(k_base + tok_n[:, None].to(tl.int64) * s_kn + c0[None, :],
                         mask=key_ok[:, None], other=0.0)
            k1 = _load_rot(k_base, tok_n, key_ok, s_kn, cos_n, ssin_n, PART, D0, D1, HALF).to(dt)
            v0 = tl.load(v_base + tok_n[:, None].to(tl.int64) * s_vn + c0[None, :],
                         mask=key_ok[:, None], other=0.0)
            v1 = _load_rot(v_base, tok_n, key_ok, s_vn, cos_n, ssin_n, PART, D0, D1, HALF).to(dt)
            s = tl.dot(qq0, tl.trans(k0), input_precision=MPREC)
            s = tl.dot(qq1, tl.trans(k1), s, input_precision=MPREC)
            p = tl.exp2(s * qk_scale - lse[:, None])
            p = tl.where(key_ok[None, :], p, 0.0)
            dp = tl.dot(dd0, tl.trans(v0), input_precision=MPREC)
            dp = tl.dot(dd1, tl.trans(v1), dp, input_precision=MPREC)
            ds = (p * (dp - delta[:, None])).to(dt)
            cdq0 = tl.dot(ds, k0, cdq0, input_precision=MPREC)
            if T1_PROJ:
                cdq1 = tl.dot(ds, k1, cdq1, input_precision=MPREC)
            else:
                dq1 = tl.dot(ds, k1, dq1, input_precision=MPREC)
        # dq = P_ci dq', dq' = P_cj^-1 (ds k): blockdiag(A^T) in row form.
        dq0 += tl.dot(cdq0, _blockdiag(a_ptr, 0, D0, HALF, True), input_precision=XPREC)
        if T1_PROJ:
            dq1 += tl.dot(cdq1, _blockdiag(a_ptr, D0, D1, HALF, True), input_precision=XPREC)

    dq0 = dq0 * sm_scale
    dq1 = _unrotate(dq1 * sm_scale, cos_m, ssin_m, PART, D0, D1, XPREC)
    dq_rows = DQ + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + tok64 * s_qn
    tl.store(dq_rows + c0[None, :], dq0.to(dt), mask=row_ok[:, None])
    tl.store(dq_rows + (D0 + c1)[None, :], dq1.to(dt), mask=row_ok[:, None])


@triton.jit
def _prope_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, A, COS, SSIN, PART,
                    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
                    NH, NVIEW, NV, qk_scale, sm_scale,
                    D0: tl.constexpr, D1: tl.constexpr, HALF: tl.constexpr,
                    T1_PROJ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    XPREC: tl.constexpr, MPREC: tl.constexpr):
    """dk, dv for one key block (BN keys of one camera); loops over all query blocks.
    DK has K's strides, DV has V's."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    dt = Q.dtype.element_ty
    nqb = tl.cdiv(NV, BM)
    nkb = tl.cdiv(NV, BN)
    cj = pid // nkb
    pix_n = (pid % nkb) * BN + tl.arange(0, BN)
    key_ok = pix_n < NV
    tok_n = cj * NV + pix_n
    tokn64 = tok_n[:, None].to(tl.int64)
    c0 = tl.arange(0, D0)
    c1 = tl.arange(0, D1)
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    do_base = DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh

    cos_n, ssin_n = _tables(COS, SSIN, pix_n, key_ok, D1)
    k0 = tl.load(k_base + tokn64 * s_kn + c0[None, :], mask=key_ok[:, None], other=0.0).to(tl.float32)
    k1 = _load_rot(k_base, tok_n, key_ok, s_kn, cos_n, ssin_n, PART, D0, D1, HALF)
    v0 = tl.load(v_base + tokn64 * s_vn + c0[None, :], mask=key_ok[:, None], other=0.0).to(tl.float32)
    v1 = _load_rot(v_base, tok_n, key_ok, s_vn, cos_n, ssin_n, PART, D0, D1, HALF)

    dk0 = tl.zeros([BN, D0], tl.float32)
    dk1 = tl.zeros([BN, D1], tl.float32)
    dv0 = tl.zeros([BN, D0], tl.float32)
    dv1 = tl.zeros([BN, D1], tl.float32)
    cdk1 = tl.zeros([BN, D1], tl.float32)
    cdv1 = tl.zeros([BN, D1], tl.float32)
    stat_base = bh.to(tl.int64) * (NVIEW * NV)
    for ci in range(0, NVIEW):
        a_ptr = A + ((b * NVIEW + ci) * NVIEW + cj).to(tl.int64) * 16
        gt0 = _blockdiag(a_ptr, 0, D0, HALF, True)
        kk0 = tl.dot(k0, gt0, input_precision=XPREC).to(dt)
        vv0 = tl.dot(v0, gt0, input_precision=XPREC).to(dt)
        if T1_PROJ:
            gt1 = _blockdiag(a_ptr, D0, D1, HALF, True)
            kk1 = tl.dot(k1, gt1, input_precision=XPREC).to(dt)
            vv1 = tl.dot(v1, gt1, input_precision=XPREC).to(dt)
            cdk1 = tl.zeros([BN, D1], tl.float32)
            cdv1 = tl.zeros([BN, D1], tl.float32)
        else:
            kk1 = k1.to(dt)
            vv1 = v1.to(dt)
        cdk0 = tl.zeros([BN, D0], tl.float32)
        cdv0 = tl.zeros([BN, D0], tl.float32)
        for mb in range(0, nqb):
            pix_m = mb * BM + tl.arange(0, BM)
            row_ok = pix_m < NV
            tok_m = ci * NV + pix_m
            tokm64 = tok_m[:, None].to(tl.int64)
            cos_m, ssin_m = _tables(COS, SSIN, pix_m, row_ok, D1)
            q0 = tl.load(q_base + tokm64 * s_qn + c0[None, :], mask=row_ok[:, None], other=0.0)
            q1 = _load_rot(q_base, tok_m, row_ok, s_qn, cos_m, ssin_m, PART, D0, D1, HALF).to(dt)
            do0 = tl.load(do_base + tokm64 * s_dn + c0[None, :], mask=row_ok[:, None], other=0.0)
            do1 = _load_rot(do_base, tok_m, row_ok, s_dn, cos_m, ssin_m, PART, D0, D1, HALF).to(dt)
            lse = tl.load(LSE + stat_base + tok_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stat_base + tok_m, mask=row_ok, other=0.0)
            st = tl.dot(kk0, tl.trans(q0), input_precision=MPREC)
            st = tl.dot(kk1, tl.trans(q1), st, input_precision=MPREC)
            pt = tl.exp2(st * qk_scale - lse[None, :])
            ptd = pt.to(dt)
            cdv0 = tl.dot(ptd, do0, cdv0, input_precision=MPREC)
            if T1_PROJ:
                cdv1 = tl.dot(ptd, do1, cdv1, input_precision=MPREC)
            else:
                dv1 = tl.dot(ptd, do1, dv1, input_precision=MPREC)
            dpt = tl.dot(vv0, tl.trans(do0), input_precision=MPREC)
            dpt = tl.dot(vv1, tl.trans(do1), dpt, input_precision=MPREC)
            dst = (pt * (dpt - delta[None, :])).to(dt)
            cdk0 = tl.dot(dst, q0, cdk0, input_precision=MPREC)
            if T1_PROJ:
                cdk1 = tl.dot(dst, q1, cdk1, input_precision=MPREC)
            else:
                dk1 = tl.dot(dst, q1, dk1, input_precision=MPREC)
        # dk = P_cj^-T dk', dk' = P_ci^T (ds^T q): blockdiag(A) in row form; dv likewise.
        g0 = _blockdiag(a_ptr, 0, D0, HALF, False)
        dk0 += tl.dot(cdk0, g0, input_precision=XPREC)
        dv0 += tl.dot(cdv0, g0, input_precision=XPREC)
        if T1_PROJ:
            g1 = _blockdiag(a_ptr, D0, D1, HALF, False)
            dk1 += tl.dot(cdk1, g1, input_precision=XPREC)
            dv1 += tl.dot(cdv1, g1, input_precision=XPREC)

    dk0 = dk0 * sm_scale
    dk1 = _unrotate(dk1 * sm_scale, cos_n, ssin_n, PART, D0, D1, XPREC)
    dv1 = _unrotate(dv1, cos_n, ssin_n, PART, D0, D1, XPREC)
    dk_rows = DK + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + tokn64 * s_kn
    dv_rows = DV + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + tokn64 * s_vn
    tl.store(dk_rows + c0[None, :], dk0.to(dt), mask=key_ok[:, None])
    tl.store(dk_rows + (D0 + c1)[None, :], dk1.to(dt), mask=key_ok[:, None])
    tl.store(dv_rows + c0[None, :], dv0.to(dt), mask=key_ok[:, None])
    tl.store(dv_rows + (D0 + c1)[None, :], dv1.to(dt), mask=key_ok[:, None])


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedConfig:
    """Block sizes and launch settings of one kernel."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Chosen from the H100 sweep in launch/profile_kernels.py (results in launch/results/).
_DEFAULTS = {
    "fwd": {48: FusedConfig(64, 64, 4, 2), 64: FusedConfig(64, 64, 4, 2),
            128: FusedConfig(64, 64, 4, 2)},
    "dq": {48: FusedConfig(64, 64, 4, 2), 64: FusedConfig(64, 64, 4, 2),
           128: FusedConfig(64, 64, 4, 2)},
    "dkdv": {48: FusedConfig(64, 64, 4, 2), 64: FusedConfig(64, 64, 4, 2),
             128: FusedConfig(64, 64, 4, 2)},
}
_overrides: dict = {}
# Precision of the small transform dots (fp32 operands): tf32x3 is fp32-accurate on tensor cores.
TRANSFORM_PRECISION = os.environ.get("GLD_PROPE_XPREC", "tf32x3")


def set_config(kind: str, d: int, cfg: Optional[FusedConfig]) -> None:
    """Override the launch config of one kernel ("fwd", "dq", "dkdv") for head dim d (benchmarks)."""
    if cfg is None:
        _overrides.pop((kind, d), None)
    else:
        _overrides[(kind, d)] = cfg


def _config(kind: str, d: int, interpret: bool) -> FusedConfig:
    if interpret:
        return FusedConfig(16, 16, 1, 1)
    if (kind, d) in _overrides:
        return _overrides[(kind, d)]
    table = _DEFAULTS[kind]
    return table.get(d, table[128 if d > 64 else 64])


def head_tiles(d: int) -> Optional[tuple[int, int]]:
    """(d0, d1) column tiles of head dim d, or None when the fused kernel does not support d."""
    if d % 8 or d < 32:
        return None
    d1 = d // 2 if d & (d - 1) == 0 else 1 << (d.bit_length() - 1)
    d0 = d - d1
    if d0 < 16 or d0 & (d0 - 1):
        return None
    return d0, d1


def supported(q: Tensor) -> bool:
    """Whether `prope_attention` runs the fused kernel for q (else it uses the reference)."""
    if head_tiles(q.shape[-1]) is None or q.dtype not in (torch.float16, torch.bfloat16,
                                                           torch.float32):
        return False
    if q.is_cuda:
        return not interpreted()
    return q.device.type == "cpu" and interpreted() and q.dtype == torch.float32


def interpreted() -> bool:
    """True when this module's kernels are Triton-interpreter functions (TRITON_INTERPRET=1 was
    set before triton was first imported in this process): then they run on CPU tensors."""
    return not isinstance(_prope_fwd, JITFunction)


@dataclass
class _Geometry:
    A: Tensor        # (B, V, V, 4, 4) fp32, A[b, i, j] = P_i P_j^-1
    cos: Tensor      # (ph*pw, d1) fp32 cos of each T1 channel's angle (1 on projective channels)
    ssin: Tensor     # (ph*pw, d1) fp32 signed sin: x' = x cos + partner(x) ssin (0 on projective)
    part: Tensor     # (d1,) int32 absolute channel index of each T1 channel's RoPE partner
    views: int
    per_view: int
    d0: int
    d1: int


def _geometry(w2c: Tensor, K: Tensor, patches, image_size, d: int, device) -> _Geometry:
    with torch.no_grad():
        d0, d1 = head_tiles(d)
        P, P_inv = prope_matrices(w2c.detach(), K.detach(), image_size, torch.float32)
        A = (P[:, :, None] @ P_inv[:, None, :]).contiguous()
        cx, sx, cy, sy = rope_tables(patches, d, torch.float32, device)
        nv, nf = cx.shape
        cos = torch.ones(nv, d, dtype=torch.float32, device=device)
        ssin = torch.zeros(nv, d, dtype=torch.float32, device=device)
        part = torch.arange(d, dtype=torch.int32, device=device)
        for start, c, s in ((d // 2, cx, sx), (3 * d // 4, cy, sy)):
            a, bb = slice(start, start + nf), slice(start + nf, start + 2 * nf)
            cos[:, a], cos[:, bb] = c, c
            ssin[:, a], ssin[:, bb] = s, -s        # [a cos + b sin, -a sin + b cos]
            part[a] = torch.arange(start + nf, start + 2 * nf, dtype=torch.int32, device=device)
            part[bb] = torch.arange(start, start + nf, dtype=torch.int32, device=device)
    return _Geometry(A.to(device), cos[:, d0:].contiguous(), ssin[:, d0:].contiguous(),
                     part[d0:].contiguous(), w2c.shape[1], nv, d0, d1)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dense(x: Tensor) -> Tensor:
    """x itself when its last dim is contiguous and empty_like keeps its strides (contiguous, or a
    permuted view such as (B, N, h, d).transpose(1, 2)): the backward then writes dq/dk/dv with
    q/k/v's strides. Otherwise a contiguous copy."""
    if x.stride(-1) == 1 and torch.empty_like(x, device="meta").stride() == x.stride():
        return x
    return x.contiguous()


def _precisions(dtype: torch.dtype, interpret: bool) -> tuple[str, str]:
    if interpret:
        return "ieee", "ieee"
    return TRANSFORM_PRECISION, ("ieee" if dtype == torch.float32 else "tf32")


def _common(q: Tensor, g: _Geometry, kind: str):
    B, H, N, d = q.shape
    interpret = not q.is_cuda
    cfg = _config(kind, d, interpret)
    xprec, mprec = _precisions(q.dtype, interpret)
    meta = dict(D0=g.d0, D1=g.d1, HALF=d // 2, T1_PROJ=g.d0 < d // 2, XPREC=xprec, MPREC=mprec,
                BM=cfg.block_m, BN=cfg.block_n)
    launch = {} if interpret else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return cfg, meta, launch


def _forward(q: Tensor, k: Tensor, v: Tensor, g: _Geometry) -> tuple[Tensor, Tensor]:
    B, H, N, d = q.shape
    cfg, meta, launch = _common(q, g, "fwd")
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    grid = (g.views * triton.cdiv(g.per_view, cfg.block_m), B * H)
    _prope_fwd[grid](
        q, k, v, o, lse, g.A, g.cos, g.ssin, g.part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, g.views, g.per_view, (1.0 / math.sqrt(d)) * 1.4426950408889634, **meta, **launch)
    return o, lse


def _launch_dq(q, k, v, o, lse, do, dq, delta, g: _Geometry) -> None:
    B, H, N, d = q.shape
    sm_scale = 1.0 / math.sqrt(d)
    cfg, meta, launch = _common(q, g, "dq")
    _prope_bwd_dq[(g.views * triton.cdiv(g.per_view, cfg.block_m), B * H)](
        q, k, v, o, do, dq, lse, delta, g.A, g.cos, g.ssin, g.part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, g.views, g.per_view, sm_scale * 1.4426950408889634, sm_scale, **meta, **launch)


def _launch_dkdv(q, k, v, lse, do, delta, dk, dv, g: _Geometry) -> None:
    B, H, N, d = q.shape
    sm_scale = 1.0 / math.sqrt(d)
    cfg, meta, launch = _common(q, g, "dkdv")
    _prope_bwd_dkdv[(g.views * triton.cdiv(g.per_view, cfg.block_n), B * H)](
        q, k, v, do, dk, dv, lse, delta, g.A, g.cos, g.ssin, g.part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, g.views, g.per_view, sm_scale * 1.4426950408889634, sm_scale, **meta, **launch)


def _backward(q, k, v, o, lse, do, g: _Geometry):
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # The kernels index dq/dk/dv with q/k/v's strides (last dims are contiguous here).
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()
    delta = torch.empty_like(lse)
    _launch_dq(q, k, v, o, lse, do, dq, delta, g)       # also writes delta
    _launch_dkdv(q, k, v, lse, do, delta, dk, dv, g)
    return dq, dk, dv


class _PRoPEAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g: _Geometry):
        q, k, v = (_dense(x) for x in (q, k, v))
        o, lse = _forward(q, k, v, g)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geometry = g
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _last_dim_contiguous(do), ctx.geometry)
        return dq, dk, dv, None


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
    return _PRoPEAttention.apply(q, k, v, g)
