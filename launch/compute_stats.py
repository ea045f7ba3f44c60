"""Per-channel statistics of the latent levels over the training stream, saved as safetensors.

    python launch/compute_stats.py --config configs/gld_da3_base.yaml --batches 500 \
        --out runs/gld/latent_stats.safetensors [--levels all] [--batch-size 48] [--latent.x=...]
    torchrun --nproc_per_node 8 launch/compute_stats.py ...        # the same statistics

The statistics of the raw levels (`[local | global]`, before DA3's final LayerNorm) over
`--batches` global batches of `--batch-size` samples (default data.batch_size) of the `train`
split; with R ranks (torchrun: gloo on CPU, NCCL on GPUs) each rank encodes batch-size / R of
every batch and the moments are merged exactly (gld/latents/collect.py says when the result is
independent of R). Rank 0 writes the file atomically and prints a JSON summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

from gld.config import load_config_or_exit
from gld.data.streaming import build_loader
from gld.latents import build_latent_space, save_stats
from gld.latents.collect import collect_stats


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML file (may use `extends:`)")
    ap.add_argument("--batches", type=int, required=True, help="global batches to read")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="samples per global batch, over all ranks (default data.batch_size)")
    ap.add_argument("--levels", default="boundary",
                    help="'boundary' (latent.boundary_level), 'all', or a list such as 0,1")
    ap.add_argument("--encode-batch", type=int, default=1,
                    help="samples per encoder call (a shape independent of the rank count)")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if any), cpu, cuda")
    return ap.parse_known_args(argv)


def levels_from(arg: str, boundary: int) -> list[int]:
    if arg == "boundary":
        return [boundary]
    if arg == "all":
        return [0, 1, 2, 3]
    try:
        levels = sorted({int(v) for v in arg.split(",")})
    except ValueError:
        raise SystemExit(f"--levels: expected 'boundary', 'all' or levels like 0,1; got {arg!r}")
    if not all(0 <= lv <= 3 for lv in levels):
        raise SystemExit(f"--levels: levels must be in 0..3, got {levels}")
    return levels


def main(argv=None) -> None:
    args, overrides = parse(argv)
    cfg = load_config_or_exit(args.config, overrides)
    if not args.out.endswith(".safetensors"):
        sys.exit(f"--out: expected a .safetensors path, got {args.out!r}")
    levels = levels_from(args.levels, cfg.latent.boundary_level)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    batch_size = args.batch_size or cfg.data.batch_size
    if batch_size % (world * args.encode_batch):
        sys.exit(f"--batch-size {batch_size} must be a multiple of ranks x --encode-batch = "
                 f"{world} x {args.encode_batch}")

    # The statistics are what normalisation needs, so the space is built without any.
    space = build_latent_space(dataclasses.replace(cfg.latent, normalize=False, stats=[]),
                               device=device)
    loader = build_loader(dataclasses.replace(cfg.data, batch_size=batch_size // world), "train")
    info = {"config": str(args.config), "name": cfg.name, "data_source": cfg.data.source,
            "data_paths": ",".join(cfg.data.paths), "data_seed": str(cfg.data.seed),
            "resolutions": json.dumps([list(r) for r in cfg.data.resolutions]),
            "num_views": str(cfg.data.num_views), "batches": str(args.batches),
            "batch_size": str(batch_size), "samples": str(args.batches * batch_size),
            "weights": str(cfg.latent.weights), "ranks": str(world)}
    stats = collect_stats(space, loader, args.batches, levels, args.encode_batch, info)
    if rank == 0:
        path = save_stats(stats, args.out)
        print(json.dumps({"out": str(path), "encoder": stats.encoder, "levels": list(stats.levels),
                          "count": stats.count.tolist(), "samples": args.batches * batch_size,
                          "ranks": world}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
