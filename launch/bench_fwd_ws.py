"""Time the warp-specialised no-scratch forward (kernels/prope_fwd_ws.py) per launch config
against the pre-pass forward, with each one's peak memory; prints a table and writes JSON.

    PYTHONPATH=. python launch/bench_fwd_ws.py [--d 64 128] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from kernels import prope_fwd_ws as ws
from kernels import prope_triton as pt
from tests.test_prope_ref import make_inputs


def _time(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--shape", default="2,16,8,36,36", help="B,h,V,ph,pw")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    B, H, V, ph, pw = (int(x) for x in a.shape.split(","))
    rows = []
    for d in a.d:
        q, k, v, w2c, K = make_inputs(B=B, h=H, V=V, patches=(ph, pw), d=d,
                                      image=(14 * ph, 14 * pw), seed=0)
        q, k, v = (t.to("cuda", torch.bfloat16) for t in (q, k, v))
        g = pt._geometry(w2c.cuda().float(), K.cuda().float(), (ph, pw), (14 * ph, 14 * pw), d,
                         "cuda")
        N = q.shape[2]
        flops = 4 * B * H * N * N * d
        with torch.no_grad():
            ref, _ = pt._forward(q, k, v, g)
            cands = [("prepass", None)] + [("ws", c) for c in ws.WS_CONFIGS]
            for name, cfg in cands:
                try:
                    if cfg is None:
                        fn = lambda: pt._forward(q, k, v, g)
                    else:
                        ws.set_ws_config(d, cfg)
                        fn = lambda: ws.forward_ws(q, k, v, g)
                    o, _ = fn()
                    err = ((o.double() - ref.double()).norm() / ref.double().norm()).item()
                    ms = _time(fn)
                    mib = _peak_mib(fn)
                    rows.append(dict(d=d, kernel=name, config=cfg, ms=ms,
                                     tflops=flops / ms / 1e9, peak_mib=mib, rel_vs_prepass=err))
                except Exception as e:   # a config that does not compile / fit: say why
                    rows.append(dict(d=d, kernel=name, config=cfg, error=f"{type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:120]}"))
                finally:
                    ws.set_ws_config(d, None)
                r = rows[-1]
                print(f"d={d:4d} {name:8s} {str(cfg):26s} " + (
                    f"{r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s {r['peak_mib']:7.1f} MiB "
                    f"rel {r['rel_vs_prepass']:.2e}" if "ms" in r else r["error"]), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                shape=dict(B=B, h=H, V=V, ph=ph, pw=pw), dtype="bfloat16")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
