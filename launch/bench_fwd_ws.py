"""Time the warp-specialised no-scratch forward (kernels/prope_fwd_ws.py) per launch config
(`WS_CONFIGS`) against the pre-pass forward, with each one's peak memory and its output's
relative difference from the pre-pass forward's; prints a line per config, and rewrites the JSON
(atomically) after each one.

    PYTHONPATH=. python launch/bench_fwd_ws.py [--shapes d64,head_d128] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bwd import timed  # noqa: E402
from profile_kernels import SHAPES, env_info, flops, make, peak_above, rel, start  # noqa: E402

from kernels import prope_fwd_ws as ws  # noqa: E402
from kernels import prope_triton as pt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="d64,head_d128", help=f"of {sorted(SHAPES)}")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    env = env_info()
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        q, k, v, w2c, K, patches, image = make(shape, torch.bfloat16)
        d = q.shape[-1]
        g = pt._geometry(w2c, K, patches, image, d, "cuda")
        fl = flops(shape)
        with torch.no_grad():
            ref, _ = pt._forward(q, k, v, g)
            for kernel, cfg in [("prepass", None)] + [("ws", c) for c in ws.WS_CONFIGS]:
                try:
                    if cfg is None:
                        fn = lambda: pt._forward(q, k, v, g)
                    else:
                        ws.set_ws_config(d, cfg)
                        fn = lambda: ws.forward_ws(q, k, v, g)
                    err = rel(fn()[0], ref)
                    ms = timed(fn)
                    base = start()
                    out = fn()
                    mib = peak_above(base) / 2**20
                    del out
                    rows.append(dict(shape=name, kernel=kernel, config=cfg, ms=ms,
                                     tflops=fl / ms * 1e-9, peak_mib=mib, rel_vs_prepass=err))
                except Exception as e:   # a config that does not compile / fit: say why
                    rows.append(dict(shape=name, kernel=kernel, config=cfg,
                                     error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                finally:
                    ws.set_ws_config(d, None)
                r = rows[-1]
                print(f"{name:10s} {kernel:8s} {str(cfg):34s} " + (
                    f"{r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s {r['peak_mib']:7.1f} MiB "
                    f"rel {r['rel_vs_prepass']:.2e}" if "ms" in r else r["error"]), flush=True)
                if a.out:   # after every row, whole or not at all: a time limit keeps the rows
                    tmp = Path(a.out + ".tmp")
                    tmp.write_text(json.dumps(dict(env=env, dtype="bfloat16", rows=rows), indent=1))
                    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
