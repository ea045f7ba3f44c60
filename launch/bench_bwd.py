"""Backward benchmark (GPU): the two-kernel PRoPE backward against the one-kernel (atomic-dq)
one per launch config, dq by per-element atomics and by TMA reduce-add (where it runs).

    python launch/bench_bwd.py [--all] [--out DIR]

Shape B 2, 16 heads, 8 views of 36x36 (N = 10368), bf16, d = 64 (--all: also 128 and 48). Per
variant: the median time of the whole backward (all passes and allocations), TFLOP/s counting
2.5 x 4 B h N^2 d, and the relative difference of dq / dk / dv from the two-kernel backward
(kernels/prope/sweeps.py `time_backwards`; candidates `ATOMIC_CANDIDATES`). A variant that
fails to compile or run is an error row. Writes DIR/bench_bwd.json after every shape (DIR:
--out, else $OUT, else the working directory); prints the table last.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kernels.benchmarking import env_info, markdown_table, require_cuda, write_results
from kernels.prope.bench import SHAPES
from kernels.prope.sweeps import time_backwards


def table(log: list) -> str:
    rows = []
    for r in log:
        cfg = "defaults" if r["cfg"] is None else ", ".join(f"{k}={v}" for k, v in r["cfg"].items())
        if "ms" not in r:
            rows.append([r["shape"], r["variant"], cfg, f"failed: {r['error'][:60]}", "", ""])
            continue
        err = " / ".join(f"{x:.1e}" for x in r["rel_vs_two_kernel"].values())
        rows.append([r["shape"], r["variant"], cfg, f"{r['ms']:.3f}", f"{r['tflops']:.0f}", err])
    return markdown_table(("shape", "backward", "config", "ms", "TFLOP/s",
                           "rel diff dq / dk / dv"), rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also d = 128 and d = 48")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    require_cuda("launch/bench_bwd.py")
    names = ["d64"] + (["head_d128", "backbone_d48"] if args.all else [])
    log, t0 = [], time.time()
    result = dict(env=env_info(), dtype="bfloat16", results=log)
    path = Path(args.out) / "bench_bwd.json"
    for name in names:
        time_backwards(name, SHAPES[name], log)
        result["seconds"] = time.time() - t0
        write_results(path, result)
    print(table(log))
    print(f"total {result['seconds']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
