"""Fused PRoPE multi-view attention in Triton (forward and backward), beside `prope_ref.py`.

Math (reference.md section 3, names as in `prope_ref`): per token t of camera c,
    q' = D_t^T q,  k' = D_t^-1 k,  v' = D_t^-1 v,  o' = softmax(q' k'^T / sqrt(d)) v',  o = D_t o'
with D_t = blockdiag(I (x) P_c, R(x)^T, R(y)^T): channels [0, d/2) in 4-chunks through the camera
matrix, [d/2, d) rotated by the patch column / row (RoPE).

Design:
- Query blocks and key blocks never straddle two cameras: each view's ph*pw tokens are cut into
  blocks of their own, the last one masked. So a (query block, key camera) pair has ONE camera
  pair (ci, cj), and the camera part folds into a single 4x4 matrix A = P_ci P_cj^-1
  (q'.k' = q^T P_ci P_cj^-1 k over the projective channels): per key camera the query tile is
  multiplied once by blockdiag(A) (a small tensor-core dot), keys stay raw. Values are
  accumulated raw per key camera and the accumulator is multiplied by blockdiag(A^T) at the end
  of that camera's blocks (linear, so it commutes with the online-softmax rescale); this also
  applies the output's P_ci. Nothing camera-dependent runs per key block.
- RoPE is per token: the head dim is split into three power-of-two column tiles, T0 = [0, d0)
  (projective), TA = the RoPE a-halves and TB = their b-half partners (plus, when d/2 is not a
  power of two, half each of the remaining projective channels), so a and b of each pair sit at
  the same position of TA and TB: inputs are rotated as they are loaded and outputs rotated back
  in registers, elementwise, with cos/sin from a (ph*pw, d1/2) fp32 table. d = 48 runs as
  16 + 16 + 16 with no padding to 64 (d = 64: 32 + 16 + 16, d = 128: 64 + 32 + 32).
- Speed (H100, launch/results/profile_kernels_h100_2026-11-24.md): 110-190 TFLOP/s forward at
  N = 10368, slower than the unfused reference there (which runs cuDNN/flash SDPA), about 3x
  faster than it forward at 8 views of 18x18; far less memory than the reference everywhere.
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
def _blockdiag(a_ptr, DT: tl.constexpr, PSTART: tl.constexpr, TRANSPOSE: tl.constexpr):
    """(DT, DT) tile: blockdiag(A, ..., A) on the tile's projective columns (>= PSTART, 4-chunks),
    identity on its RoPE columns (< PSTART). A: 4x4 row-major at a_ptr (A^T if TRANSPOSE)."""
    r = tl.arange(0, DT)[:, None]
    c = tl.arange(0, DT)[None, :]
    inblk = ((r // 4) == (c // 4)) & (c >= PSTART)
    if TRANSPOSE:
        idx = (c % 4) * 4 + (r % 4)
    else:
        idx = (r % 4) * 4 + (c % 4)
    val = tl.load(a_ptr + idx, mask=inblk, other=0.0)
    return val + ((r == c) & (c < PSTART)).to(tl.float32)


@triton.jit
def _ab_cols(HALF: tl.constexpr, D0: tl.constexpr, H1: tl.constexpr, T1_PROJ: tl.constexpr):
    """Channels of tiles TA and TB: RoPE a-halves (x then y) / their b-half partners, then (when
    d/2 is not a power of two) one half each of the projective channels [D0, d/2)."""
    j = tl.arange(0, H1)
    H8: tl.constexpr = HALF // 4
    Q4: tl.constexpr = HALF // 2
    if T1_PROJ:
        ca = tl.where(j < H8, HALF + j, tl.where(j < Q4, HALF + Q4 + (j - H8), D0 + (j - Q4)))
        cb = tl.where(j < H8, HALF + H8 + j,
                      tl.where(j < Q4, HALF + Q4 + H8 + (j - H8), D0 + (HALF - D0) // 2 + (j - Q4)))
    else:
        ca = HALF + (j // H8) * Q4 + (j % H8)
        cb = ca + H8
    return ca, cb


@triton.jit
def _load_tile(rows, cols, ok):
    return tl.load(rows + cols[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _tables(COS, SIN, pix, ok, H1: tl.constexpr):
    off = pix[:, None] * H1 + tl.arange(0, H1)[None, :]
    return (tl.load(COS + off, mask=ok[:, None], other=0.0),
            tl.load(SIN + off, mask=ok[:, None], other=0.0))


@triton.jit
def _rot(a, b, c, s):
    """Forward RoPE (inputs): [a cos + b sin, -a sin + b cos], fp32."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    return a * c + b * s, b * c - a * s


@triton.jit
def _unrot(a, b, c, s):
    """Inverse RoPE (outputs): [a cos - b sin, a sin + b cos]."""
    return a * c - b * s, a * s + b * c


@triton.jit
def _prope_fwd(Q, K, V, O, LSE, A, COS, SIN,
               s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
               NH, NVIEW, NV, qk_scale,
               D0: tl.constexpr, H1: tl.constexpr, HALF: tl.constexpr, T1_PROJ: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, XPREC: tl.constexpr, MPREC: tl.constexpr):
    Q4: tl.constexpr = HALF // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    dt = Q.dtype.element_ty
    nqb = (NV + BM - 1) // BM
    nkb = (NV + BN - 1) // BN
    ci = pid // nqb
    pix_m = (pid % nqb) * BM + tl.arange(0, BM)
    row_ok = pix_m < NV
    tok_m = (ci * NV + pix_m).to(tl.int64)
    c0 = tl.arange(0, D0)
    ca, cb = _ab_cols(HALF, D0, H1, T1_PROJ)
    q_rows = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + tok_m[:, None] * s_qn
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh

    q0 = _load_tile(q_rows, c0, row_ok)
    cm, sm = _tables(COS, SIN, pix_m, row_ok, H1)
    qa, qb = _rot(_load_tile(q_rows, ca, row_ok), _load_tile(q_rows, cb, row_ok), cm, sm)
    qqa = qa.to(dt)   # exact on projective channels, rounded once on RoPE channels
    qqb = qb.to(dt)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    m_tot = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc0 = tl.zeros([BM, D0], tl.float32)
    acca = tl.zeros([BM, H1], tl.float32)
    accb = tl.zeros([BM, H1], tl.float32)
    cacca = tl.zeros([BM, H1], tl.float32)
    caccb = tl.zeros([BM, H1], tl.float32)
    a_row = A + ((b * NVIEW + ci) * NVIEW).to(tl.int64) * 16
    for cj in range(0, NVIEW):
        a_ptr = a_row + cj * 16
        # q'' = A^T q on the projective channels (A = P_ci P_cj^-1): keys stay raw.
        qq0 = tl.dot(q0.to(tl.float32), _blockdiag(a_ptr, D0, 0, False),
                     input_precision=XPREC).to(dt)
        if T1_PROJ:
            g1 = _blockdiag(a_ptr, H1, Q4, False)
            qqa = tl.dot(qa.to(dt).to(tl.float32), g1, input_precision=XPREC).to(dt)
            qqb = tl.dot(qb.to(dt).to(tl.float32), g1, input_precision=XPREC).to(dt)
            cacca = tl.zeros([BM, H1], tl.float32)
            caccb = tl.zeros([BM, H1], tl.float32)
        cacc0 = tl.zeros([BM, D0], tl.float32)
        for n in range(0, nkb):
            pix_n = n * BN + tl.arange(0, BN)
            key_ok = pix_n < NV
            tok_n = (cj * NV + pix_n).to(tl.int64)
            k_rows = k_base + tok_n[:, None] * s_kn
            v_rows = v_base + tok_n[:, None] * s_vn
            cn, sn = _tables(COS, SIN, pix_n, key_ok, H1)
            k0 = _load_tile(k_rows, c0, key_ok)
            ka, kb = _rot(_load_tile(k_rows, ca, key_ok), _load_tile(k_rows, cb, key_ok), cn, sn)
            s = tl.dot(qq0, tl.trans(k0), input_precision=MPREC)
            s = tl.dot(qqa, tl.trans(ka.to(dt)), s, input_precision=MPREC)
            s = tl.dot(qqb, tl.trans(kb.to(dt)), s, input_precision=MPREC)
            s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v0 = _load_tile(v_rows, c0, key_ok)
            va, vb = _rot(_load_tile(v_rows, ca, key_ok), _load_tile(v_rows, cb, key_ok), cn, sn)
            pd = p.to(dt)
            cacc0 = tl.dot(pd, v0, cacc0 * alpha[:, None], input_precision=MPREC)
            if T1_PROJ:
                cacca = tl.dot(pd, va.to(dt), cacca * alpha[:, None], input_precision=MPREC)
                caccb = tl.dot(pd, vb.to(dt), caccb * alpha[:, None], input_precision=MPREC)
            else:
                acca = tl.dot(pd, va.to(dt), acca * alpha[:, None], input_precision=MPREC)
                accb = tl.dot(pd, vb.to(dt), accb * alpha[:, None], input_precision=MPREC)
            m_i = m_new
        # End of key camera cj: v' = P_cj^-1 v and o = P_ci o' fold into blockdiag(A^T).
        rescale = tl.exp2(m_tot - m_i)[:, None]
        acc0 = acc0 * rescale + tl.dot(cacc0, _blockdiag(a_ptr, D0, 0, True),
                                       input_precision=XPREC)
        if T1_PROJ:
            h1 = _blockdiag(a_ptr, H1, Q4, True)
            acca = acca * rescale + tl.dot(cacca, h1, input_precision=XPREC)
            accb = accb * rescale + tl.dot(caccb, h1, input_precision=XPREC)
        m_tot = m_i

    inv_l = 1.0 / l_i[:, None]
    cm, sm = _tables(COS, SIN, pix_m, row_ok, H1)
    oa, ob = _unrot(acca * inv_l, accb * inv_l, cm, sm)
    o_rows = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + tok_m[:, None] * s_on
    tl.store(o_rows + c0[None, :], (acc0 * inv_l).to(dt), mask=row_ok[:, None])
    tl.store(o_rows + ca[None, :], oa.to(dt), mask=row_ok[:, None])
    tl.store(o_rows + cb[None, :], ob.to(dt), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * (NVIEW * NV) + tok_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _prope_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, A, COS, SIN,
                  s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  s_ob, s_oh, s_on, s_db, s_dh, s_dn,
                  NH, NVIEW, NV, qk_scale, sm_scale,
                  D0: tl.constexpr, H1: tl.constexpr, HALF: tl.constexpr, T1_PROJ: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, XPREC: tl.constexpr, MPREC: tl.constexpr):
    """dq for one query block (grid like the forward); also writes delta = rowsum(o * do).
    DQ has Q's strides."""
    Q4: tl.constexpr = HALF // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    dt = Q.dtype.element_ty
    nqb = (NV + BM - 1) // BM
    nkb = (NV + BN - 1) // BN
    ci = pid // nqb
    pix_m = (pid % nqb) * BM + tl.arange(0, BM)
    row_ok = pix_m < NV
    tok_m = (ci * NV + pix_m).to(tl.int64)
    c0 = tl.arange(0, D0)
    ca, cb = _ab_cols(HALF, D0, H1, T1_PROJ)
    q_rows = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + tok_m[:, None] * s_qn
    o_rows = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + tok_m[:, None] * s_on
    do_rows = DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + tok_m[:, None] * s_dn
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh

    q0 = _load_tile(q_rows, c0, row_ok)
    do0 = _load_tile(do_rows, c0, row_ok)
    doa = _load_tile(do_rows, ca, row_ok).to(tl.float32)
    dob = _load_tile(do_rows, cb, row_ok).to(tl.float32)
    delta = (tl.sum(_load_tile(o_rows, c0, row_ok).to(tl.float32) * do0.to(tl.float32), 1)
             + tl.sum(_load_tile(o_rows, ca, row_ok).to(tl.float32) * doa, 1)
             + tl.sum(_load_tile(o_rows, cb, row_ok).to(tl.float32) * dob, 1))
    stat = bh.to(tl.int64) * (NVIEW * NV) + tok_m
    tl.store(DELTA + stat, delta, mask=row_ok)
    lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
    cm, sm = _tables(COS, SIN, pix_m, row_ok, H1)
    qa, qb = _rot(_load_tile(q_rows, ca, row_ok), _load_tile(q_rows, cb, row_ok), cm, sm)
    doa, dob = _rot(doa, dob, cm, sm)
    qqa = qa.to(dt)
    qqb = qb.to(dt)
    dda = doa.to(dt)
    ddb = dob.to(dt)

    dq0 = tl.zeros([BM, D0], tl.float32)
    dqa = tl.zeros([BM, H1], tl.float32)
    dqb = tl.zeros([BM, H1], tl.float32)
    cdqa = tl.zeros([BM, H1], tl.float32)
    cdqb = tl.zeros([BM, H1], tl.float32)
    a_row = A + ((b * NVIEW + ci) * NVIEW).to(tl.int64) * 16
    for cj in range(0, NVIEW):
        a_ptr = a_row + cj * 16
        g0 = _blockdiag(a_ptr, D0, 0, False)
        qq0 = tl.dot(q0.to(tl.float32), g0, input_precision=XPREC).to(dt)
        dd0 = tl.dot(do0.to(tl.float32), g0, input_precision=XPREC).to(dt)
        if T1_PROJ:
            g1 = _blockdiag(a_ptr, H1, Q4, False)
            qqa = tl.dot(qa.to(dt).to(tl.float32), g1, input_precision=XPREC).to(dt)
            qqb = tl.dot(qb.to(dt).to(tl.float32), g1, input_precision=XPREC).to(dt)
            dda = tl.dot(doa.to(dt).to(tl.float32), g1, input_precision=XPREC).to(dt)
            ddb = tl.dot(dob.to(dt).to(tl.float32), g1, input_precision=XPREC).to(dt)
            cdqa = tl.zeros([BM, H1], tl.float32)
            cdqb = tl.zeros([BM, H1], tl.float32)
        cdq0 = tl.zeros([BM, D0], tl.float32)
        for n in range(0, nkb):
            pix_n = n * BN + tl.arange(0, BN)
            key_ok = pix_n < NV
            tok_n = (cj * NV + pix_n).to(tl.int64)
            k_rows = k_base + tok_n[:, None] * s_kn
            v_rows = v_base + tok_n[:, None] * s_vn
            cn, sn = _tables(COS, SIN, pix_n, key_ok, H1)
            k0 = _load_tile(k_rows, c0, key_ok)
            ka, kb = _rot(_load_tile(k_rows, ca, key_ok), _load_tile(k_rows, cb, key_ok), cn, sn)
            ka = ka.to(dt)
            kb = kb.to(dt)
            v0 = _load_tile(v_rows, c0, key_ok)
            va, vb = _rot(_load_tile(v_rows, ca, key_ok), _load_tile(v_rows, cb, key_ok), cn, sn)
            s = tl.dot(qq0, tl.trans(k0), input_precision=MPREC)
            s = tl.dot(qqa, tl.trans(ka), s, input_precision=MPREC)
            s = tl.dot(qqb, tl.trans(kb), s, input_precision=MPREC)
            p = tl.exp2(s * qk_scale - lse[:, None])
            p = tl.where(key_ok[None, :], p, 0.0)
            dp = tl.dot(dd0, tl.trans(v0), input_precision=MPREC)
            dp = tl.dot(dda, tl.trans(va.to(dt)), dp, input_precision=MPREC)
            dp = tl.dot(ddb, tl.trans(vb.to(dt)), dp, input_precision=MPREC)
            ds = (p * (dp - delta[:, None])).to(dt)
            cdq0 = tl.dot(ds, k0, cdq0, input_precision=MPREC)
            if T1_PROJ:
                cdqa = tl.dot(ds, ka, cdqa, input_precision=MPREC)
                cdqb = tl.dot(ds, kb, cdqb, input_precision=MPREC)
            else:
                dqa = tl.dot(ds, ka, dqa, input_precision=MPREC)
                dqb = tl.dot(ds, kb, dqb, input_precision=MPREC)
        # dq = P_ci dq', dq' = P_cj^-1 (ds k): blockdiag(A^T) in row form.
        dq0 += tl.dot(cdq0, _blockdiag(a_ptr, D0, 0, True), input_precision=XPREC)
        if T1_PROJ:
            h1 = _blockdiag(a_ptr, H1, Q4, True)
            dqa += tl.dot(cdqa, h1, input_precision=XPREC)
            dqb += tl.dot(cdqb, h1, input_precision=XPREC)

    cm, sm = _tables(COS, SIN, pix_m, row_ok, H1)
    dqa, dqb = _unrot(dqa * sm_scale, dqb * sm_scale, cm, sm)
    dq_rows = DQ + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + tok_m[:, None] * s_qn
    tl.store(dq_rows + c0[None, :], (dq0 * sm_scale).to(dt), mask=row_ok[:, None])
    tl.store(dq_rows + ca[None, :], dqa.to(dt), mask=row_ok[:, None])
    tl.store(dq_rows + cb[None, :], dqb.to(dt), mask=row_ok[:, None])


@triton.jit
def _prope_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, A, COS, SIN,
                    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
                    NH, NVIEW, NV, qk_scale, sm_scale,
                    D0: tl.constexpr, H1: tl.constexpr, HALF: tl.constexpr,
                    T1_PROJ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    XPREC: tl.constexpr, MPREC: tl.constexpr):
    """dk, dv for one key block (BN keys of one camera); loops over all query blocks.
    DK has K's strides, DV has V's."""
    Q4: tl.constexpr = HALF // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    dt = Q.dtype.element_ty
    nqb = (NV + BM - 1) // BM
    nkb = (NV + BN - 1) // BN
    cj = pid // nkb
    pix_n = (pid % nkb) * BN + tl.arange(0, BN)
    key_ok = pix_n < NV
    tok_n = (cj * NV + pix_n).to(tl.int64)
    c0 = tl.arange(0, D0)
    ca, cb = _ab_cols(HALF, D0, H1, T1_PROJ)
    k_rows = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + tok_n[:, None] * s_kn
    v_rows = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + tok_n[:, None] * s_vn
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh

    k0 = _load_tile(k_rows, c0, key_ok)
    v0 = _load_tile(v_rows, c0, key_ok)
    cn, sn = _tables(COS, SIN, pix_n, key_ok, H1)
    ka, kb = _rot(_load_tile(k_rows, ca, key_ok), _load_tile(k_rows, cb, key_ok), cn, sn)
    va, vb = _rot(_load_tile(v_rows, ca, key_ok), _load_tile(v_rows, cb, key_ok), cn, sn)
    ka = ka.to(dt)
    kb = kb.to(dt)
    va = va.to(dt)
    vb = vb.to(dt)
    kka = ka
    kkb = kb
    vva = va
    vvb = vb

    dk0 = tl.zeros([BN, D0], tl.float32)
    dka = tl.zeros([BN, H1], tl.float32)
    dkb = tl.zeros([BN, H1], tl.float32)
    dv0 = tl.zeros([BN, D0], tl.float32)
    dva = tl.zeros([BN, H1], tl.float32)
    dvb = tl.zeros([BN, H1], tl.float32)
    cdka = tl.zeros([BN, H1], tl.float32)
    cdkb = tl.zeros([BN, H1], tl.float32)
    cdva = tl.zeros([BN, H1], tl.float32)
    cdvb = tl.zeros([BN, H1], tl.float32)
    stat_base = bh.to(tl.int64) * (NVIEW * NV)
    for ci in range(0, NVIEW):
        a_ptr = A + ((b * NVIEW + ci) * NVIEW + cj).to(tl.int64) * 16
        # k'' = A k, v'' = A v on the projective channels (A = P_ci P_cj^-1): queries stay raw.
        gt0 = _blockdiag(a_ptr, D0, 0, True)
        kk0 = tl.dot(k0.to(tl.float32), gt0, input_precision=XPREC).to(dt)
        vv0 = tl.dot(v0.to(tl.float32), gt0, input_precision=XPREC).to(dt)
        if T1_PROJ:
            gt1 = _blockdiag(a_ptr, H1, Q4, True)
            kka = tl.dot(ka.to(tl.float32), gt1, input_precision=XPREC).to(dt)
            kkb = tl.dot(kb.to(tl.float32), gt1, input_precision=XPREC).to(dt)
            vva = tl.dot(va.to(tl.float32), gt1, input_precision=XPREC).to(dt)
            vvb = tl.dot(vb.to(tl.float32), gt1, input_precision=XPREC).to(dt)
            cdka = tl.zeros([BN, H1], tl.float32)
            cdkb = tl.zeros([BN, H1], tl.float32)
            cdva = tl.zeros([BN, H1], tl.float32)
            cdvb = tl.zeros([BN, H1], tl.float32)
        cdk0 = tl.zeros([BN, D0], tl.float32)
        cdv0 = tl.zeros([BN, D0], tl.float32)
        for mb in range(0, nqb):
            pix_m = mb * BM + tl.arange(0, BM)
            row_ok = pix_m < NV
            tok_m = (ci * NV + pix_m).to(tl.int64)
            q_rows = q_base + tok_m[:, None] * s_qn
            do_rows = do_base + tok_m[:, None] * s_dn
            cm, sm = _tables(COS, SIN, pix_m, row_ok, H1)
            q0 = _load_tile(q_rows, c0, row_ok)
            qa, qb = _rot(_load_tile(q_rows, ca, row_ok), _load_tile(q_rows, cb, row_ok), cm, sm)
            qa = qa.to(dt)
            qb = qb.to(dt)
            do0 = _load_tile(do_rows, c0, row_ok)
            doa, dob = _rot(_load_tile(do_rows, ca, row_ok), _load_tile(do_rows, cb, row_ok),
                            cm, sm)
            doa = doa.to(dt)
            dob = dob.to(dt)
            lse = tl.load(LSE + stat_base + tok_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stat_base + tok_m, mask=row_ok, other=0.0)
            st = tl.dot(kk0, tl.trans(q0), input_precision=MPREC)
            st = tl.dot(kka, tl.trans(qa), st, input_precision=MPREC)
            st = tl.dot(kkb, tl.trans(qb), st, input_precision=MPREC)
            pt = tl.exp2(st * qk_scale - lse[None, :])
            ptd = pt.to(dt)
            cdv0 = tl.dot(ptd, do0, cdv0, input_precision=MPREC)
            if T1_PROJ:
                cdva = tl.dot(ptd, doa, cdva, input_precision=MPREC)
                cdvb = tl.dot(ptd, dob, cdvb, input_precision=MPREC)
            else:
                dva = tl.dot(ptd, doa, dva, input_precision=MPREC)
                dvb = tl.dot(ptd, dob, dvb, input_precision=MPREC)
            dpt = tl.dot(vv0, tl.trans(do0), input_precision=MPREC)
            dpt = tl.dot(vva, tl.trans(doa), dpt, input_precision=MPREC)
            dpt = tl.dot(vvb, tl.trans(dob), dpt, input_precision=MPREC)
            dst = (pt * (dpt - delta[None, :])).to(dt)
            cdk0 = tl.dot(dst, q0, cdk0, input_precision=MPREC)
            if T1_PROJ:
                cdka = tl.dot(dst, qa, cdka, input_precision=MPREC)
                cdkb = tl.dot(dst, qb, cdkb, input_precision=MPREC)
            else:
                dka = tl.dot(dst, qa, dka, input_precision=MPREC)
                dkb = tl.dot(dst, qb, dkb, input_precision=MPREC)
        # dk = P_cj^-T dk', dk' = P_ci^T (ds^T q): blockdiag(A) in row form; dv likewise.
        g0 = _blockdiag(a_ptr, D0, 0, False)
        dk0 += tl.dot(cdk0, g0, input_precision=XPREC)
        dv0 += tl.dot(cdv0, g0, input_precision=XPREC)
        if T1_PROJ:
            g1 = _blockdiag(a_ptr, H1, Q4, False)
            dka += tl.dot(cdka, g1, input_precision=XPREC)
            dkb += tl.dot(cdkb, g1, input_precision=XPREC)
            dva += tl.dot(cdva, g1, input_precision=XPREC)
            dvb += tl.dot(cdvb, g1, input_precision=XPREC)

    cn, sn = _tables(COS, SIN, pix_n, key_ok, H1)
    dka, dkb = _unrot(dka * sm_scale, dkb * sm_scale, cn, sn)
    dva, dvb = _unrot(dva, dvb, cn, sn)
    dk_rows = DK + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + tok_n[:, None] * s_kn
    dv_rows = DV + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + tok_n[:, None] * s_vn
    tl.store(dk_rows + c0[None, :], (dk0 * sm_scale).to(dt), mask=key_ok[:, None])
    tl.store(dk_rows + ca[None, :], dka.to(dt), mask=key_ok[:, None])
    tl.store(dk_rows + cb[None, :], dkb.to(dt), mask=key_ok[:, None])
    tl.store(dv_rows + c0[None, :], dv0.to(dt), mask=key_ok[:, None])
    tl.store(dv_rows + ca[None, :], dva.to(dt), mask=key_ok[:, None])
    tl.store(dv_rows + cb[None, :], dvb.to(dt), mask=key_ok[:, None])


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
    "fwd": {48: FusedConfig(128, 64, 8, 3), 64: FusedConfig(128, 64, 8, 3),
            128: FusedConfig(128, 64, 8, 3)},
    "dq": {48: FusedConfig(128, 64, 8, 3), 64: FusedConfig(128, 64, 8, 3),
           128: FusedConfig(128, 64, 8, 3)},
    "dkdv": {48: FusedConfig(64, 128, 8, 3), 64: FusedConfig(64, 128, 8, 3),
             128: FusedConfig(64, 128, 8, 3)},
}
_overrides: dict = {}
# Precision of the small camera-fold dots for 16-bit inputs ("tf32x3" for fp32-exact).
TRANSFORM_PRECISION = os.environ.get("GLD_PROPE_XPREC", "tf32")


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
    cos: Tensor      # (ph*pw, d1/2) fp32 cos of each TA/TB column pair's angle (1: projective)
    sin: Tensor      # (ph*pw, d1/2) fp32 sin of it (0 on projective columns)
    views: int
    per_view: int
    d0: int
    d1: int


def _geometry(w2c: Tensor, K: Tensor, patches, image_size, d: int, device) -> _Geometry:
    """Camera matrices and RoPE tables in fp32. The TA/TB column layout is `_ab_cols`': x then y
    a-halves (b-halves in TB), then the projective channels [d0, d/2) split between TA and TB."""
    with torch.no_grad():
        d0, d1 = head_tiles(d)
        P, P_inv = prope_matrices(w2c.detach(), K.detach(), image_size, torch.float32)
        A = (P[:, :, None] @ P_inv[:, None, :]).contiguous()
        cx, sx, cy, sy = rope_tables(patches, d, torch.float32, device)
        nv = cx.shape[0]
        tail = d1 // 2 - d // 4
        ones, zeros = (torch.full((nv, tail), x, dtype=torch.float32, device=device)
                       for x in (1.0, 0.0))
        cos = torch.cat([cx, cy, ones], 1).contiguous()
        sin = torch.cat([sx, sy, zeros], 1).contiguous()
    return _Geometry(A.to(device), cos, sin, w2c.shape[1], nv, d0, d1)


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
    """(camera-fold dots, attention dots). fp32 inputs: full fp32 everywhere. bf16: the fold dots
    see bf16-exact operands or fp32 accumulators and feed bf16 roundings (2^-9), so tf32 (2^-11)
    is inside them. fp16 rounds at 2^-11 itself: tf32 folds doubled its error on the H100
    (d=48, 2.08x the reference), so fp16 uses tf32x3 (fp32-accurate)."""
    if interpret or dtype == torch.float32:
        return "ieee", "ieee"
    return ("tf32x3" if dtype == torch.float16 else TRANSFORM_PRECISION), "tf32"


_FALLBACKS = (FusedConfig(64, 64, 4, 2), FusedConfig(32, 32, 4, 1))
_fell_back: dict = {}


def _with_fallback(kind: str, q: Tensor, launch) -> None:
    """launch(cfg) with the configured blocks; if the compiler runs out of shared memory or
    registers for this dtype (e.g. fp16 with tf32x3 folds at d=128), smaller configs."""
    d = q.shape[-1]
    key = (kind, d, q.dtype)
    cfg = _fell_back.get(key) or _config(kind, d, not q.is_cuda)
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


def _common(q: Tensor, g: _Geometry, cfg: FusedConfig):
    B, H, N, d = q.shape
    interpret = not q.is_cuda
    xprec, mprec = _precisions(q.dtype, interpret)
    meta = dict(D0=g.d0, H1=g.d1 // 2, HALF=d // 2, T1_PROJ=g.d0 < d // 2, XPREC=xprec, MPREC=mprec,
                BM=cfg.block_m, BN=cfg.block_n)
    launch = {} if interpret else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return meta, launch


def _forward(q: Tensor, k: Tensor, v: Tensor, g: _Geometry) -> tuple[Tensor, Tensor]:
    B, H, N, d = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)

    def launch_with(cfg):
        meta, launch = _common(q, g, cfg)
        _prope_fwd[(g.views * triton.cdiv(g.per_view, cfg.block_m), B * H)](
            q, k, v, o, lse, g.A, g.cos, g.sin,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            H, g.views, g.per_view, (1.0 / math.sqrt(d)) * 1.4426950408889634, **meta, **launch)
    _with_fallback("fwd", q, launch_with)
    return o, lse


def _launch_dq(q, k, v, o, lse, do, dq, delta, g: _Geometry) -> None:
    B, H, N, d = q.shape
    sm_scale = 1.0 / math.sqrt(d)

    def launch_with(cfg):
        meta, launch = _common(q, g, cfg)
        _prope_bwd_dq[(g.views * triton.cdiv(g.per_view, cfg.block_m), B * H)](
            q, k, v, o, do, dq, lse, delta, g.A, g.cos, g.sin,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            H, g.views, g.per_view, sm_scale * 1.4426950408889634, sm_scale, **meta, **launch)
    _with_fallback("dq", q, launch_with)


def _launch_dkdv(q, k, v, lse, do, delta, dk, dv, g: _Geometry) -> None:
    B, H, N, d = q.shape
    sm_scale = 1.0 / math.sqrt(d)

    def launch_with(cfg):
        meta, launch = _common(q, g, cfg)
        _prope_bwd_dkdv[(g.views * triton.cdiv(g.per_view, cfg.block_n), B * H)](
            q, k, v, do, dk, dv, lse, delta, g.A, g.cos, g.sin,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            H, g.views, g.per_view, sm_scale * 1.4426950408889634, sm_scale, **meta, **launch)
    _with_fallback("dkdv", q, launch_with)


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
