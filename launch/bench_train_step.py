"""Training-step and sampling speed of DiT-DH on one GPU (prints a table, writes JSON).

One step = forward + flow-matching loss + backward + AdamW (fused), bf16 autocast over fp32
weights as the release trains, on random latents and cameras already on the GPU (no encoder,
no data loading): samples/s, model FLOPs utilisation against the bf16 matmul ceiling measured
in the same run (FLOPs counted as gld/models/measure.py says), peak memory; per attention path
and batch size. `--sample` also times one CFG sample (Euler, 50 time points, conditional and
camera-dropped branches as one batch) of one view set in bf16.

    python launch/bench_train_step.py --preset level1 --batches 1,2,4,8 --paths fused,sdpa_core --sample
"""
from __future__ import annotations

import argparse
import time

import torch

from gld.diffusion import SamplerConfig, flow_loss, initial_noise, interpolate, sample
from gld.models import DiTDH, dit_preset
from gld.models.measure import random_batch, train_flops_per_sample
from kernels.benchmarking import (PeakMemory, env_info, markdown_table, matmul_ceiling_tflops,
                                  require_cuda, write_results)
from kernels.prope.configs import PRoPEKernels

PATHS = {  # name: (kernels.attention backend, PRoPE kernel choice)
    "fused": ("auto", PRoPEKernels(core="fused")),
    "sdpa_core": ("auto", PRoPEKernels(core="sdpa")),
    "auto": ("auto", None),
    "reference": ("reference", None),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="level1")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--size", default="504x504", help="HxW in pixels")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--paths", default="fused,sdpa_core", help=",".join(PATHS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile every block")
    ap.add_argument("--sample", action="store_true", help="also time one 50-step CFG sample")
    ap.add_argument("--out", default="bench_train_step.json")
    return ap.parse_args(argv)


def time_steps(model, opt, batch, image_size, steps, warmup) -> float:
    """Seconds per optimizer step (median-free: the mean over `steps` after `warmup`)."""
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x_t = interpolate(batch["x"], batch["eps"], batch["t"])
            v = model(x_t, batch["t"], source=batch["source"], is_src=batch["is_src"],
                      c2w=batch["c2w"], K=batch["K"], image_size=image_size)
        flow_loss(v, batch["x"], batch["eps"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def time_sample(model, image_size, views) -> float:
    batch = random_batch(model, 1, views, image_size)
    cond = {k: batch[k] for k in ("source", "is_src", "c2w", "K")}

    def denoiser(x, t, drop):
        rep = x.shape[0]
        kw = {k: v.expand(rep, *v.shape[1:]) for k, v in cond.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, t, image_size=image_size, drop_camera=drop, **kw)
    noise = initial_noise(tuple(batch["x"].shape), seed=0, device="cuda")
    run = lambda: sample(denoiser, noise, 31.18, SamplerConfig(steps=50, cfg_scale=1.5))  # noqa: E731
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse(argv)
    require_cuda("launch/bench_train_step.py")
    H, W = (int(s) for s in args.size.split("x"))
    result = dict(env=env_info(), args=vars(args), ceiling_tflops=matmul_ceiling_tflops(), rows=[])
    torch.manual_seed(0)
    model = DiTDH(dit_preset(args.preset, camera_dropout=0.1)).cuda().train()
    if args.compile:
        for blk in model.blocks:
            blk.compile()
    flops = train_flops_per_sample(model, args.views, (H // 14) * (W // 14))
    for path in args.paths.split(","):
        model.set_attention_backend(*PATHS[path])
        for bs in (int(b) for b in args.batches.split(",")):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
            row = dict(path=path, batch=bs)
            try:
                batch = random_batch(model, bs, args.views, (H, W))
                with PeakMemory() as mem:
                    sec = time_steps(model, opt, batch, (H, W), args.steps, args.warmup)
                row.update(step_ms=1e3 * sec, samples_per_s=bs / sec, peak_gib=mem.mib / 1024,
                           mfu=flops * bs / sec / 1e12 / result["ceiling_tflops"])
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            del opt
            torch.cuda.empty_cache()
            result["rows"].append(row)
            print(row, flush=True)
            write_results(args.out, result)
        if args.sample:
            model.eval()
            result["rows"].append(dict(path=path, sample_50_s=time_sample(model, (H, W),
                                                                           args.views)))
            model.train()
            print(result["rows"][-1], flush=True)
            write_results(args.out, result)
    print(f"ceiling {result['ceiling_tflops']:.0f} TFLOP/s, {flops / 1e12:.1f} TFLOP per sample")
    print(markdown_table(
        ["path", "batch", "samples/s", "step ms", "MFU", "peak GiB", "50-step CFG sample s"],
        [[r["path"], r.get("batch", ""), f"{r['samples_per_s']:.2f}" if "samples_per_s" in r
          else r.get("error", ""), f"{r['step_ms']:.0f}" if "step_ms" in r else "",
          f"{100 * r['mfu']:.1f}%" if "mfu" in r else "",
          f"{r['peak_gib']:.1f}" if "peak_gib" in r else "",
          f"{r['sample_50_s']:.2f}" if "sample_50_s" in r else ""] for r in result["rows"]]))


if __name__ == "__main__":
    main()
