"""Where a training step's time goes: the trainer's own step, timed per phase (prints a table,
writes JSON).

The stage, loader, DeepSpeed engine and EMA are built as `launch/train.py` builds them
(gld.train.job.build_trainer); each
phase is then timed with the device synchronised before and after it (so the phases add up to
a step slightly slower than the unsynchronised one `launch/bench_train.py` reports): waiting for
the loader (and the batch's copy to the device), the frozen encoder, the forward and loss, the
backward (DeepSpeed's gradient hooks included), the optimizer step (clipping, ZeRO's partition
copies) and the EMA. Medians over the steps after `--skip` (compilation and warm-up). Also
counts the trainable parameters whose storage is not 16-byte aligned (compiled blocks need 0).

    python launch/bench_train_phases.py --config configs/bench_level1.yaml --steps 12 \
        -- --train.compile=true --data.batch_size=2 --data.paths=[/tmp/gld-shards]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from dataclasses import replace

import torch

from gld.config import load_config_or_exit
from gld.train.engine import misaligned_parameters
from gld.train.job import build_trainer
from kernels.benchmarking import env_info, markdown_table, write_results


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=4, help="first steps left out of the medians")
    ap.add_argument("--run-dir", default="/tmp/gld-bench-phases")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="after --: config overrides")
    return ap.parse_args(argv)


def timed(obj, name: str, key: str, times: dict, sync) -> None:
    """Replace obj.name by a wrapper that records its synchronised wall time under key."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        times[key].append(time.perf_counter() - t0)
        return out

    setattr(obj, name, wrapper)


def main(argv=None) -> None:
    args = parse(argv)
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    cfg = load_config_or_exit(args.config, args.overrides)
    cfg = replace(cfg, train=replace(cfg.train, out_dir=args.run_dir, resume="none",
                                     save_every=0))
    trainer = build_trainer(cfg, progress=False)             # as launch/train.py builds it
    stage, device = trainer.stage, trainer.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    misaligned = misaligned_parameters(trainer.engine.module)
    times: dict = defaultdict(list)
    timed(trainer, "next_batch", "loader", times, sync)
    if hasattr(stage, "inputs"):
        timed(stage, "inputs", "encoder", times, sync)
    timed(stage, "loss", "forward (with encoder)", times, sync)
    timed(trainer.engine, "backward", "backward", times, sync)
    timed(trainer.engine, "step", "optimizer step", times, sync)
    if trainer.ema is not None:
        timed(trainer.ema, "update", "EMA", times, sync)
    steps = []
    for s in range(1, args.steps + 1):
        sync()
        t0 = time.perf_counter()
        trainer.train_step(s)
        trainer.step = s
        sync()
        steps.append(time.perf_counter() - t0)
    batch = cfg.data.batch_size * cfg.train.grad_accum
    med = {k: 1e3 * statistics.median(v[args.skip * len(v) // args.steps:])
           for k, v in times.items()}
    step_ms = 1e3 * statistics.median(steps[args.skip:])
    result = dict(env=env_info(["deepspeed"]), args=vars(args), batch=batch, step_ms=step_ms,
                  samples_per_s=1e3 * batch / step_ms, phases_ms=med,
                  misaligned_params=misaligned,
                  peak_mem_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None))
    print(markdown_table(["phase", "ms per step"],
                         [[k, f"{v:.1f}"] for k, v in med.items()]
                         + [["whole step (synchronised)", f"{step_ms:.1f}"]]))
    print(f"{result['samples_per_s']:.2f} samples/s; {len(misaligned)} misaligned parameters")
    if args.out:
        write_results(args.out, result)


if __name__ == "__main__":
    main()
