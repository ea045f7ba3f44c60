"""Fused single-pass PRoPE attention backward (FlashAttention-2/3 style: dq by atomic adds).

`backward_fused` has the contract of `prope_triton._backward` (q, k, v, o, lse, do: (B, h, N, d);
returns dq, dk, dv in the inputs' dtypes and strides); the math is reference.md section 3, the
per-token transforms are prope_triton's `_transform` passes.

Design: `_backward` runs a dq kernel (query block, loop over keys: 3 matmuls) and a dk/dv kernel
(key block, loop over queries: 4 matmuls), so S = Q'K'^T and dP = dO'V'^T are computed twice.
Here one kernel per key block loops over all query blocks and does the 5 distinct matmuls once:
    st = k' q'^T,  dpt = v' do'^T,  pt = exp2(st * qk_scale - lse),  dv' += pt do',
    dst = pt (dpt - delta),  dk' += dst q',  dq'[query block] += sm_scale dst^T k'
The last one is a partial sum over key blocks, added into an fp32 accumulator DQACC (B*h, N, d)
either per element (`tl.atomic_add`, relaxed: vectorised atom.add.v4.f32 on the H100) or as one
TMA reduce-add per tile (`DQ_TMA`, Hopper: a host `TensorDescriptor` over DQACC, block
[1, BM, DP]; rows past N and columns past d fall outside it and are dropped). With `dq_t` the
partial is computed as (k'^T dst)^T: that dot then has M = DP rows, so a query step of BM = 32
still runs on wgmma, and dst is not transposed through shared memory.
Passes: q' -> the dq buffer, k', v' -> the dk / dv buffers, do' -> one scratch tensor, delta =
rowsum(o * do) (`_delta_kernel`: (B, h, N) written, nothing else), the fused kernel (overwrites
k', v' with dk', dv'), then dq' is rounded into the dq buffer and dq = D dq', dk = D^-T dk',
dv = D^-T dv' are applied in place.

Trade-offs: one matmul pair less, against B h N d fp32 atomic adds per key block and a
summation order in dq that changes from run to run. Memory: DQACC costs 4 bytes per element
of q (two bf16 tensors' worth) while the scratch shrinks from 2 tensors (q', do') to 1; dq is
rounded twice in 16-bit (dq', then dq) as dk and dv already are.

H100 (triton 3.6, B 2, 16 heads, 8 views of 36x36 = 10368 tokens, bf16; launch/bench_bwd.py,
launch/results/bench_bwd_h100_2026-11-24.json), whole backward: d = 64 5.82 ms (378 TFLOP/s)
against 6.07 for `_backward`; d = 48 5.92 against 5.93; d = 128 12.43 against 12.12: no real
gain. At d = 64 the fused kernel alone takes 5.1 ms; the same loop without the dq' partial
3.7 ms (as the dk/dv kernel), so the fifth matmul with its adds costs 1.4 ms where the
separate dq kernel took 2.2-2.5 ms, and the extra passes (zeroing DQACC, rounding dq', one more
transform) take back most of the difference. The adds themselves are cheap (a plain store in
their place: -0.3 ms); the cost is triton waiting for each wgmma group before the next and dst
going through shared memory. TMA reduce-add beats per-element adds by 0.5-1 ms in the 4-warp
configs; issuing dpt before the exponential saved 9%.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Only the launcher-level helpers of prope_triton (its kernels' signatures change with it).
from kernels.prope_triton import (GKV, KV, LOG2E, OUT, QT, _Geometry, _padded, _precisions,
                                  _transform, interpreted)

try:   # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:   # pragma: no cover
    TensorDescriptor = None

__all__ = ["backward_fused", "FusedBwdConfig", "set_config", "SWEEP_CONFIGS", "dq_tma_available"]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, DELTA, s_ob, s_oh, s_on, s_db, s_dh, s_dn, NH, N,
                  D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr):
    """delta = rowsum(o * do) in fp32 (DELTA: (B*h, N)) for one token block (equal to
    rowsum(o' * do'): D_t is invertible and o = D_t o', do' = D_t^T do)."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    ok = tok < N
    t64 = tok.to(tl.int64)[:, None]
    c = tl.arange(0, DP)[None, :]
    mask = ok[:, None] & (c < D)
    o = tl.load(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + t64 * s_on + c, mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + t64 * s_dn + c, mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + tok, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _prope_bwd_fused(QP, DOP, DK, DV, LSE, DELTA, DQACC, DQ_DESC,
                     s_pb, s_ph, s_pn, s_kb, s_kh, s_kn, NH, N, qk_scale, sm_scale,
                     D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     MPREC: tl.constexpr, DQ_TMA: tl.constexpr, DQ_T: tl.constexpr):
    """dk', dv' for one key block and its share of dq' for every query. DK / DV (strides s_k*)
    hold k', v' on entry and get dk', dv'; q', do' in QP / DOP (strides s_p*); the dq' partial
    sums go to the fp32 DQACC (B*h, N, D), contiguous, zero on entry: through DQ_DESC (a
    descriptor over it, block [1, BM, DP]) if DQ_TMA, else per element. DQ_T: the dq' partial as
    (k'^T dst)^T instead of dst^T k' (same sum, other operand layouts)."""
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
        q = tl.load(q_base + t64[:, None] * s_pn + c, mask=qmask, other=0.0)
        do = tl.load(do_base + t64[:, None] * s_pn + c, mask=qmask, other=0.0)
        # Queries past N: lse = inf makes pt (and so dst and their dq') 0.
        lse = tl.load(stat + tok, mask=ok, other=float("inf"))
        delta = tl.load(dstat + tok, mask=ok, other=0.0)
        # dpt is issued before the exponential so that its matmul overlaps it (H100: -9%).
        st = tl.dot(k, tl.trans(q), input_precision=MPREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=MPREC)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=MPREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=MPREC)
        if DQ_T:
            # dq'^T = k'^T dst: M = DP rows (so BM may be 32 under wgmma), dst read as it is.
            dqt = tl.dot(tl.trans(k), dst, input_precision=MPREC) * sm_scale
            if DQ_TMA:
                DQ_DESC.atomic_add([bh, start, 0], tl.reshape(tl.trans(dqt), [1, BM, DP]))
            else:
                tl.atomic_add(dq_base + t64[None, :] * D + tl.trans(c), dqt,
                              mask=tl.trans(qmask), sem="relaxed")
        else:
            dq = tl.dot(tl.trans(dst), k, input_precision=MPREC) * sm_scale
            if DQ_TMA:
                DQ_DESC.atomic_add([bh, start, 0], tl.reshape(dq, [1, BM, DP]))
            else:
                tl.atomic_add(dq_base + t64[:, None] * D + c, dq, mask=qmask, sem="relaxed")
    tl.debug_barrier()   # every warp has read its k', v' rows (long ago) before they are replaced
    tl.store(dk_rows + c, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(dv_rows + c, dv.to(DV.dtype.element_ty), mask=kmask)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedBwdConfig:
    """Launch settings of the fused kernel: block_m queries per step, block_n keys per program
    (as prope_triton's dkdv kernel), warps, pipeline stages, and dq_t: the dq' partial computed
    as (k'^T dst)^T (M = DP for that dot, BM free) instead of dst^T k' (M = BM)."""

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    dq_t: bool = False


_C = FusedBwdConfig
# H100 (see the module docstring), whole backward in ms with TMA reduce-add, `_backward` at 6.07
# (d = 64) / 12.12 (d = 128) in the same run: d = 64 (32, 128, 4, 4, T) 5.82, (32, 128, 4, 3, T)
# 5.94, (32, 128, 4, 2, T) 6.50, (64, 64, 4, 3, T) 6.76, (64, 128, 8, 3, T) 7.00, (128, 128,
# 8, 2, T) 7.04; d = 128 (64, 128, 8, 3, T) 12.43, (64, 128, 8, 2, T) 13.29; d = 48 (dp 64)
# (32, 128, 4, 3, T) 5.92. SWEEP_CONFIGS: candidates for launch/bench_bwd.py.
_DEFAULTS = {64: _C(32, 128, 4, 4, True), 128: _C(64, 128, 8, 3, True)}
SWEEP_CONFIGS = {
    64: [_C(32, 128, 4, 4, True), _C(32, 128, 4, 3, True), _C(32, 128, 4, 2, True),
         _C(64, 64, 4, 3, True), _C(32, 64, 4, 3, True), _C(128, 128, 8, 2, True),
         _C(64, 128, 8, 3, True), _C(64, 128, 8, 3, False)],
    128: [_C(64, 128, 8, 2, True), _C(64, 128, 8, 2, False), _C(64, 128, 8, 3, True),
          _C(32, 128, 8, 2, True)],
}
_INTERP_CONFIG = _C(16, 16, 1, 1)
_FALLBACKS = (_C(64, 64, 4, 2, True), _C(32, 64, 4, 1, True))
_overrides: dict = {}
_fell_back: dict = {}


def set_config(dp: int, cfg: Optional[FusedBwdConfig]) -> None:
    """Override the fused kernel's launch config for padded head dim dp (benchmarks); None
    restores the default."""
    if cfg is None:
        _overrides.pop(dp, None)
    else:
        _overrides[dp] = cfg


def _config(d: int, interpret: bool) -> FusedBwdConfig:
    if interpret:
        return _INTERP_CONFIG
    dp = _padded(d)
    if dp in _overrides:
        return _overrides[dp]
    return _DEFAULTS.get(dp, _DEFAULTS[128 if dp > 64 else 64])


def dq_tma_available(q: Tensor) -> bool:
    """Whether the TMA reduce-add path can run for q: compiled (not interpreted) on a CUDA
    device of compute capability >= 9 with host tensor descriptors and descriptor atomics."""
    if not q.is_cuda or interpreted() or TensorDescriptor is None:
        return False
    base = getattr(tl.core, "tensor_descriptor_base", None)
    if base is None or not hasattr(base, "atomic_add"):
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 9


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _launch(q: Tensor, cfg: FusedBwdConfig) -> dict:
    return {} if not q.is_cuda else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_delta(o: Tensor, do: Tensor, delta: Tensor) -> None:
    B, H, N, d = o.shape
    bt = 16 if not o.is_cuda else 64
    launch = {} if not o.is_cuda else dict(num_warps=4)
    _delta_kernel[(triton.cdiv(N, bt), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
        do.stride(2), H, N, D=d, DP=_padded(d), BT=bt, **launch)


def _launch_fused(qp, dop, dk, dv, lse, delta, dqacc, cfg: FusedBwdConfig, dq_tma: bool) -> None:
    B, H, N, d = qp.shape
    assert qp.stride() == dop.stride() and dk.stride() == dv.stride()
    assert dqacc.is_contiguous() and dqacc.shape == (B * H, N, d)
    dp = _padded(d)
    desc = dqacc
    if dq_tma:
        desc = TensorDescriptor(dqacc, list(dqacc.shape), list(dqacc.stride()),
                                [1, cfg.block_m, dp])
    mprec = _precisions(qp.dtype, not qp.is_cuda)[0]
    _prope_bwd_fused[(triton.cdiv(N, cfg.block_n), B * H)](
        qp, dop, dk, dv, lse, delta, dqacc, desc,
        qp.stride(0), qp.stride(1), qp.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        H, N, LOG2E / math.sqrt(d), 1.0 / math.sqrt(d),
        D=d, DP=dp, BM=cfg.block_m, BN=cfg.block_n, MPREC=mprec, DQ_TMA=dq_tma, DQ_T=cfg.dq_t,
        **_launch(qp, cfg))


def _fused_with_fallback(q: Tensor, launch) -> FusedBwdConfig:
    """launch(cfg) with the configured blocks; if the compiler runs out of shared memory or
    registers (e.g. fp32 at d = 128), smaller configs. Returns the config that ran. Nothing has
    been launched (DQACC is still zero) when the compiler raises."""
    d = q.shape[-1]
    want = _config(d, not q.is_cuda)
    key = (d, q.dtype, want)
    cfg = _fell_back.get(key, want)
    try:
        launch(cfg)
        return cfg
    except triton.runtime.errors.OutOfResources:
        if not q.is_cuda:
            raise
    for fb in (_C(cfg.block_m, cfg.block_n, cfg.num_warps, 2, cfg.dq_t),) + _FALLBACKS:
        try:
            launch(fb)
        except triton.runtime.errors.OutOfResources:
            continue
        _fell_back[key] = fb
        return fb
    raise RuntimeError(f"prope_attention: no launch config of the fused backward kernel fits "
                       f"d={d}, {q.dtype}")


def backward_fused(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                   g: _Geometry, cfg: Optional[FusedBwdConfig] = None,
                   dq_tma: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of PRoPE attention, like `prope_triton._backward`.

    q, k, v, o, do: (B, h, N, d) with a contiguous last dim (q, k, v as `_dense` leaves them);
    lse: (B, h, N) fp32 log2-sum-exp from `prope_triton._forward`; g: its `_Geometry`.
    cfg: launch config (no fallback when given: an OutOfResources error propagates); default:
    `set_config`'s override or the per-head-dim default, with smaller fallbacks.
    dq_tma: TMA reduce-add for dq (default: when `dq_tma_available`); True where it is not
    available raises ValueError.
    """
    B, H, N, d = q.shape
    if dq_tma is None:
        dq_tma = dq_tma_available(q)
    elif dq_tma and not dq_tma_available(q):
        raise ValueError("backward_fused: dq_tma=True needs a compiled (not interpreted) CUDA "
                         "device of compute capability >= 9 and triton tensor-descriptor "
                         "atomics")
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if dk.stride() != dv.stride():
        dk, dv = dk.contiguous(), dv.contiguous()
    dop = torch.empty_like(dq)      # q' (in dq) and do' share strides
    _transform(q, dq, g, QT, False)     # q' lives in the dq buffer until dq replaces it
    _transform(k, dk, g, KV, False)     # k', v' in the dk / dv buffers
    _transform(v, dv, g, KV, False)
    _transform(do, dop, g, QT, False)
    delta = torch.empty_like(lse)
    _launch_delta(o, do, delta)
    dqacc = torch.zeros(B * H, N, d, dtype=torch.float32, device=q.device)

    def launch_with(c: FusedBwdConfig) -> None:
        _launch_fused(dq, dop, dk, dv, lse, delta, dqacc, c, dq_tma)

    if cfg is not None:
        launch_with(cfg)
    else:
        _fused_with_fallback(q, launch_with)
    # dq = D dq': dq' rounded to dq's dtype first, then transformed in place (as dk, dv: two
    # 16-bit roundings). Transforming the fp32 accumulator directly would run `_transform`'s
    # dots at fp32 (ieee) precision: about 0.1 ms more at d = 64, 1.2 ms at d = 128 (H100).
    dq.copy_(dqacc.view(B, H, N, d))
    _transform(dq, dq, g, OUT, True)
    _transform(dk, dk, g, GKV, True)    # dk = D^-T dk', in place
    _transform(dv, dv, g, GKV, True)
    return dq, dk, dv
