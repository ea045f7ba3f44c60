"""The warp-specialised PRoPE forward for Hopper (Gluon): `forward_ws`, no scratch.

Same contract as the pre-pass forward (forward.py: o in q's dtype, fp32 log2-sum-exp (B, h, N)),
the same math (q' = D^T q as it is loaded, k' = E k, v' = E v, o = D o' as it is stored: core.py),
but k' and v' never reach global memory:
- a producer partition (4 warps) transforms each key tile of k and v in registers and writes it
  into a ring of shared-memory stages, signalling the consumers through mbarriers;
- two consumer partitions of BM query rows (4 warps each: independent warpgroups, so one's
  softmax overlaps the other's wgmma) run the flash-attention loop on those stages with wgmma:
  S = q' k'^T, online softmax in fp32, O' += P v'. The query and output transforms run in the
  consumers (each its own rows, o' in fp32 through shared memory) or in the producer (o' read
  back from o, rounded to o's dtype like the reference's attention output): `WSConfig`.
So the transform work of a tile overlaps the tensor-core work of the previous ones, and peak
memory is plain attention's (o and the LSE).

Design trade-off: no transient k', v' (2 tensors the size of k less at the peak than the
pre-pass forward) for less speed: the producer's transform sets the pace (H100 / H200: about
0.8x the pre-pass forward at d = 64, docs/gpu.md). So the default policy uses it only for calls
without gradients (kernels/prope/fused.py). What was measured, kept and dropped:
launch/results/prope_kernels_history.md.

Key tiles are rows i BN + [0, BN) of the whole sequence, so a tile may span two cameras: each
row is transformed with its own camera's 4x4 (a thread owns one row), and only the sequence's
last tile can be partial. The producer's layout gives each thread the same D/4 columns of both
halves of a row (whole 4-chunks, whole RoPE quarters), so its transform stays in registers; its
in-place output transform has each thread load and store the same elements. A consumer whose
rows all lie past N (the second half of a last query block) only hands the stages back.
d = 48 works in rows of 64 (`_head_col` places its columns as they are loaded and stored: memory
holds 48, the tensor cores multiply 64, the padding stays zero). Hopper (sm_90: wgmma) only,
16-bit, d 48 / 64 / 128 (`ws_supported`). Gluon has no CPU interpreter: its tests are GPU tests.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

try:   # Gluon: Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
except ImportError:  # pragma: no cover - older Triton
    gluon = None

from kernels.prope.configs import WS_HEAD_DIMS, WSConfig, default_config
from kernels.prope.core import KV, LOG2E, OUT, QT, Geometry, sm_major

__all__ = ["forward_ws", "ws_supported"]


if gluon is not None:
    @gluon.jit
    def _mix_row(mp, st: gl.constexpr, x0, x1, x2, x3):
        """sum_s M[mp + st * s] x_s: one output of a 4x4 (mp a scalar pointer, or one per row)."""
        return (gl.load(mp) * x0 + gl.load(mp + st) * x1 + gl.load(mp + 2 * st) * x2
                + gl.load(mp + 3 * st) * x3)

    @gluon.jit
    def _cam(xc, mp, D: gl.constexpr, BT: gl.constexpr):
        """Camera half xc (BT, D/2) fp32 in 4-chunks times M (out_i = sum_j M[i, j] x_j; M 4x4
        row-major at mp, one pointer per row (BT,))."""
        xe, xo = gl.split(gl.reshape(xc, [BT, D // 8, 2, 2]))   # chunk element s = 2 i + j
        x0, x2 = gl.split(xe)
        x1, x3 = gl.split(xo)
        mp = gl.convert_layout(mp, gl.SliceLayout(1, x0.type.layout))[:, None]
        y0 = _mix_row(mp, 1, x0, x1, x2, x3)
        y1 = _mix_row(mp + 4, 1, x0, x1, x2, x3)
        y2 = _mix_row(mp + 8, 1, x0, x1, x2, x3)
        y3 = _mix_row(mp + 12, 1, x0, x1, x2, x3)
        return gl.reshape(gl.join(gl.join(y0, y2), gl.join(y1, y3)), [BT, D // 2])

    @gluon.jit
    def _head_col(c, D: gl.constexpr, DR: gl.constexpr):
        """Where column c of the D-wide working layout lives in a head of DR < D columns (d =
        48 in D = 64), and whether it exists there: the working layout keeps the head's camera
        half (DR/2) at the start of its first half and each RoPE quarter's a and b halves (DR/8
        each) at the start of their D/8 slots; the rest is zero padding, which q' k'^T and the
        transforms leave at zero and o's store skips."""
        E: gl.constexpr = D // 8
        ER: gl.constexpr = DR // 8
        cr = c - D // 2
        cam = c < D // 2
        return (gl.where(cam, c, DR // 2 + (cr // E) * ER + cr % E),
                gl.where(cam, c < DR // 2, cr % E < ER))

    @gluon.jit
    def _rows(base, s_n, tok0, lim, D: gl.constexpr, BT: gl.constexpr, TL: gl.constexpr,
              DR: gl.constexpr):
        """Pointers (BT, 2, D/2) (camera half, RoPE half) in layout TL to rows tok0 + [0, BT) of
        base (row stride s_n), and the mask of rows < lim."""
        tok = tok0 + gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, TL)))
        hf = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, TL)))[None, :, None]
        cc = gl.arange(0, D // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, TL)))[None, None, :]
        row = base + tok.to(gl.int64)[:, None, None] * s_n
        ok = (tok < lim)[:, None, None]
        if DR == D:
            ptrs = row + hf * (D // 2) + cc
        else:
            col, has = _head_col(hf * (D // 2) + cc, D, DR)
            ptrs = row + col
            ok = ok & has
        return ptrs, ok

    @gluon.jit
    def _load_rows(src, s_n, tok0, lim, D: gl.constexpr, BT: gl.constexpr, TL: gl.constexpr,
                   DR: gl.constexpr):
        """Rows tok0 + [0, BT) of src as (BT, 2, D/2) in layout TL, in src's dtype; rows >= lim
        read as 0."""
        ptrs, ok = _rows(src, s_n, tok0, lim, D, BT, TL, DR)
        return gl.load(ptrs, mask=ok, other=0.0)

    @gluon.jit
    def _store_rows(dst, s_n, tok0, lim, y, D: gl.constexpr, BT: gl.constexpr, TL: gl.constexpr,
                    DR: gl.constexpr):
        """Store y (BT, 2, D/2) in layout TL to rows tok0 + [0, BT) (< lim) of dst."""
        ptrs, ok = _rows(dst, s_n, tok0, lim, D, BT, TL, DR)
        gl.store(ptrs, y.to(dst.dtype.element_ty), mask=ok)

    @gluon.jit
    def _fetch(raw, st, K, V, s_n, tok0, lim, BT: gl.constexpr, D: gl.constexpr,
               LIN: gl.constexpr):
        """cp.async rows tok0 + [0, BT) of K and V (rows >= lim as 0) into raw[2 st], raw[2 st
        + 1] ((BT, D) each), as one commit group, in layout LIN: the producer's TL with its
        (BT, 2, D/2) reshaped to (BT, D), so each thread copies the elements it later reads."""
        tok = tok0 + gl.arange(0, BT, layout=gl.SliceLayout(1, LIN))
        col = gl.arange(0, D, layout=gl.SliceLayout(0, LIN))[None, :]
        row = tok.to(gl.int64)[:, None] * s_n + col
        ok = (tok < lim)[:, None]
        async_copy.async_copy_global_to_shared(raw.index(2 * st), K + row, mask=ok)
        async_copy.async_copy_global_to_shared(raw.index(2 * st + 1), V + row, mask=ok)
        async_copy.commit_group()

    @gluon.jit
    def _cossin(x, tok0, lim, NV, CS, SN, PW, PMAX, D: gl.constexpr, BT: gl.constexpr,
                DR: gl.constexpr):
        """cos, sin (BT, 2 (x, y), D/8) in the layout of the RoPE pairs of x (BT, 2, D/2) of
        tokens tok0 + [0, BT): angles of the token's column (x) and row (y) within its view; 0
        for rows >= lim."""
        Q8: gl.constexpr = D // 8     # the working layout's slots per RoPE quarter half
        Q8R: gl.constexpr = DR // 8   # the head's (the tables' width)
        _, like, _ = _halves(x, D, BT)
        AL: gl.constexpr = like.type.layout
        xy = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, AL)))[None, :, None]
        f = gl.arange(0, Q8, layout=gl.SliceLayout(0, gl.SliceLayout(1, AL)))[None, None, :]
        ra = tok0 + gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, AL)))
        tv = (ra % NV)[:, None, None]
        tab = xy * (PMAX * Q8R) + gl.where(xy == 0, tv % PW, tv // PW) * Q8R + f
        ok = (ra < lim)[:, None, None] & (f < Q8R)
        return gl.load(CS + tab, mask=ok, other=0.0), gl.load(SN + tab, mask=ok, other=0.0)

    @gluon.jit
    def _halves(x, D: gl.constexpr, BT: gl.constexpr):
        """(BT, 2, D/2) -> camera half (BT, D/2) fp32, RoPE pairs a, b (BT, 2 (x, y), D/8)."""
        xc, xr = gl.split(gl.permute(x.to(gl.float32), (0, 2, 1)))
        a, b = gl.split(gl.permute(gl.reshape(xr, [BT, 2, 2, D // 8]), (0, 1, 3, 2)))
        return xc, a, b

    @gluon.jit
    def _xf_vals(x, cs, sn, tok0, lim, NV, MAT, D: gl.constexpr, BT: gl.constexpr,
                 INV: gl.constexpr):
        """Transform of the raw tile x (BT, 2, D/2) of tokens tok0 + [0, BT) -> fp32, same shape:
        the camera half in 4-chunks times M[camera of the row] (`_cam`, M at MAT + 16 * camera),
        the RoPE half rotated by cos / sin (from `_cossin`; INV: the inverse rotation).
        x's layout gives each thread the same D/4 columns of both halves (whole 4-chunks, whole
        RoPE quarters [a | b]), so the reshapes and splits below stay inside a thread."""
        H2: gl.constexpr = D // 2
        xc, a, b = _halves(x, D, BT)
        rt = tok0 + gl.arange(0, BT, layout=gl.SliceLayout(1, xc.type.layout))
        yc = _cam(xc, MAT + gl.where(rt < lim, rt // NV, 0) * 16, D, BT)
        if INV:
            ra2 = a * cs - b * sn
            rb2 = a * sn + b * cs
        else:
            ra2 = a * cs + b * sn
            rb2 = b * cs - a * sn
        yr = gl.reshape(gl.permute(gl.join(ra2, rb2), (0, 1, 3, 2)), [BT, H2])
        yc = gl.convert_layout(yc, yr.type.layout)
        return gl.convert_layout(gl.permute(gl.join(yc, yr), (0, 2, 1)), x.type.layout)

    @gluon.jit
    def _xf_own(x, tok0, lim, NV, MAT, CS, SN, PW, PMAX, D: gl.constexpr, BT: gl.constexpr,
                INV: gl.constexpr, DR: gl.constexpr):
        """`_xf_vals` of the tile x of tokens tok0 + [0, BT), each row with its own camera
        (query / output rows)."""
        cs, sn = _cossin(x, tok0, lim, NV, CS, SN, PW, PMAX, D, BT, DR)
        return _xf_vals(x, cs, sn, tok0, lim, NV, MAT, D, BT, INV)

    @gluon.jit
    def _xf_rows(src, s_n, tok0, lim, NV, MAT, CS, SN, PW, PMAX, D: gl.constexpr,
                 BT: gl.constexpr, INV: gl.constexpr, TL: gl.constexpr, DR: gl.constexpr):
        """`_xf_own` of rows tok0 + [0, BT) of src."""
        x = _load_rows(src, s_n, tok0, lim, D, BT, TL, DR)
        return _xf_own(x, tok0, lim, NV, MAT, CS, SN, PW, PMAX, D, BT, INV, DR)

    @gluon.jit
    def _producer(K, V, Q, O, MK, MQ, MO, CS, SN, k_ring, v_ring, q_smem, raw, ready, empty,
                  q_ready, o_ready, k_row0, q_row0, o_row0, s_kn, s_qn, s_on, m_base, N, NV, PW,
                  PMAX, m0,
                  D: gl.constexpr, DR: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  BE: gl.constexpr, STAGES: gl.constexpr, NCONS: gl.constexpr,
                  XFC: gl.constexpr, PF: gl.constexpr):
        """Producer partition (4 warps): k', v' tiles into the ring; unless XFC, also q' into
        q_smem first and the output transform of o' (read back from O) in place at the end."""
        # (rows, half, column in half): each thread the same D/4 columns of both halves
        TL: gl.constexpr = gl.BlockedLayout([1, 2, D // 4], [16, 1, 2], [4, 1, 1], [2, 1, 0])
        gl.static_assert(BN == 64)
        gl.static_assert(not PF or DR == D)   # PF copies whole rows of D columns
        if XFC == 0:
            for r0 in gl.static_range(0, NCONS * BM, BE):
                y = _xf_rows(Q + q_row0, s_qn, m0 + r0, N, NV, MQ + m_base, CS, SN, PW, PMAX, D,
                             BE, False, TL, DR)
                q_smem.index(r0 // BM).slice(r0 % BM, BE).store(gl.reshape(y, [BE, D]).to(
                    q_smem.dtype))
            fence_async_shared()
            mbarrier.arrive(q_ready, count=1)

        # key tiles (BN rows): tile i is rows i BN + [0, BN) of the whole sequence (a tile may
        # span two cameras: each row gets its own camera's 4x4), so only the last tile of the
        # sequence can be partial. k and v share the tile's cos / sin. PF: the raw k, v of tile
        # i + 1 are copied (cp.async) into staging while tile i is transformed; each thread
        # copies exactly the elements it later reads, so waiting on its own copies is enough.
        n_tiles = gl.cdiv(N, BN)
        LIN: gl.constexpr = gl.reshape(_rows(K, s_kn, 0, 0, D, BN, TL, D)[0], [BN, D]).type.layout
        if PF:
            _fetch(raw, 0, K + k_row0, V + k_row0, s_kn, 0, N, BN, D, LIN)
        for i in range(n_tiles):
            tok0 = i * BN
            lim = N
            if PF:   # past the last tile: rows >= N, none copied
                _fetch(raw, (i + 1) % 2, K + k_row0, V + k_row0, s_kn, (i + 1) * BN, N, BN, D,
                       LIN)
                async_copy.wait_group(1)
                kx = gl.convert_layout(gl.reshape(raw.index(2 * (i % 2)).load(LIN),
                                                  [BN, 2, D // 2]), TL)
                vx = gl.convert_layout(gl.reshape(raw.index(2 * (i % 2) + 1).load(LIN),
                                                  [BN, 2, D // 2]), TL)
            else:
                kx = _load_rows(K + k_row0, s_kn, tok0, lim, D, BN, TL, DR)
                vx = _load_rows(V + k_row0, s_kn, tok0, lim, D, BN, TL, DR)
            cs, sn = _cossin(kx, tok0, lim, NV, CS, SN, PW, PMAX, D, BN, DR)
            kt = _xf_vals(kx, cs, sn, tok0, lim, NV, MK + m_base, D, BN, False)
            vt = _xf_vals(vx, cs, sn, tok0, lim, NV, MK + m_base, D, BN, False)
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1, pred=i >= STAGES)
            k_ring.index(s).store(gl.reshape(kt, [BN, D]).to(k_ring.dtype))
            v_ring.index(s).store(gl.reshape(vt, [BN, D]).to(v_ring.dtype))
            fence_async_shared()
            mbarrier.arrive(ready.index(s), count=1)

        # output transform: o = D o', o' read back from O; each thread loads and stores the
        # same elements (its transform reads only those), so the in-place update has no hazard
        if XFC == 0:
            mbarrier.wait(o_ready, 0)
            for r0 in gl.static_range(0, NCONS * BM, BE):
                ey = _xf_rows(O + o_row0, s_on, m0 + r0, N, NV, MO + m_base, CS, SN, PW, PMAX, D,
                              BE, True, TL, DR)
                _store_rows(O + o_row0, s_on, m0 + r0, N, ey, D, BE, TL, DR)

    @gluon.jit
    def _q_tile(Q, MQ, CS, SN, q_smem, q_row0, s_qn, m_base, N, NV, PW, PMAX, m0,
                D: gl.constexpr, BM: gl.constexpr, RC: gl.constexpr, TLC: gl.constexpr,
                DR: gl.constexpr):
        """The consumer's query rows q' = D^T q into q_smem."""
        for r0 in gl.static_range(0, BM, RC):
            y = _xf_rows(Q + q_row0, s_qn, m0 + r0, N, NV, MQ + m_base, CS, SN, PW, PMAX, D,
                         RC, False, TLC, DR)
            q_smem.slice(r0, RC).store(gl.reshape(y, [RC, D]).to(q_smem.dtype))
        fence_async_shared()

    @gluon.jit
    def _my_turn(turn, g, WG: gl.constexpr, PING: gl.constexpr):
        """PING: wait until the other consumer has issued its tensor-core work of step g (of
        g - 1 for consumer 0), so the two issue in turns and one's softmax runs under the
        other's wgmma. Neither can get two turns ahead, so phase parities are unambiguous."""
        if PING:
            if WG == 0:
                mbarrier.wait(turn.index(0), (g - 1) & 1, pred=g >= 1)
            else:
                mbarrier.wait(turn.index(1), g & 1)

    @gluon.jit
    def _pass_turn(turn, WG: gl.constexpr, PING: gl.constexpr):
        """PING: this consumer has issued its wgmma of the step; the other may issue its own."""
        if PING:
            mbarrier.arrive(turn.index(1 - WG), count=1)

    @gluon.jit
    def _softmax_tile(sc, m_i, l_i, nvalid, kcol, qk_scale):
        """Online softmax of one score tile (keys kcol >= nvalid masked): p, the rescale alpha
        of the running sums, the new row max and row sum (log2 domain)."""
        sc = gl.where(kcol < nvalid, sc, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
        p = gl.exp2(sc * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _attention_loop(q_smem, k_ring, v_ring, ready, empty, q_ready, turn, N, qk_scale,
                        D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                        STAGES: gl.constexpr, CW: gl.constexpr, XFC: gl.constexpr,
                        PIPE: gl.constexpr, WG: gl.constexpr, PING: gl.constexpr):
        """The online-softmax loop with wgmma over every key tile of the ring for the BM query
        rows q' in q_smem: (acc (BM, D) fp32, the unnormalised sum of p v'; the row max m_i and
        row sum l_i, log2 domain)."""
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CW, 1],
                                                      instr_shape=[16, BN, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CW, 1],
                                                      instr_shape=[16, D, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
        m_i = gl.full([BM], float("-inf"), gl.float32, layout=ROW_S)
        l_i = gl.zeros([BM], gl.float32, layout=ROW_S)
        acc = gl.zeros([BM, D], gl.float32, layout=O_L)
        s_zero = gl.zeros([BM, BN], gl.float32, layout=S_L)
        kcol = gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))[None, :]
        if XFC == 0:
            mbarrier.wait(q_ready, 0)
        n_tiles = gl.cdiv(N, BN)   # the keys of tile i that exist: < N - i BN
        dt: gl.constexpr = k_ring.dtype
        if PIPE:
            # tile 0's scores, then per tile i: S_i = q k_i^T and O += P_(i-1) v_(i-1) issued
            # together; the softmax of S_i runs while the second is on the tensor cores
            mbarrier.wait(ready.index(0), 0)
            _my_turn(turn, 0, WG, PING)
            sc = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)
            _pass_turn(turn, WG, PING)
            sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
            p, alpha, m_i, l_i = _softmax_tile(sc, m_i, l_i, N, kcol, qk_scale)
            p16 = gl.convert_layout(p.to(dt), P_L)
            for i in range(1, n_tiles):
                s = i % STAGES
                sp = (i - 1) % STAGES
                mbarrier.wait(ready.index(s), (i // STAGES) & 1)
                _my_turn(turn, i, WG, PING)
                sc = warpgroup_mma(q_smem, k_ring.index(s).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
                acc = warpgroup_mma(p16, v_ring.index(sp), acc, is_async=True)
                _pass_turn(turn, WG, PING)
                sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc, ))
                p, alpha, m_i, l_i = _softmax_tile(sc, m_i, l_i, N - i * BN, kcol, qk_scale)
                acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
                mbarrier.arrive(empty.index(sp), count=1)
                acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
                p16 = gl.convert_layout(p.to(dt), P_L)
            sl = (n_tiles - 1) % STAGES
            _my_turn(turn, n_tiles, WG, PING)
            acc = warpgroup_mma(p16, v_ring.index(sl), acc, is_async=True)
            _pass_turn(turn, WG, PING)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(sl), count=1)
        else:
            for i in range(n_tiles):
                s = i % STAGES
                mbarrier.wait(ready.index(s), (i // STAGES) & 1)
                sc = warpgroup_mma(q_smem, k_ring.index(s).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
                sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
                p, alpha, m_i, l_i = _softmax_tile(sc, m_i, l_i, N - i * BN, kcol, qk_scale)
                acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
                p16 = gl.convert_layout(p.to(dt), P_L)
                acc = warpgroup_mma(p16, v_ring.index(s), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index(s), count=1)
        return acc, m_i, l_i

    @gluon.jit
    def _hand_back(ready, empty, o_ready, turn, N, BN: gl.constexpr, STAGES: gl.constexpr,
                   XFC: gl.constexpr, WG: gl.constexpr, PING: gl.constexpr):
        """A consumer whose rows all lie past N (the second consumer of a last query block that
        is half full) only hands each k, v stage back (and passes its turns), so the other
        consumer has the SM's tensor cores alone."""
        n_tiles = gl.cdiv(N, BN)
        for i in range(n_tiles):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            _my_turn(turn, i, WG, PING)
            _pass_turn(turn, WG, PING)
            mbarrier.arrive(empty.index(s), count=1)
        _my_turn(turn, n_tiles, WG, PING)
        _pass_turn(turn, WG, PING)
        if XFC == 0:
            mbarrier.arrive(o_ready, count=1)

    @gluon.jit
    def _consumer(Q, O, LSE, MQ, MO, CS, SN, k_ring, v_ring, q_smem, o_smem, ready, empty,
                  q_ready, o_ready, q_row0, o_row0, s_qn, s_on, lse_row0, m_base, N, NV, PW,
                  PMAX, m0, qk_scale,
                  D: gl.constexpr, DR: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  STAGES: gl.constexpr, CW: gl.constexpr, XFC: gl.constexpr,
                  PIPE: gl.constexpr, turn, WG: gl.constexpr, PING: gl.constexpr):
        """Consumer partition (CW warps): attention on its BM query rows (`_attention_loop`),
        or `_hand_back` when they all lie past N. XFC >= 1: it also transforms its own query
        rows first and its output rows last (in fp32, through o_smem), in parallel with the
        other consumer, instead of leaving both to the producer."""
        if m0 < N:
            TLC: gl.constexpr = gl.BlockedLayout([1, 2, D // 4], [16, 1, 2], [CW, 1, 1],
                                                 [2, 1, 0])
            RC: gl.constexpr = 16 * CW
            if XFC >= 1:
                _q_tile(Q, MQ, CS, SN, q_smem, q_row0, s_qn, m_base, N, NV, PW, PMAX, m0, D, BM,
                        RC, TLC, DR)
            acc, m_i, l_i = _attention_loop(q_smem, k_ring, v_ring, ready, empty, q_ready, turn,
                                            N, qk_scale, D, BM, BN, STAGES, CW, XFC, PIPE, WG,
                                            PING)
            O_L: gl.constexpr = acc.type.layout
            ROW_O: gl.constexpr = gl.SliceLayout(1, O_L)
            tok_s = m0 + gl.arange(0, BM, layout=m_i.type.layout)
            gl.store(LSE + lse_row0 + tok_s, m_i + gl.log2(l_i), mask=tok_s < N)
            o = acc * gl.convert_layout(1.0 / l_i, ROW_O)[:, None]
            if XFC >= 1:
                o_smem.store(gl.reshape(o, [BM, 2, D // 2]))
                for r0 in gl.static_range(0, BM, RC):
                    ox = o_smem.slice(r0, RC).load(TLC)
                    ey = _xf_own(ox, m0 + r0, N, NV, MO + m_base, CS, SN, PW, PMAX, D, RC, True,
                                 DR)
                    _store_rows(O + o_row0, s_on, m0 + r0, N, ey, D, RC, TLC, DR)
            else:
                tok = m0 + gl.arange(0, BM, layout=ROW_O)
                c = gl.arange(0, D, layout=gl.SliceLayout(0, O_L))[None, :]
                ok = (tok < N)[:, None]
                if DR != D:
                    c, has = _head_col(c, D, DR)
                    ok = ok & has
                gl.store(O + o_row0 + tok.to(gl.int64)[:, None] * s_on + c,
                         o.to(O.dtype.element_ty), mask=ok)
                mbarrier.arrive(o_ready, count=1)
        else:
            _hand_back(ready, empty, o_ready, turn, N, BN, STAGES, XFC, WG, PING)

    @gluon.jit
    def _prope_fwd_ws(Q, K, V, O, LSE, MQ, MK, MO, CS, SN,
                      s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_ob, s_oh, s_on,
                      NH, N, NV, NVIEW, PW, PMAX, qk_scale,
                      D: gl.constexpr, DR: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                      BE: gl.constexpr, STAGES: gl.constexpr, NCONS: gl.constexpr,
                      CREGS: gl.constexpr, PREGS: gl.constexpr, XFC: gl.constexpr,
                      PIPE: gl.constexpr, PF: gl.constexpr, PING: gl.constexpr,
                      num_warps: gl.constexpr):
        """One program: NCONS = 2 blocks of BM query rows of one (batch, head), one per consumer
        partition (independent warpgroups, so one's softmax overlaps the other's wgmma), sharing
        the producer's stages."""
        gl.static_assert(NCONS == 2)
        bh = gl.program_id(1)
        b = bh // NH
        h = bh % NH
        m0 = gl.program_id(0) * (NCONS * BM)
        dt: gl.constexpr = K.dtype.element_ty
        kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dt)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], dt)
        k_ring = gl.allocate_shared_memory(dt, [STAGES, BN, D], kv_sl)
        v_ring = gl.allocate_shared_memory(dt, [STAGES, BN, D], kv_sl)
        q_smem = gl.allocate_shared_memory(dt, [NCONS, BM, D], q_sl)
        o_smem = gl.allocate_shared_memory(
            gl.float32, [NCONS if XFC >= 1 else 1, BM if XFC >= 1 else 1, 2, D // 2],
            gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0]))
        raw = gl.allocate_shared_memory(dt, [4 if PF else 1, BN if PF else 1, D],
                                        gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        o_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NCONS)
        mbarrier.init(q_ready, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.init(o_ready, count=NCONS)
        k_row0 = b.to(gl.int64) * s_kb + h.to(gl.int64) * s_kh
        q_row0 = b.to(gl.int64) * s_qb + h.to(gl.int64) * s_qh
        o_row0 = b.to(gl.int64) * s_ob + h.to(gl.int64) * s_oh
        lse_row0 = bh.to(gl.int64) * N
        m_base = b * NVIEW * 16
        # (Gluon: a partition's arguments are spelled out per call; a tuple would turn the
        # constexprs into tensors)
        gl.warp_specialize([
            (_consumer, (Q, O, LSE, MQ, MO, CS, SN, k_ring, v_ring, q_smem.index(0),
                         o_smem.index(0), ready, empty, q_ready, o_ready, q_row0, o_row0, s_qn,
                         s_on, lse_row0, m_base, N, NV, PW, PMAX, m0, qk_scale, D, DR, BM, BN,
                         STAGES, num_warps, XFC, PIPE, turn, 0, PING)),
            (_consumer, (Q, O, LSE, MQ, MO, CS, SN, k_ring, v_ring, q_smem.index(1),
                         o_smem.index(NCONS - 1), ready, empty, q_ready, o_ready, q_row0, o_row0,
                         s_qn, s_on, lse_row0, m_base, N, NV, PW, PMAX, m0 + BM, qk_scale, D, DR,
                         BM, BN, STAGES, num_warps, XFC, PIPE, turn, 1, PING)),
            (_producer, (K, V, Q, O, MK, MQ, MO, CS, SN, k_ring, v_ring, q_smem, raw, ready,
                         empty, q_ready, o_ready, k_row0, q_row0, o_row0, s_kn, s_qn, s_on, m_base,
                         N, NV, PW, PMAX, m0, D, DR, BM, BN, BE, STAGES, NCONS, XFC, PF))],
            [num_warps, 4], [CREGS, PREGS])



# head dim -> the working width D (registers, shared memory, wgmma): d = 48 in 64-wide rows
_WIDTH = {48: 64, 64: 64, 128: 128}


def ws_supported(q: Tensor) -> bool:
    """Whether `forward_ws` runs for q: Gluon available, a Hopper GPU (sm_90: wgmma, which
    Blackwell does not have), 16-bit, d in (48, 64, 128)."""
    return (gluon is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in WS_HEAD_DIMS and sm_major(q.device) == 9)


def forward_ws(q: Tensor, k: Tensor, v: Tensor, g: Geometry,
               cfg: Optional[WSConfig] = None) -> tuple[Tensor, Tensor]:
    """(o, lse) like `forward.forward_prepass`, with no scratch; q, k, v (B, h, N, d), unit last
    stride. cfg: the launch config (default: the head dim's, `configs.default_config`)."""
    if not ws_supported(q):
        raise ValueError(f"forward_ws: needs Gluon, a Hopper GPU (sm_90), fp16/bf16 and d in "
                         f"{WS_HEAD_DIMS}; got {q.dtype}, d={q.shape[-1]}, device {q.device}")
    B, H, N, d = q.shape
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    D = _WIDTH[d]
    cfg = cfg or default_config("ws", d)
    _prope_fwd_ws[(-(-N // (2 * cfg.block_m)), B * H)](
        q, k, v, o, lse, g.mats[QT], g.mats[KV], g.mats[OUT], g.ct, g.st,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax,
        LOG2E / math.sqrt(d), D=D, DR=d, BM=cfg.block_m, BN=cfg.block_n, BE=64,
        STAGES=cfg.stages, NCONS=2, CREGS=cfg.consumer_regs, PREGS=cfg.producer_regs,
        XFC=int(cfg.consumer_transforms), PIPE=cfg.pipe, PF=cfg.prefetch and D == d,
        PING=cfg.ping, num_warps=cfg.num_warps)
    return o, lse
