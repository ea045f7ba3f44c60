"""Warp-specialised forward benchmark (GPU): the no-grad forward of each candidate launch config
of the warp-specialised kernel against the pre-pass forward, with each one's peak memory above
the inputs and its output's relative difference from the pre-pass forward's
(kernels/prope/sweeps.py `time_ws_configs`; candidates `WS_CANDIDATES`). Prints a line per
config and rewrites the JSON (atomically) after each shape.

    python launch/bench_fwd_ws.py [--shapes d64,head_d128] [--out FILE]
"""
from __future__ import annotations

import argparse

from kernels.benchmarking import env_info, markdown_table, require_cuda, write_results
from kernels.prope.bench import SHAPES
from kernels.prope.sweeps import time_ws_configs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="d64,head_d128", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    require_cuda("launch/bench_fwd_ws.py")
    rows: list = []
    result = dict(env=env_info(), dtype="bfloat16", rows=rows)
    for name in args.shapes.split(","):
        time_ws_configs(name, SHAPES[name], rows)
        if args.out:
            write_results(args.out, result)
    print(markdown_table(
        ("shape", "kernel", "config", "ms", "TFLOP/s", "peak MiB", "rel diff vs prepass"),
        [[r["shape"], r["kernel"], r["config"] or "", f"{r['ms']:.3f}", f"{r['tflops']:.0f}",
          f"{r['peak_mib']:.0f}", f"{r['rel_vs_prepass']:.1e}"] if "ms" in r else
         [r["shape"], r["kernel"], r["config"] or "", f"failed: {r['error'][:60]}", "", "", ""]
         for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
