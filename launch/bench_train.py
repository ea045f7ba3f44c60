"""Whole training steps of a stage through launch/train.py, per setting (prints a table, JSON).

Each row is one `launch/train.py` run (a fresh process, the run's own DeepSpeed engine, the
frozen encoder in the step and the data streamed from shards by the loader), its metrics read
back from <run>/<stage>/metrics.jsonl: the LAST logged window (after compilation and warm-up):
samples/s, MFU (trainer's FLOP count against the device's dense bf16 peak), peak memory, and
per step the frozen encoder's time (encode_ms, CUDA-synchronised) and the time waiting for the
loader (data_ms). Give it enough scenes for many batches per epoch: each epoch starts the
loader's workers anew (~0.8 s with 6 workers), which a 2-batch epoch charges to every other step.

    python launch/prepare_data.py synthetic scenes=96,frames=12,size=504x504 /tmp/gld-shards
    python launch/bench_train.py --config configs/bench_level1.yaml \
        --rows "zero=2,ckpt=0,batch=4;zero=3,ckpt=0,batch=4;zero=2,ckpt=1,batch=8" \
        --out launch/results/bench_train_h200_DATE.json -- --data.paths=[/tmp/gld-shards]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kernels.benchmarking import env_info, markdown_table, write_results

KEYS = {"zero": "train.zero_stage", "ckpt": "train.activation_checkpointing",
        "batch": "data.batch_size", "compile": "train.compile", "accum": "train.grad_accum"}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rows", required=True, help="';'-separated rows of k=v (zero, ckpt, batch, "
                    "compile, accum)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--run-dir", default="/tmp/gld-bench-train")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="after --: more config overrides for every run")
    return ap.parse_args(argv)


def overrides(row: str) -> tuple[dict, list[str]]:
    spec = dict(kv.split("=", 1) for kv in row.split(",") if kv)
    unknown = set(spec) - set(KEYS)
    if unknown:
        raise SystemExit(f"--rows: unknown keys {sorted(unknown)}; use {sorted(KEYS)}")
    out = []
    for k, v in spec.items():
        v = {"1": "true", "0": "false"}.get(v, v) if k in ("ckpt", "compile") else v
        out.append(f"--{KEYS[k]}={v}")
    return spec, out


def last_window(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no logged step")
    return rows[-1]


def main(argv=None) -> None:
    args = parse(argv)
    result = dict(env=env_info(["deepspeed"]), args=vars(args), rows=[])
    for i, row in enumerate(args.rows.split(";")):
        spec, over = overrides(row)
        run = Path(args.run_dir) / f"row{i}"
        cmd = [sys.executable, "launch/train.py", "--config", args.config, "--no-progress",
               f"--train.out_dir={run}", f"--train.steps={args.steps}", "--train.resume=none",
               f"--train.log_every={args.log_every}", "--train.save_every=0", *over,
               *args.overrides]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc = None
        rec = dict(spec=spec, cmd=" ".join(cmd[1:]), wall_s=round(time.perf_counter() - t0, 1))
        if proc is None:
            rec["error"] = f"did not finish within --timeout {args.timeout} s"
        elif proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-1500:]
            rec["error"] = "out of memory" if "OutOfMemory" in tail else tail
        else:
            stage = next(p for p in run.iterdir() if (p / "metrics.jsonl").is_file())
            rec["metrics"] = last_window(stage / "metrics.jsonl")
        result["rows"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "cmd"})[:2000], flush=True)
        if args.out:
            write_results(args.out, result)

    def fmt(r, key, f):
        m = r.get("metrics")
        return f.format(m[key]) if m and m.get(key) is not None else r.get("error", "")[:40]

    print(markdown_table(
        ["ZeRO", "act. ckpt", "batch", "samples/s", "MFU", "peak GiB", "encoder ms/step",
         "loader ms/step", "loss"],
        [[r["spec"].get("zero", ""), r["spec"].get("ckpt", ""), r["spec"].get("batch", ""),
          fmt(r, "samples_per_s", "{:.2f}"), fmt(r, "mfu", "{:.1%}"),
          fmt(r, "peak_mem_gib", "{:.1f}"), fmt(r, "encode_ms", "{:.0f}"),
          fmt(r, "data_ms", "{:.1f}"), fmt(r, "loss", "{:.4f}")] for r in result["rows"]]))


if __name__ == "__main__":
    main()
