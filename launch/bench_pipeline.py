"""Novel-view pipeline speed on one GPU, per stage, with the release-size networks.

One view set (default 8 views at 504 x 504: 4 sources, 4 targets) through `NVSPipeline`:
DA3-Base encode of the sources, 50-point Euler sampling with CFG 1.5 (49 updates, conditional
and camera-dropped branches as one batch) of the 783M DiT-DH, propagation to levels 2 and 3,
the 422.5M RGB decoder on the targets and DA3's depth / ray head and camera decoder on every
view. Random weights (the published files cannot be downloaded here; speed does not depend on
the values). Seconds per stage (CUDA-synchronised, the second of two runs, the first warming
up / compiling), total, and peak memory; eager and with the DiT's blocks compiled.

    python launch/bench_pipeline.py --out launch/results/bench_pipeline_h200_DATE.json
"""
from __future__ import annotations

import argparse

import torch

from gld.diffusion import SamplerConfig
from gld.encoders.da3 import DA3
from gld.encoders.da3.measure import randomize_
from gld.latents.space import LatentSpace
from gld.models import DiTDH, RGBDecoder, decoder_preset, dit_preset
from gld.pipeline import STAGES, NVSPipeline
from kernels.benchmarking import PeakMemory, env_info, markdown_table, require_cuda, write_results


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="504x504", help="HxW")
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50, help="sampler time points")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--out", default=None, help="JSON results file")
    return ap.parse_args(argv)


def cameras(n: int, H: int, W: int):
    """(1, n, 3, 3) K and (1, n, 4, 4) c2w on a small arc looking at the origin."""
    K = torch.tensor([[0.9 * W, 0, W / 2], [0, 0.9 * W, H / 2], [0, 0, 1.0]]).expand(1, n, 3, 3)
    c2w = torch.eye(4).repeat(1, n, 1, 1)
    ang = torch.linspace(-0.3, 0.3, n)
    c2w[0, :, 0, 0], c2w[0, :, 0, 2] = torch.cos(ang), torch.sin(ang)
    c2w[0, :, 2, 0], c2w[0, :, 2, 2] = -torch.sin(ang), torch.cos(ang)
    c2w[0, :, 0, 3], c2w[0, :, 2, 3] = -2 * torch.sin(ang), -2 * torch.cos(ang) + 2
    return K.contiguous(), c2w


def main(argv=None) -> None:
    args = parse(argv)
    require_cuda("launch/bench_pipeline.py")
    H, W = (int(s) for s in args.size.split("x"))
    torch.manual_seed(0)
    space = LatentSpace(randomize_(DA3("da3-base")), 1, None)
    dit = DiTDH(dit_preset("level1"))
    for p in dit.parameters():                  # non-zero adaLN: a representative velocity
        torch.nn.init.normal_(p, std=0.02)
    pipe = NVSPipeline(space, dit, RGBDecoder(decoder_preset("xl")), time_shift=31.18,
                       sampler=SamplerConfig(steps=args.steps, cfg_scale=1.5)).cuda()
    S, T = args.sources, args.targets
    K, c2w = cameras(S + T, H, W)
    images = torch.rand(1, S, 3, H, W)
    inputs = (images, K[:, :S], c2w[:, :S], K[:, S:], c2w[:, S:])
    result = dict(env=env_info(), args=vars(args), rows=[])
    for mode in args.modes.split(","):
        if mode == "compile":
            pipe.compile()
        pipe(*inputs, seed=0)                   # warm-up (and compilation)
        with PeakMemory() as mem:
            out = pipe(*inputs, seed=0)
        row = dict(mode=mode, **{k: round(v, 4) for k, v in out.timings.items()},
                   peak_gib=round(mem.mib / 1024, 2),
                   peak_total_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   finite=bool(torch.isfinite(out.images).all() and torch.isfinite(out.depth).all()))
        result["rows"].append(row)
        print(row, flush=True)
        if args.out:
            write_results(args.out, result)
    print(markdown_table(["mode", *STAGES, "total s", "peak GiB (above weights)",
                          "peak GiB (total)"],
                         [[r["mode"], *[f"{r[s]:.3f}" for s in STAGES], f"{r['total']:.2f}",
                           f"{r['peak_gib']:.1f}", f"{r['peak_total_gib']:.1f}"]
                          for r in result["rows"]]))


if __name__ == "__main__":
    main()
