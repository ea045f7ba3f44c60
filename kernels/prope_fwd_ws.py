"""Warp-specialised no-scratch PRoPE forward for Hopper (Gluon): `forward_ws`.

Same contract as the pre-pass forward `prope_triton._forward` (o in q's dtype, fp32 log2-sum-exp
(B, h, N)), the same math as its attention kernel `_prope_fwd` (q' = D^T q as it is loaded,
k' = D^-1 k, v' = D^-1 v, o = D o' as it is stored), but k' and v' never reach global memory:

- a producer partition (4 warps) transforms each key tile of k and v (camera 4x4 of the tile's
  camera on the first d/2 columns, RoPE of each token on the rest) in registers and writes it
  into a ring of shared-memory stages, signalling the consumers through mbarriers;
- the consumer partitions run the flash-attention loop on those stages with wgmma:
  S = q' k'^T, online softmax in fp32, O' += P v'. With XFC each transforms its own query rows
  first and its output rows last (o' in fp32 through shared memory); without, the producer does
  both, reading o' back from o (stored rounded to o's dtype, like the reference's attention
  output).
So the transform work of a tile overlaps the tensor-core work of the previous ones, and peak
memory is plain attention's (o and the LSE).

Key tiles start at each camera's first token (so one 4x4 per tile; a masked tail tile per camera
when BN does not divide the tokens per view). The producer's in-place output transform has each
thread load and store the same elements (its transform reads only those): no cross-thread
hazards.

Launch: two consumer partitions of BM = 128 query rows each (4 warps; independent warpgroups,
so one's softmax overlaps the other's wgmma) share one producer (4 warps) and the stages; each
thread of the producer owns the same D/4 columns of both halves of a row (whole 4-chunks, whole
RoPE quarters), so its transform stays in registers with no shuffles.

Hopper (sm_90) and newer CUDA GPUs, 16-bit inputs, head dims 64 and 128 (key tiles of 64);
`supported` says when; `prope_triton` runs the pre-pass forward elsewhere (d = 48 included).
Gluon has no CPU interpreter: its tests are GPU tests (marker `gpu`) against the float64
reference.

H100, bf16, B 2, h 16, 8 views of 36x36 (launch/results/profile_kernels_fa4_ws_h100_2026-11-24.md,
launch/results/bench_fwd_ws_h100_2026-11-24.json): d = 64: 286-292 TFLOP/s forward at 42 MiB
peak (plain attention's: o + LSE), against the pre-pass forward's 382-390 at 123 MiB and the
earlier no-scratch kernel's 235; forward+backward 348. d = 128: 244-256 at 83 MiB (pre-pass 344
at 244). Its speed is set by the k / v transform in the producer: one consumer of 256 rows and
two of 128 ran at the same 211 TFLOP/s until the producer's work was halved (each half of a row
transformed once, not both ways: 279-288); prefetching the next tile's raw k, v into registers
spilled and lost; moving the query / output transforms to the consumers (XFC, the last config
field) gave the same speed with o' kept in fp32 (4.7e-3 against 4.9e-3 relative to the pre-pass
forward), and is the d = 64 default (at d = 128 its fp32 o' buffer does not fit in shared
memory).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

try:   # Gluon: Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)
except ImportError:  # pragma: no cover - older Triton
    gluon = None

from kernels.prope_triton import KV, LOG2E, OUT, QT, _Geometry, _hopper_or_newer

__all__ = ["forward_ws", "supported", "WS_CONFIGS"]


if gluon is not None:
    @gluon.jit
    def _mix_row(mp, x0, x1, x2, x3):
        """sum_s M[r, s] x_s for the matrix row at mp (a scalar pointer, or one per row)."""
        return (gl.load(mp) * x0 + gl.load(mp + 1) * x1 + gl.load(mp + 2) * x2
                + gl.load(mp + 3) * x3)

    @gluon.jit
    def _rows(base, s_n, tok0, lim, D: gl.constexpr, BT: gl.constexpr, TL: gl.constexpr):
        """Pointers (BT, 2, D/2) (camera half, RoPE half) in layout TL to rows tok0 + [0, BT) of
        base (row stride s_n), and the mask of rows < lim."""
        tok = tok0 + gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, TL)))
        hf = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, TL)))[None, :, None]
        cc = gl.arange(0, D // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, TL)))[None, None, :]
        return (base + tok.to(gl.int64)[:, None, None] * s_n + hf * (D // 2) + cc,
                (tok < lim)[:, None, None])

    @gluon.jit
    def _load_rows(src, s_n, tok0, lim, D: gl.constexpr, BT: gl.constexpr, TL: gl.constexpr):
        """Rows tok0 + [0, BT) of src as (BT, 2, D/2) in layout TL, in src's dtype; rows >= lim
        read as 0."""
        ptrs, ok = _rows(src, s_n, tok0, lim, D, BT, TL)
        return gl.load(ptrs, mask=ok, other=0.0)

    @gluon.jit
    def _store_rows(dst, s_n, tok0, lim, y, D: gl.constexpr, BT: gl.constexpr, TL: gl.constexpr):
        """Store y (BT, 2, D/2) in layout TL to rows tok0 + [0, BT) (< lim) of dst."""
        ptrs, ok = _rows(dst, s_n, tok0, lim, D, BT, TL)
        gl.store(ptrs, y.to(dst.dtype.element_ty), mask=ok)

    @gluon.jit
    def _cossin(x, tok0, lim, NV, CS, SN, PW, PMAX, D: gl.constexpr, BT: gl.constexpr):
        """cos, sin (BT, 2 (x, y), D/8) in the layout of the RoPE pairs of x (BT, 2, D/2) of tokens tok0 + [0, BT): angles of the
        token's column (x) and row (y) within its view; 0 for rows >= lim."""
        Q8: gl.constexpr = D // 8
        _, like, _ = _halves(x, D, BT)
        AL: gl.constexpr = like.type.layout
        xy = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, AL)))[None, :, None]
        f = gl.arange(0, Q8, layout=gl.SliceLayout(0, gl.SliceLayout(1, AL)))[None, None, :]
        ra = tok0 + gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, AL)))
        tv = (ra % NV)[:, None, None]
        tab = xy * (PMAX * Q8) + gl.where(xy == 0, tv % PW, tv // PW) * Q8 + f
        ok = (ra < lim)[:, None, None] & (f < Q8)
        return gl.load(CS + tab, mask=ok, other=0.0), gl.load(SN + tab, mask=ok, other=0.0)

    @gluon.jit
    def _halves(x, D: gl.constexpr, BT: gl.constexpr):
        """(BT, 2, D/2) -> camera half (BT, D/2) fp32, RoPE pairs a, b (BT, 2 (x, y), D/8)."""
        xc, xr = gl.split(gl.permute(x.to(gl.float32), (0, 2, 1)))
        a, b = gl.split(gl.permute(gl.reshape(xr, [BT, 2, 2, D // 8]), (0, 1, 3, 2)))
        return xc, a, b

    @gluon.jit
    def _xf_vals(x, cs, sn, tok0, lim, NV, MAT, D: gl.constexpr, BT: gl.constexpr,
                 INV: gl.constexpr, UNIFORM: gl.constexpr):
        """Transform of the raw tile x (BT, 2, D/2) of tokens tok0 + [0, BT) -> fp32, same shape:
        the camera half in 4-chunks times M[camera of the row] (out_i = sum_j M[i, j] x_j, M 4x4
        row-major at MAT + 16 * camera; UNIFORM: all rows of one camera, that of row 0), the
        RoPE half rotated by cos / sin (from `_cossin`; INV: the inverse rotation).
        x's layout gives each thread the same D/4 columns of both halves (whole 4-chunks, whole
        RoPE quarters [a | b]), so the reshapes and splits below stay inside a thread."""
        H2: gl.constexpr = D // 2
        xc, a, b = _halves(x, D, BT)
        xe, xo = gl.split(gl.reshape(xc, [BT, D // 8, 2, 2]))   # chunk element s = 2 i + j
        x0, x2 = gl.split(xe)
        x1, x3 = gl.split(xo)
        if UNIFORM:
            mp = MAT + (tok0 // NV) * 16
        else:
            rt = tok0 + gl.arange(0, BT, layout=gl.SliceLayout(1, x0.type.layout))
            mp = (MAT + gl.where(rt < lim, rt // NV, 0) * 16)[:, None]
        y0 = _mix_row(mp, x0, x1, x2, x3)
        y1 = _mix_row(mp + 4, x0, x1, x2, x3)
        y2 = _mix_row(mp + 8, x0, x1, x2, x3)
        y3 = _mix_row(mp + 12, x0, x1, x2, x3)
        yc = gl.reshape(gl.join(gl.join(y0, y2), gl.join(y1, y3)), [BT, H2])
        if INV:
            ra2 = a * cs - b * sn
            rb2 = a * sn + b * cs
        else:
            ra2 = a * cs + b * sn
            rb2 = b * cs - a * sn
        yr = gl.reshape(gl.permute(gl.join(ra2, rb2), (0, 1, 3, 2)), [BT, H2])
        return gl.convert_layout(gl.permute(gl.join(yc, yr), (0, 2, 1)), x.type.layout)

    @gluon.jit
    def _xf_own(x, tok0, lim, NV, MAT, CS, SN, PW, PMAX, D: gl.constexpr, BT: gl.constexpr,
                INV: gl.constexpr):
        """`_xf_vals` of the tile x of tokens tok0 + [0, BT), each row with its own camera
        (query / output rows)."""
        cs, sn = _cossin(x, tok0, lim, NV, CS, SN, PW, PMAX, D, BT)
        return _xf_vals(x, cs, sn, tok0, lim, NV, MAT, D, BT, INV, False)

    @gluon.jit
    def _xf_rows(src, s_n, tok0, lim, NV, MAT, CS, SN, PW, PMAX, D: gl.constexpr,
                 BT: gl.constexpr, INV: gl.constexpr, TL: gl.constexpr):
        """`_xf_own` of rows tok0 + [0, BT) of src."""
        x = _load_rows(src, s_n, tok0, lim, D, BT, TL)
        return _xf_own(x, tok0, lim, NV, MAT, CS, SN, PW, PMAX, D, BT, INV)

    @gluon.jit
    def _producer(K, V, Q, O, MK, MQ, MO, CS, SN, k_ring, v_ring, q_smem, ready, empty, q_ready,
                  o_ready, k_row0, q_row0, o_row0, s_kn, s_qn, s_on, m_base, N, NV, PW, PMAX,
                  m0, TPC, NVIEW,
                  D: gl.constexpr, DP: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  BE: gl.constexpr, STAGES: gl.constexpr, NCONS: gl.constexpr,
                  XFC: gl.constexpr):
        """Producer partition (4 warps): k', v' tiles into the ring; unless XFC, also q' into
        q_smem first and the output transform of o' (read back from O) in place at the end."""
        # (rows, half, column in half): each thread the same D/4 columns of both halves
        TL: gl.constexpr = gl.BlockedLayout([1, 2, D // 4], [16, 1, 2], [4, 1, 1], [2, 1, 0])
        gl.static_assert(BN == 64)
        if not XFC:
            for r0 in gl.static_range(0, NCONS * BM, BE):
                y = _xf_rows(Q + q_row0, s_qn, m0 + r0, N, NV, MQ + m_base, CS, SN, PW, PMAX, D,
                             BE, False, TL)
                q_smem.index(r0 // BM).slice(r0 % BM, BE).store(gl.reshape(y, [BE, D]).to(
                    q_smem.dtype))
            fence_async_shared()
            mbarrier.arrive(q_ready, count=1)

        # key tiles (BN rows; tile i of camera i // TPC); k and v share the tile's cos / sin
        n_tiles = NVIEW * TPC
        for i in range(n_tiles):
            cam = i // TPC
            tok0 = cam * NV + (i % TPC) * BN
            kx = _load_rows(K + k_row0, s_kn, tok0, cam * NV + NV, D, BN, TL)
            vx = _load_rows(V + k_row0, s_kn, tok0, cam * NV + NV, D, BN, TL)
            cs, sn = _cossin(kx, tok0, cam * NV + NV, NV, CS, SN, PW, PMAX, D, BN)
            kt = _xf_vals(kx, cs, sn, tok0, cam * NV + NV, NV, MK + m_base, D, BN, False, True)
            vt = _xf_vals(vx, cs, sn, tok0, cam * NV + NV, NV, MK + m_base, D, BN, False, True)
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1, pred=i >= STAGES)
            k_ring.index(s).store(gl.reshape(kt, [BN, D]).to(k_ring.dtype))
            v_ring.index(s).store(gl.reshape(vt, [BN, D]).to(v_ring.dtype))
            fence_async_shared()
            mbarrier.arrive(ready.index(s), count=1)

        # output transform: o = D o', o' read back from O; each thread loads and stores the
        # same elements (its transform reads only those), so the in-place update has no hazard
        if not XFC:
            mbarrier.wait(o_ready, 0)
            for r0 in gl.static_range(0, NCONS * BM, BE):
                ey = _xf_rows(O + o_row0, s_on, m0 + r0, N, NV, MO + m_base, CS, SN, PW, PMAX, D,
                              BE, True, TL)
                _store_rows(O + o_row0, s_on, m0 + r0, N, ey, D, BE, TL)

    @gluon.jit
    def _consumer(Q, O, LSE, MQ, MO, CS, SN, k_ring, v_ring, q_smem, o_smem, ready, empty,
                  q_ready, o_ready, q_row0, o_row0, s_qn, s_on, lse_row0, m_base, N, NV, PW,
                  PMAX, m0, TPC, NVIEW, qk_scale,
                  D: gl.constexpr, DP: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  STAGES: gl.constexpr, CW: gl.constexpr, XFC: gl.constexpr):
        """Consumer partition (CW warps): the attention loop with wgmma on BM query rows. XFC:
        it also transforms its own query rows first and its output rows last (in fp32, through
        o_smem), in parallel with the other consumer, instead of leaving both to the producer."""
        TLC: gl.constexpr = gl.BlockedLayout([1, 2, D // 4], [16, 1, 2], [CW, 1, 1], [2, 1, 0])
        RC: gl.constexpr = 16 * CW
        if XFC:
            for r0 in gl.static_range(0, BM, RC):
                y = _xf_rows(Q + q_row0, s_qn, m0 + r0, N, NV, MQ + m_base, CS, SN, PW, PMAX, D,
                             RC, False, TLC)
                q_smem.slice(r0, RC).store(gl.reshape(y, [RC, D]).to(q_smem.dtype))
            fence_async_shared()
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CW, 1],
                                                      instr_shape=[16, BN, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CW, 1],
                                                      instr_shape=[16, DP, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        m_i = gl.full([BM], float("-inf"), gl.float32, layout=ROW_S)
        l_i = gl.zeros([BM], gl.float32, layout=ROW_S)
        acc = gl.zeros([BM, DP], gl.float32, layout=O_L)
        s_zero = gl.zeros([BM, BN], gl.float32, layout=S_L)
        kcol = gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))[None, :]
        if not XFC:
            mbarrier.wait(q_ready, 0)
        n_tiles = NVIEW * TPC
        for i in range(n_tiles):
            s = i % STAGES
            nvalid = NV - (i % TPC) * BN
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            k_s = k_ring.index(s)
            sc = warpgroup_mma(q_smem, k_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
            sc = gl.where(kcol < nvalid, sc, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
            p = gl.exp2(sc * qk_scale - m_new[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 1)
            acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
            p16 = gl.convert_layout(p.to(k_ring.dtype), P_L)
            v_s = v_ring.index(s)
            acc = warpgroup_mma(p16, v_s, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(s), count=1)
            m_i = m_new
        tok_s = m0 + gl.arange(0, BM, layout=ROW_S)
        gl.store(LSE + lse_row0 + tok_s, m_i + gl.log2(l_i), mask=tok_s < N)
        o = acc * gl.convert_layout(1.0 / l_i, ROW_O)[:, None]
        if XFC:
            o_smem.store(gl.reshape(o, [BM, 2, D // 2]))
            for r0 in gl.static_range(0, BM, RC):
                ox = o_smem.slice(r0, RC).load(TLC)
                ey = _xf_own(ox, m0 + r0, N, NV, MO + m_base, CS, SN, PW, PMAX, D, RC, True)
                _store_rows(O + o_row0, s_on, m0 + r0, N, ey, D, RC, TLC)
        else:
            tok = m0 + gl.arange(0, BM, layout=ROW_O)
            c = gl.arange(0, DP, layout=gl.SliceLayout(0, O_L))[None, :]
            gl.store(O + o_row0 + tok.to(gl.int64)[:, None] * s_on + c, o.to(O.dtype.element_ty),
                     mask=(tok < N)[:, None] & (c < D))
            mbarrier.arrive(o_ready, count=1)

    @gluon.jit
    def _prope_fwd_ws(Q, K, V, O, LSE, MQ, MK, MO, CS, SN,
                      s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_ob, s_oh, s_on,
                      NH, N, NV, NVIEW, PW, PMAX, TPC, qk_scale,
                      D: gl.constexpr, DP: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                      BE: gl.constexpr, STAGES: gl.constexpr, NCONS: gl.constexpr,
                      CREGS: gl.constexpr, PREGS: gl.constexpr, XFC: gl.constexpr,
                      num_warps: gl.constexpr):
        """One program: NCONS * BM query rows of one (batch, head). NCONS = 2: two consumer
        partitions of BM rows each (independent warpgroups, so one's softmax overlaps the
        other's wgmma), sharing the producer's stages."""
        bh = gl.program_id(1)
        b = bh // NH
        h = bh % NH
        m0 = gl.program_id(0) * (NCONS * BM)
        dt: gl.constexpr = K.dtype.element_ty
        kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, DP], dt)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, DP], dt)
        k_ring = gl.allocate_shared_memory(dt, [STAGES, BN, DP], kv_sl)
        v_ring = gl.allocate_shared_memory(dt, [STAGES, BN, DP], kv_sl)
        q_smem = gl.allocate_shared_memory(dt, [NCONS, BM, DP], q_sl)
        o_smem = gl.allocate_shared_memory(
            gl.float32, [NCONS if XFC else 1, BM if XFC else 1, 2, DP // 2],
            gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0]))
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        o_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NCONS)
        mbarrier.init(q_ready, count=1)
        mbarrier.init(o_ready, count=NCONS)
        k_row0 = b.to(gl.int64) * s_kb + h.to(gl.int64) * s_kh
        q_row0 = b.to(gl.int64) * s_qb + h.to(gl.int64) * s_qh
        o_row0 = b.to(gl.int64) * s_ob + h.to(gl.int64) * s_oh
        lse_row0 = bh.to(gl.int64) * N
        m_base = b * NVIEW * 16
        if NCONS == 1:
            gl.warp_specialize([
                (_consumer, (Q, O, LSE, MQ, MO, CS, SN, k_ring, v_ring, q_smem.index(0),
                             o_smem.index(0), ready, empty, q_ready, o_ready, q_row0, o_row0,
                             s_qn, s_on, lse_row0, m_base, N, NV, PW, PMAX, m0, TPC, NVIEW,
                             qk_scale, D, DP, BM, BN, STAGES, num_warps, XFC)),
                (_producer, (K, V, Q, O, MK, MQ, MO, CS, SN, k_ring, v_ring, q_smem, ready, empty,
                             q_ready, o_ready, k_row0, q_row0, o_row0, s_kn, s_qn, s_on, m_base, N,
                             NV, PW, PMAX, m0, TPC, NVIEW, D, DP, BM, BN, BE, STAGES, NCONS,
                             XFC))], [4], [PREGS])
        else:
            gl.warp_specialize([
                (_consumer, (Q, O, LSE, MQ, MO, CS, SN, k_ring, v_ring, q_smem.index(0),
                             o_smem.index(0), ready, empty, q_ready, o_ready, q_row0, o_row0,
                             s_qn, s_on, lse_row0, m_base, N, NV, PW, PMAX, m0, TPC, NVIEW,
                             qk_scale, D, DP, BM, BN, STAGES, num_warps, XFC)),
                (_consumer, (Q, O, LSE, MQ, MO, CS, SN, k_ring, v_ring, q_smem.index(1),
                             o_smem.index(NCONS - 1), ready, empty, q_ready, o_ready, q_row0, o_row0,
                             s_qn, s_on, lse_row0, m_base, N, NV, PW, PMAX, m0 + BM, TPC, NVIEW,
                             qk_scale, D, DP, BM, BN, STAGES, num_warps, XFC)),
                (_producer, (K, V, Q, O, MK, MQ, MO, CS, SN, k_ring, v_ring, q_smem, ready, empty,
                             q_ready, o_ready, k_row0, q_row0, o_row0, s_kn, s_qn, s_on, m_base, N,
                             NV, PW, PMAX, m0, TPC, NVIEW, D, DP, BM, BN, BE, STAGES, NCONS,
                             XFC))], [num_warps, 4], [CREGS, PREGS])


# (BM rows per consumer, BN, warps per consumer, stages, consumers, consumer registers, producer
# registers, XFC: consumers transform their own query and output rows) to time on the H100.
WS_CONFIGS = [(128, 64, 4, 2, 2, 192, 120, 0), (128, 64, 4, 2, 2, 192, 120, 1),
              (128, 64, 4, 3, 2, 184, 128, 1), (128, 64, 4, 2, 2, 200, 112, 1),
              (256, 64, 8, 2, 1, 0, 96, 1)]
_WS_DEFAULT = {64: (128, 64, 4, 2, 2, 192, 120, 1), 128: (128, 64, 4, 2, 2, 192, 120, 0)}
_ws_override: dict = {}


def set_ws_config(dp: int, cfg) -> None:
    """Override the launch config (a `WS_CONFIGS` entry) for head dim dp."""
    if cfg is None:
        _ws_override.pop(dp, None)
    else:
        _ws_override[dp] = tuple(cfg)


def supported(q: Tensor) -> bool:
    """Whether `forward_ws` runs for q: Gluon available, a Hopper+ GPU, 16-bit, d in (64, 128)."""
    return (gluon is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (64, 128) and _hopper_or_newer(q.device))


def forward_ws(q: Tensor, k: Tensor, v: Tensor, g: _Geometry) -> tuple[Tensor, Tensor]:
    """(o, lse) like `prope_triton._forward`, with no scratch; q, k, v (B, h, N, d), unit last
    stride, k and v with equal strides."""
    if not supported(q):
        raise ValueError(f"forward_ws: needs Gluon, a Hopper GPU, fp16/bf16 and d in (64, 128); "
                         f"got {q.dtype}, d={q.shape[-1]}, device {q.device}")
    B, H, N, d = q.shape
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    bm, bn, cw, stages, ncons, cregs, pregs, xfc = _ws_override.get(d, _WS_DEFAULT[d])
    tpc = -(-g.per_view // bn)
    _prope_fwd_ws[(-(-N // (ncons * bm)), B * H)](
        q, k, v, o, lse, g.mats[QT], g.mats[KV], g.mats[OUT], g.ct, g.st,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax, tpc,
        LOG2E / math.sqrt(d), D=d, DP=d, BM=bm, BN=bn, BE=64, STAGES=stages,
        NCONS=ncons, CREGS=cregs, PREGS=pregs, XFC=bool(xfc), num_warps=cw)
    return o, lse
