"""Launch-config sweeps of the fused PRoPE kernels (GPU): each kernel timed alone per candidate
config, through the config dataclasses of configs.py (a config given in `PRoPEKernels` runs as
given: one that does not fit is an error row, not a silent fallback).

- `sweep_blocks`: the pre-pass forward's attention kernel, the dq and dk/dv kernels (TMA on and
  off) and the transform pass (launch/profile_kernels.py --sweep);
- `time_backwards`: the two-kernel backward against the one-kernel one per config, dq by
  per-element atomics and by TMA reduce-add (launch/bench_bwd.py);
- `time_ws_configs`: the warp-specialised forward per config against the pre-pass forward
  (launch/bench_fwd_ws.py).
The candidates are the configs that won, or came within a few per cent, in the recorded H100
sweeps (launch/results/prope_kernels_history.md); the defaults are among them.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from kernels.benchmarking import PeakMemory, rel_error, tflops, time_ms
from kernels.prope.backward import (backward_atomic, backward_two_kernel, dq_tma_available,
                                    launch_dkdv, launch_dq)
from kernels.prope.bench import BACKWARD_FLOPS, Shape, attention_flops, make_inputs
from kernels.prope.configs import (AtomicConfig, BlockConfig, PRoPEKernels, TransformConfig,
                                   WSConfig, default_config, padded)
from kernels.prope.core import KV, QT, geometry, transform
from kernels.prope.forward import forward_prepass, launch_attention
from kernels.prope.forward_ws import forward_ws

__all__ = ["BLOCK_CANDIDATES", "TRANSFORM_CANDIDATES", "ATOMIC_CANDIDATES", "WS_CANDIDATES",
           "sweep_blocks", "time_backwards", "time_ws_configs"]

_B = BlockConfig
BLOCK_CANDIDATES = {
    "prepass": [_B(128, 64, 4, 3), _B(128, 64, 4, 4), _B(128, 128, 4, 3), _B(128, 128, 8, 3),
                _B(128, 64, 8, 3)],
    "dq": [_B(128, 64, 4, 3), _B(128, 64, 4, 4), _B(128, 32, 4, 4), _B(128, 128, 8, 3)],
    "dkdv": [_B(32, 128, 4, 4), _B(32, 128, 4, 5), _B(64, 64, 4, 3), _B(64, 128, 8, 3),
             _B(32, 64, 4, 4), _B(64, 128, 4, 3)],
}
TRANSFORM_CANDIDATES = [TransformConfig(64, 4), TransformConfig(32, 4), TransformConfig(128, 4),
                        TransformConfig(64, 8), TransformConfig(128, 8), TransformConfig(32, 2)]
# per padded head dim; H100 whole backward at d = 64: 5.82 / 5.94 ms, d = 48: 5.93 / 5.92
ATOMIC_CANDIDATES = {64: [AtomicConfig(32, 128, 4, 4), AtomicConfig(32, 128, 4, 3)],
                     128: [AtomicConfig(64, 128, 8, 3)]}
# per head dim: the defaults, and at d = 64 the one config that matched it (320 against 319
# TFLOP/s on the H100: producer-side query / output transforms, no ping-pong)
WS_CANDIDATES = {48: [default_config("ws", 48)],
                 64: [default_config("ws", 64), WSConfig(192, 120, False, True, True, False)],
                 128: [default_config("ws", 128)]}
# share of the backward's FLOPs each kernel does (for its TFLOP/s column)
_SHARE = {"prepass": 1.0, "dq": 1.0, "dkdv": 1.5}


def _timed(fn: Callable) -> float:
    return time_ms(fn, warmup=25, rep=100)


def _try(row: dict, fn: Callable) -> Optional[float]:
    """Milliseconds of fn (first call timed separately as compile_s) into row, or the error."""
    try:
        t0 = time.time()
        fn()
        torch.cuda.synchronize()
        row["compile_s"] = time.time() - t0
        row["ms"] = _timed(fn)
        return row["ms"]
    except Exception as e:   # out of shared memory / registers, compile error: record, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return None


def sweep_blocks(shape: Shape, dtype: torch.dtype, log: list,
                 kinds: Optional[list] = None) -> PRoPEKernels:
    """Time each of `kinds` (default all: "prepass", "dq", "dkdv", "transform") alone per
    candidate config, rows appended to log; returns the choice with the fastest of each."""
    q, k, v, w2c, K, patches, image = make_inputs(shape, dtype, seed=2)
    d = q.shape[-1]
    g = geometry(w2c, K, patches, image, d, q.device)
    o, lse = forward_prepass(q, k, v, g)
    do = torch.randn_like(q)
    kp, vp, qp, dop, dq = (torch.empty_like(t) for t in (k, v, q, q, q))
    xcfg = default_config("transform", d)
    for x, y, which in ((k, kp, KV), (v, vp, KV), (q, qp, QT), (do, dop, QT)):
        transform(x, y, g, which, False, xcfg)
    delta = torch.empty_like(lse)
    dk, dv = kp.clone(), vp.clone()
    runs = {"prepass": lambda c: launch_attention(q, kp, vp, o, lse, g, c),
            "dq": lambda c: launch_dq(qp, dop, kp, vp, o, do, dq, lse, delta, g, c),
            "dkdv": lambda c: launch_dkdv(qp, dop, dk, dv, lse, delta, c)}
    flop = attention_flops(shape)
    best = {}
    for kind, cands in BLOCK_CANDIDATES.items():   # dq before dkdv: it writes delta
        if kinds and kind not in kinds:
            continue
        for cfg in [BlockConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, tma)
                    for c in cands for tma in (True, False)]:
            row, choice = dict(kind=kind, d=d, cfg=vars(cfg)), PRoPEKernels(**{kind: cfg})
            ms = _try(row, lambda: runs[kind](choice))
            if ms is not None:
                row["tflops"] = tflops(_SHARE[kind] * flop, ms)
                if kind not in best or ms < best[kind][1]:
                    best[kind] = (cfg, ms)
            log.append(row)
            print(f"sweep {kind} d={d} {cfg}: " + (f"{ms:.3f} ms {row['tflops']:.0f} TFLOP/s"
                                                  if ms else row["error"]), flush=True)
    if not kinds or "transform" in kinds:
        for cfg in TRANSFORM_CANDIDATES:
            row = dict(kind="transform", d=d, cfg=vars(cfg))
            ms = _try(row, lambda: transform(k, kp, g, KV, False, cfg))
            if ms is not None:
                row["gbs"] = 2 * k.numel() * k.element_size() / ms * 1e-6
                if "transform" not in best or ms < best["transform"][1]:
                    best["transform"] = (cfg, ms)
            log.append(row)
            print(f"sweep transform d={d} {cfg}: " + (f"{ms:.3f} ms {row['gbs']:.0f} GB/s"
                                                     if ms else row["error"]), flush=True)
    return PRoPEKernels(**{kind: cfg for kind, (cfg, _) in best.items()})


def time_backwards(name: str, shape: Shape, log: list) -> None:
    """The whole backward (all passes and allocations): the two-kernel one (default configs),
    then the one-kernel one per candidate config and dq path; ms, TFLOP/s and the relative
    difference of dq / dk / dv from the two-kernel one, rows appended to log."""
    q, k, v, w2c, K, patches, image = make_inputs(shape, torch.bfloat16, seed=2)
    d = q.shape[-1]
    g = geometry(w2c, K, patches, image, d, q.device)
    o, lse = forward_prepass(q, k, v, g)
    do = torch.randn_like(q)
    ref = backward_two_kernel(q, k, v, o, lse, do, g)
    variants = [("two_kernel", lambda: backward_two_kernel(q, k, v, o, lse, do, g), None)]
    for cfg in ATOMIC_CANDIDATES[padded(d)]:
        for dq_tma in (False, True) if dq_tma_available(q) else (False,):
            c = PRoPEKernels(atomic=AtomicConfig(cfg.block_m, cfg.block_n, cfg.num_warps,
                                                 cfg.num_stages, dq_tma))
            variants.append(("atomic", lambda c=c: backward_atomic(q, k, v, o, lse, do, g, c),
                             c.atomic))
    for label, fn, cfg in variants:
        row = dict(shape=name, d=d, variant=label, cfg=None if cfg is None else vars(cfg))
        if _try(row, fn) is not None:
            row["tflops"] = tflops(BACKWARD_FLOPS * attention_flops(shape), row["ms"])
            row["rel_vs_two_kernel"] = {n: rel_error(a, b)
                                        for n, a, b in zip(("dq", "dk", "dv"), fn(), ref)}
        log.append(row)
        print(name, label, cfg, {k2: v2 for k2, v2 in row.items() if k2 in ("ms", "tflops",
                                                                            "error")}, flush=True)


def time_ws_configs(name: str, shape: Shape, rows: list) -> None:
    """The no-grad forward: pre-pass, then the warp-specialised one per candidate config of the
    shape's head dim; ms, TFLOP/s, peak memory above the inputs and the relative difference of
    o from the pre-pass forward's, rows appended to rows."""
    q, k, v, w2c, K, patches, image = make_inputs(shape, torch.bfloat16)
    d = q.shape[-1]
    g = geometry(w2c, K, patches, image, d, q.device)
    with torch.no_grad():
        ref, _ = forward_prepass(q, k, v, g)
        variants = [("prepass", None)] + [("ws", c) for c in WS_CANDIDATES[d]]
        for kernel, cfg in variants:
            def fn(cfg=cfg):
                return forward_ws(q, k, v, g, cfg) if cfg else forward_prepass(q, k, v, g)
            row = dict(shape=name, kernel=kernel, config=None if cfg is None else vars(cfg))
            if _try(row, fn) is not None:
                row["tflops"] = tflops(attention_flops(shape), row["ms"])
                row["rel_vs_prepass"] = rel_error(fn()[0], ref)
                with PeakMemory() as m:   # the peak, whether or not o is still held
                    fn()
                row["peak_mib"] = m.mib
            rows.append(row)
            print(name, kernel, cfg, {k2: v2 for k2, v2 in row.items()
                                      if k2 in ("ms", "tflops", "peak_mib", "error")}, flush=True)
