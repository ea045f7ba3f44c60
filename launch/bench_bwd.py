"""Backward benchmark (GPU): prope_triton's two-kernel backward against the fused single-pass one.

    PYTHONPATH=$PWD python3 launch/bench_bwd.py [--all] [--out DIR]

Shape B 2, 16 heads, 8 views of 36x36 (N = 10368), bf16, d = 64 (--all: also 128 and 48).
Variants: `prope_triton._backward` (current defaults), and `prope_triton_bwd.backward_fused`
for each config of SWEEP_CONFIGS[padded d], dq added per element (tma=0) and by TMA reduce-add
(tma=1, where available). For each: the median time of the whole backward (all passes and
allocations, triton.testing.do_bench), TFLOP/s counting 2.5 * 4 B h N^2 d, the fused kernel alone
(its 2 input restores subtracted), and the relative error of dq / dk / dv against the current
backward. A variant that fails to compile or run is printed and skipped. Writes
DIR/bench_bwd.json (DIR: --out, else $OUT, else the working directory); prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_kernels import SHAPES, env_info, flops, make, rel  # noqa: E402

from kernels import prope_triton as pt  # noqa: E402
from kernels import prope_triton_bwd as fb  # noqa: E402


def timed(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_shape(name, shape, log):
    q, k, v, w2c, K, patches, image = make(shape, torch.bfloat16, seed=2)
    d = q.shape[-1]
    dp = pt._padded(d)
    g = pt._geometry(w2c, K, patches, image, d, q.device)
    o, lse = pt._forward(q, k, v, g)
    do = torch.randn_like(q)
    fl = 2.5 * flops(shape)
    ref = pt._backward(q, k, v, o, lse, do, g)
    torch.cuda.synchronize()

    # Inputs of the fused kernel alone (it overwrites k', v' in dk / dv: restored before each run).
    kp, vp, qp, dop = (torch.empty_like(t) for t in (k, v, q, q))
    for x, y, which in ((k, kp, pt.KV), (v, vp, pt.KV), (q, qp, pt.QT), (do, dop, pt.QT)):
        pt._transform(x, y, g, which, False)
    delta = (o.float() * do.float()).sum(-1)
    dk, dv = torch.empty_like(kp), torch.empty_like(vp)
    dqacc = torch.zeros(q.shape[0] * q.shape[1], q.shape[2], d, dtype=torch.float32,
                        device=q.device)

    def restore():
        dk.copy_(kp)
        dv.copy_(vp)
    restore_ms = timed(restore)

    variants = [("current _backward", None, None)]
    tmas = [False] + ([True] if fb.dq_tma_available(q) else [])
    if len(tmas) == 1:
        print(f"{name}: no TMA reduce-add here, tma=1 variants skipped", flush=True)
    for cfg in fb.SWEEP_CONFIGS[dp]:
        for tma in tmas:
            variants.append((f"fused {tuple(vars(cfg).values())} tma={int(tma)}", cfg, tma))
    for label, cfg, tma in variants:
        if cfg is None:
            def full():
                return pt._backward(q, k, v, o, lse, do, g)
            kernel = None
        else:
            def full(cfg=cfg, tma=tma):
                return fb.backward_fused(q, k, v, o, lse, do, g, cfg=cfg, dq_tma=tma)

            def kernel(cfg=cfg, tma=tma):
                restore()
                fb._launch_fused(qp, dop, dk, dv, lse, delta, dqacc, cfg, tma)
        row = dict(shape=name, d=d, variant=label,
                   cfg=None if cfg is None else list(vars(cfg).values()), dq_tma=tma)
        try:
            t0 = time.time()
            got = full()
            torch.cuda.synchronize()
            row["first_call_s"] = time.time() - t0
            row["rel_err"] = {n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, ref)}
            del got
            row["ms"] = timed(full)
            row["tflops"] = fl / row["ms"] * 1e-9
            if kernel is not None:
                row["kernel_ms"] = timed(kernel) - restore_ms
        except Exception as e:  # compile error, out of shared memory / registers: skip
            row["error"] = repr(e)[:300]
            print(f"{name} {label}: FAILED {repr(e)[:200]}", flush=True)
            log.append(row)
            continue
        log.append(row)
        err = " ".join(f"{n} {x:.1e}" for n, x in row["rel_err"].items())
        kms = f" kernel {row['kernel_ms']:.3f} ms" if "kernel_ms" in row else ""
        print(f"{name} {label}: {row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s{kms} | "
              f"vs current: {err} (first call {row['first_call_s']:.1f} s)", flush=True)


def table(log):
    lines = ["| shape | variant | bwd ms | bwd TFLOP/s | fused kernel ms | rel err dq / dk / dv |",
             "|---|---|---|---|---|---|"]
    for r in log:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | failed: {r['error'][:60]} | | | |")
            continue
        err = " / ".join(f"{x:.1e}" for x in r["rel_err"].values())
        kms = f"{r['kernel_ms']:.3f}" if "kernel_ms" in r else ""
        lines.append(f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{kms} | {err} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also d = 128 and d = 48")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_bwd.py needs a CUDA device")
    names = ["d64"] + (["head_d128", "backbone_d48"] if args.all else [])
    log = []
    t0 = time.time()
    for name in names:
        run_shape(name, SHAPES[name], log)
    result = dict(env=env_info(), seconds=time.time() - t0, results=log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bwd.json").write_text(json.dumps(result, indent=1))
    print(table(log))
    print(f"total {result['seconds']:.0f} s; wrote {out / 'bench_bwd.json'}")


if __name__ == "__main__":
    main()
