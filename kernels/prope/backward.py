"""The PRoPE backwards: two kernels (dq; dk and dv) or one (dk and dv, dq by reduce-adds).

Both start the same way: passes write q' = D^T q and do' = D^T do to scratch and k', v' into the
dk / dv buffers; delta = rowsum(o * do) (equal to rowsum(o' * do'), D_t being invertible) comes
from the dq kernel or a small kernel; both end with dk = E^T dk', dv = E^T dv' applied in place
by the transform pass (done in registers inside the dk/dv loop it made ptxas serialise the wgmma
and cost 57 registers). dk and dv are rounded twice in 16-bit (dk', then dk), as in the unfused
reference. The dk/dv loop over query blocks (`_dkdv`) is shared:
    st = k' q'^T,  pt = exp2(st * qk_scale - lse),  dv' += pt do',  dpt = v' do'^T,
    dst = pt (dpt - delta),  dk' += dst q'
- two-kernel: the dq kernel (query block, loop over keys: 3 matmuls) stores dq = D dq' as the
  forward stores o; the dk/dv kernel (4 matmuls) overwrites its k', v' block with dk', dv'. S and
  dP are computed twice; the scratch is q' and do'.
- atomic: one kernel per key block adds its share of dq' = sm_scale dst^T k' (computed as
  (k'^T dst)^T, so the dot has M = padded d rows and a query step of 32 still runs on wgmma)
  into an fp32 accumulator, by one TMA reduce-add per tile on Hopper (else per-element relaxed
  atomics). One matmul pair less, against an fp32 accumulator (4 bytes per element of q) and a
  dq summation order that changes from run to run; dq' is rounded into dq, then dq = D dq' in
  place. It measured faster at d = 64 on Hopper only
  (launch/results/bench_bwd_h100_2026-11-24.json).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.prope.configs import AtomicConfig, PRoPEKernels, padded
from kernels.prope.core import (GKV, KV, LOG2E, OUT, QT, Geometry, TensorDescriptor, interpreted,
                                key_tile, launch_blocks, launch_kwargs, launch_with_fallback,
                                precision_kwargs, precisions, row_ptrs, sm_major, token_block,
                                transform, transform_tile)

__all__ = ["backward_two_kernel", "backward_atomic", "dq_tma_available"]


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, s_kn, lo, hi, N, qk_scale, KD, VD, bh,
              D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
              MPREC: tl.constexpr, TMA: tl.constexpr):
    """dq' += ds k' over key tiles [lo, hi) (MASK: keys >= N masked)."""
    for start in range(lo, hi, BN):
        key = start + tl.arange(0, BN)
        k = key_tile(KD, k_base, start, bh, s_kn, N, D, DP, BN, TMA)
        v = key_tile(VD, v_base, start, bh, s_kn, N, D, DP, BN, TMA)
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
    bh, b, h, tok, ok, t64, c, mask = token_block(NH, N, BM, D, DP)
    p_off = b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph + t64 * s_pn + c
    q = tl.load(QP + p_off, mask=mask, other=0.0)
    do = tl.load(DOP + p_off, mask=mask, other=0.0)
    o_raw = tl.load(row_ptrs(O, b, h, t64, s_ob, s_oh, s_on) + c, mask=mask, other=0.0)
    do_raw = tl.load(row_ptrs(DO, b, h, t64, s_db, s_dh, s_dn) + c, mask=mask, other=0.0)
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
    dq = transform_tile(dq * sm_scale, tok, ok, MO + b * NVIEW * 16, CT, ST, NV, PW, PMAX, D, DP,
                        True, XPREC)
    tl.store(row_ptrs(DQ, b, h, t64, s_gb, s_gh, s_gn) + c, dq.to(DQ.dtype.element_ty), mask=mask)




@triton.jit
def _dkdv(QP, DOP, DK, DV, LSE, DELTA, QD, DOD, DQACC, DQ_DESC,
          s_pb, s_ph, s_pn, s_kb, s_kh, s_kn, NH, N, qk_scale, sm_scale,
          D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          MPREC: tl.constexpr, TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
          DQ_TMA: tl.constexpr):
    """dk', dv' for one key block. DK / DV (strides s_k*) hold k', v' on entry: the block is
    read, dk', dv' accumulated over all queries (q', do' in QP / DOP, strides s_p*; or, if TMA,
    the descriptors QD, DOD over them), and the block overwritten with them. ATOMIC_DQ: also
    adds this block's share of dq' to the fp32 DQACC (B*h, N, D), contiguous, zero on entry:
    through DQ_DESC (a descriptor over it, block [1, BM, DP]) if DQ_TMA, else per element."""
    bh, b, h, key, kok, k64, c, kmask = token_block(NH, N, BN, D, DP)
    dk_rows = row_ptrs(DK, b, h, k64, s_kb, s_kh, s_kn)
    dv_rows = row_ptrs(DV, b, h, k64, s_kb, s_kh, s_kn)
    # Keys past N load as 0: their dq' contribution (dst^T k') is 0, their dk', dv' rows are
    # not stored.
    k = tl.load(dk_rows + c, mask=kmask, other=0.0)
    v = tl.load(dv_rows + c, mask=kmask, other=0.0)
    q_base = QP + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    do_base = DOP + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    stat = LSE + bh.to(tl.int64) * N
    dstat = DELTA + bh.to(tl.int64) * N
    dq_base = DQACC + bh.to(tl.int64) * N * D

    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    for start in range(0, N, BM):
        tok = start + tl.arange(0, BM)
        ok = tok < N
        t64 = tok.to(tl.int64)
        qmask = ok[:, None] & (c < D)
        if TMA:   # (B*h, N, d) descriptors over the q' / do' scratch: rows >= N read as 0
            q = QD.load([bh, start, 0]).reshape(BM, DP)
            do = DOD.load([bh, start, 0]).reshape(BM, DP)
        else:
            q = tl.load(q_base + t64[:, None] * s_pn + c, mask=qmask, other=0.0)
            do = tl.load(do_base + t64[:, None] * s_pn + c, mask=qmask, other=0.0)
        # Queries past N: lse = inf makes pt (and so dst and their dq') 0.
        lse = tl.load(stat + tok, mask=ok, other=float("inf"))
        delta = tl.load(dstat + tok, mask=ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=MPREC)
        if ATOMIC_DQ:   # dpt issued before the exponential, so that its matmul overlaps it (-9%)
            dpt = tl.dot(v, tl.trans(do), input_precision=MPREC)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=MPREC)
        if not ATOMIC_DQ:
            dpt = tl.dot(v, tl.trans(do), input_precision=MPREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=MPREC)
        if ATOMIC_DQ:
            # dq'^T = k'^T dst: M = DP rows (so BM may be 32 under wgmma), dst read as it is.
            dqt = tl.dot(tl.trans(k), dst, input_precision=MPREC) * sm_scale
            if DQ_TMA:
                DQ_DESC.atomic_add([bh, start, 0], tl.reshape(tl.trans(dqt), [1, BM, DP]))
            else:
                tl.atomic_add(dq_base + t64[None, :] * D + tl.trans(c), dqt,
                              mask=tl.trans(qmask), sem="relaxed")
    tl.debug_barrier()   # every warp has read its k', v' rows (long ago) before they are replaced
    tl.store(dk_rows + c, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(dv_rows + c, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _prope_bwd_dkdv(QP, DOP, DK, DV, LSE, DELTA, QD, DOD,
                    s_pb, s_ph, s_pn, s_kb, s_kh, s_kn, NH, N, qk_scale, sm_scale,
                    D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    MPREC: tl.constexpr, TMA: tl.constexpr):
    """The two-kernel backward's dk', dv' for one key block (`_dkdv`)."""
    _dkdv(QP, DOP, DK, DV, LSE, DELTA, QD, DOD, DK, DK, s_pb, s_ph, s_pn, s_kb, s_kh, s_kn, NH,
          N, qk_scale, sm_scale, D, DP, BM, BN, MPREC, TMA, False, False)


@triton.jit
def _prope_bwd_atomic(QP, DOP, DK, DV, LSE, DELTA, DQACC, DQ_DESC,
                      s_pb, s_ph, s_pn, s_kb, s_kh, s_kn, NH, N, qk_scale, sm_scale,
                      D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      MPREC: tl.constexpr, DQ_TMA: tl.constexpr):
    """The one-kernel backward's dk', dv' for one key block and its share of dq' for every
    query (`_dkdv` with ATOMIC_DQ)."""
    _dkdv(QP, DOP, DK, DV, LSE, DELTA, QP, DOP, DQACC, DQ_DESC, s_pb, s_ph, s_pn, s_kb, s_kh,
          s_kn, NH, N, qk_scale, sm_scale, D, DP, BM, BN, MPREC, False, True, DQ_TMA)
@triton.jit
def _delta_kernel(O, DO, DELTA, s_ob, s_oh, s_on, s_db, s_dh, s_dn, NH, N,
                  D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    """delta = rowsum(o * do) in fp32 (DELTA: (B*h, N)) for one token block (equal to
    rowsum(o' * do'): D_t is invertible and o = D_t o', do' = D_t^T do)."""
    bh, b, h, tok, ok, t64, c, mask = token_block(NH, N, BT, D, DP)
    o = tl.load(row_ptrs(O, b, h, t64, s_ob, s_oh, s_on) + c, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(row_ptrs(DO, b, h, t64, s_db, s_dh, s_dn) + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + tok, tl.sum(o * do, 1), mask=ok)




# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
_ATOMIC_FALLBACKS = (AtomicConfig(64, 64, 4, 2), AtomicConfig(32, 64, 4, 1))


def dq_tma_available(q: Tensor) -> bool:
    """Whether the atomic backward can add dq' by TMA reduce-add for q: compiled (not
    interpreted) on a CUDA device of compute capability >= 9 with host tensor descriptors and
    descriptor atomics."""
    if not q.is_cuda or interpreted() or TensorDescriptor is None:
        return False
    base = getattr(tl.core, "tensor_descriptor_base", None)
    if base is None or not hasattr(base, "atomic_add"):
        return False
    return sm_major(q.device) >= 9


def launch_dq(qp, dop, kp, vp, o, do, dq, lse, delta, g: Geometry, kernels: PRoPEKernels) -> None:
    """dq (and delta) from q', do' (equal strides) and k', v' (equal strides)."""
    B, H, N, d = qp.shape
    assert qp.stride() == dop.stride() and kp.stride() == vp.stride()

    def launch(cfg, tma, descs):
        _prope_bwd_dq[(triton.cdiv(N, cfg.block_m), B * H)](
            qp, dop, kp, vp, o, do, dq, lse, delta, g.mats[OUT], g.ct, g.st, *descs,
            qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
            o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax,
            LOG2E / math.sqrt(d), 1.0 / math.sqrt(d), D=d, DP=padded(d), BM=cfg.block_m,
            BN=cfg.block_n, TMA=tma, **precision_kwargs(qp), **launch_kwargs(qp, cfg))
    launch_blocks("dq", qp, kernels, [kp, vp], "block_n", launch)


def launch_dkdv(qp, dop, dk, dv, lse, delta, kernels: PRoPEKernels) -> None:
    """dk', dv' over the k', v' that dk, dv hold (equal strides), from q', do'."""
    B, H, N, d = qp.shape
    assert qp.stride() == dop.stride() and dk.stride() == dv.stride()

    def launch(cfg, tma, descs):
        _prope_bwd_dkdv[(triton.cdiv(N, cfg.block_n), B * H)](
            qp, dop, dk, dv, lse, delta, *descs,
            qp.stride(0), qp.stride(1), qp.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            H, N, LOG2E / math.sqrt(d), 1.0 / math.sqrt(d),
            D=d, DP=padded(d), BM=cfg.block_m, BN=cfg.block_n,
            MPREC=precisions(qp.dtype, not qp.is_cuda)[0], TMA=tma, **launch_kwargs(qp, cfg))
    launch_blocks("dkdv", qp, kernels, [qp, dop], "block_m", launch)


def launch_atomic(qp, dop, dk, dv, lse, delta, dqacc, kernels: PRoPEKernels) -> None:
    """dk', dv' as `launch_dkdv`, and dq' summed into the zeroed fp32 dqacc (B*h, N, d)."""
    B, H, N, d = qp.shape
    assert qp.stride() == dop.stride() and dk.stride() == dv.stride()
    assert dqacc.is_contiguous() and dqacc.shape == (B * H, N, d)
    cfg, given = kernels.config("atomic", d, not qp.is_cuda)
    dq_tma = dq_tma_available(qp) if cfg.dq_tma is None else cfg.dq_tma
    if dq_tma and not dq_tma_available(qp):
        raise ValueError("AtomicConfig(dq_tma=True) needs a compiled (not interpreted) CUDA "
                         "device of compute capability >= 9 and triton tensor-descriptor atomics")

    def launch_with(cfg):
        desc = dqacc
        if dq_tma:
            desc = TensorDescriptor(dqacc, list(dqacc.shape), list(dqacc.stride()),
                                    [1, cfg.block_m, padded(d)])
        _prope_bwd_atomic[(triton.cdiv(N, cfg.block_n), B * H)](
            qp, dop, dk, dv, lse, delta, dqacc, desc,
            qp.stride(0), qp.stride(1), qp.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            H, N, LOG2E / math.sqrt(d), 1.0 / math.sqrt(d),
            D=d, DP=padded(d), BM=cfg.block_m, BN=cfg.block_n,
            MPREC=precisions(qp.dtype, not qp.is_cuda)[0], DQ_TMA=dq_tma,
            **launch_kwargs(qp, cfg))
    launch_with_fallback("atomic", qp, cfg, given, launch_with, _ATOMIC_FALLBACKS)


def _launch_delta(o: Tensor, do: Tensor, delta: Tensor) -> None:
    B, H, N, d = o.shape
    bt = 16 if not o.is_cuda else 64
    launch = {} if not o.is_cuda else dict(num_warps=4)
    _delta_kernel[(triton.cdiv(N, bt), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
        do.stride(2), H, N, D=d, DP=padded(d), BT=bt, **launch)


def _primed(q, k, v, do, qp, g: Geometry, xcfg):
    """dk, dv buffers holding k', v' (equal strides), qp <- q', and do' (qp's strides)."""
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # dk / dv share strides (k and v are dense alike or copied), dq has q's.
    if dk.stride() != dv.stride():
        dk, dv = dk.contiguous(), dv.contiguous()
    dop = torch.empty_like(qp)
    transform(q, qp, g, QT, False, xcfg)
    transform(do, dop, g, QT, False, xcfg)
    transform(k, dk, g, KV, False, xcfg)      # k' and v' live in the gradient buffers
    transform(v, dv, g, KV, False, xcfg)
    return dk, dv, dop


def backward_two_kernel(q, k, v, o, lse, do, g: Geometry,
                        kernels: PRoPEKernels = PRoPEKernels()) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of PRoPE attention in q, k, v's dtypes and strides.

    q, k, v, o, do: (B, h, N, d) with a unit last stride (q, k, v as `core.dense` leaves them);
    lse: (B, h, N) fp32 log2-sum-exp of a forward; g: its Geometry.
    """
    B, H, N, d = q.shape
    xcfg = kernels.config("transform", d, not q.is_cuda)[0]
    dq = torch.empty_like(q)
    qp = torch.empty(B, H, N, d, dtype=q.dtype, device=q.device)
    dk, dv, dop = _primed(q, k, v, do, qp, g, xcfg)
    delta = torch.empty_like(lse)
    launch_dq(qp, dop, dk, dv, o, do, dq, lse, delta, g, kernels)    # also writes delta
    launch_dkdv(qp, dop, dk, dv, lse, delta, kernels)                 # k', v' -> dk', dv'
    transform(dk, dk, g, GKV, True, xcfg)                             # dk = E^T dk', in place
    transform(dv, dv, g, GKV, True, xcfg)
    return dq, dk, dv


def backward_atomic(q, k, v, o, lse, do, g: Geometry,
                    kernels: PRoPEKernels = PRoPEKernels()) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) like `backward_two_kernel`, by the one-kernel backward."""
    B, H, N, d = q.shape
    xcfg = kernels.config("transform", d, not q.is_cuda)[0]
    dq = torch.empty_like(q)
    dk, dv, dop = _primed(q, k, v, do, dq, g, xcfg)   # q' lives in dq until dq replaces it
    delta = torch.empty_like(lse)
    _launch_delta(o, do, delta)
    dqacc = torch.zeros(B * H, N, d, dtype=torch.float32, device=q.device)
    launch_atomic(dq, dop, dk, dv, lse, delta, dqacc, kernels)
    # dq = D dq': dq' rounded to dq's dtype first, then transformed in place (as dk, dv: two
    # 16-bit roundings). Transforming the fp32 accumulator directly would run the transform's
    # dots at fp32 (ieee) precision: about 0.1 ms more at d = 64, 1.2 ms at d = 128 (H100).
    dq.copy_(dqacc.view(B, H, N, d))
    transform(dq, dq, g, OUT, True, xcfg)
    transform(dk, dk, g, GKV, True, xcfg)    # dk = E^T dk', in place
    transform(dv, dv, g, GKV, True, xcfg)
    return dq, dk, dv
