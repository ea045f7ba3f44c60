"""Novel views of one scene folder: generated images, depth, a grid and a coloured point cloud.

    python launch/sample.py --model runs/tiny/model --scene SCENE --sources 0,4 --targets 2,6 \
        --out runs/tiny/samples/scene
    python launch/sample.py --model M --scene SCENE --sources 0,4 --target-cameras cams.npz ...
    python launch/sample.py --release-dit da3_level1.pt --release-dit-yaml DA3_level1.yaml \
        --release-decoder mae_decoder.pt --release-decoder-config config.json \
        --da3 DA3-BASE --stats normalization_stats_level1.pt [--dpt-head dpt_decoder.pt] ...

SCENE is a folder in the `npz_folder` format (<name>.png + <name>.npz with intrinsic, pose);
frames are named by file stem. Targets are frames of the scene (their images, when present,
become the grid's ground-truth row) or cameras from a file (gld/data/scene_files.py). Output:
gld/outputs.py. Bad input exits with a message naming the file and the problem.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from gld.checkpoints.loading import CheckpointError
from gld.configtypes import ConfigError
from gld.data.scene_files import SceneError, read_scene_views, read_target_cameras
from gld.diffusion import SamplerConfig
from gld.geometry.cameras import CameraError
from gld.outputs import write_nvs_outputs
from gld.pipeline import NVSPipeline


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="our model folder (launch/export.py)")
    rel = ap.add_argument_group("the release's files (instead of --model)")
    for name in ("release-dit", "release-dit-yaml", "release-decoder", "release-decoder-config",
                 "da3", "stats", "dpt-head"):
        rel.add_argument(f"--{name}")
    ap.add_argument("--da3-weights", help="DA3 weights for --model (default: its config's)")
    ap.add_argument("--scene", required=True, help="scene folder (npz_folder format)")
    ap.add_argument("--sources", required=True, help="source frame names, comma separated")
    tg = ap.add_mutually_exclusive_group(required=True)
    tg.add_argument("--targets", help="target frame names, comma separated")
    tg.add_argument("--target-cameras", help=".npz or .json file of target cameras")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="sampler time points")
    ap.add_argument("--cfg-scale", type=float, default=None)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks")
    ap.add_argument("--ply-stride", type=int, default=1, help="every n-th pixel in the PLY")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def names(arg: str) -> list[str]:
    out = [n.strip() for n in arg.split(",") if n.strip()]
    if not out:
        raise SceneError(f"no frame names in {arg!r}")
    return out


def build(args, device) -> NVSPipeline:
    if args.model:
        pipe = NVSPipeline.from_folder(args.model, device, da3_weights=args.da3_weights)
    else:
        need = ("release_dit", "release_dit_yaml", "release_decoder", "release_decoder_config",
                "da3", "stats")
        missing = [f"--{n.replace('_', '-')}" for n in need if getattr(args, n) is None]
        if missing:
            raise SystemExit(f"sample.py: give --model, or the release's files ({', '.join(missing)} "
                             "missing)")
        pipe = NVSPipeline.from_release(args.release_dit, args.release_dit_yaml,
                                        args.release_decoder, args.release_decoder_config,
                                        da3_weights=args.da3, stats=args.stats,
                                        dpt_head=args.dpt_head, device=device)
    changes = {k: v for k, v in (("steps", args.steps), ("cfg_scale", args.cfg_scale))
               if v is not None}
    if changes:
        pipe.sampler = SamplerConfig(**{**pipe.sampler.__dict__, **changes})
        pipe.sampler.validate("sampler")
    return pipe.compile() if args.compile else pipe


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    src = read_scene_views(args.scene, names(args.sources))
    if args.targets:
        tgt = read_scene_views(args.scene, names(args.targets))
        if tgt.size != src.size:
            raise SceneError(f"{args.scene}: targets are {tgt.size}, sources {src.size} (HxW)")
    else:
        tgt = read_target_cameras(args.target_cameras, src.size)
    pipe = build(args, device)
    t = lambda a: torch.from_numpy(a).float()[None]  # noqa: E731  (one scene: B = 1)
    out = pipe(t(src.images), t(src.K), t(src.c2w), t(tgt.K), t(tgt.c2w), seed=args.seed,
               progress=not args.no_progress)
    paths = write_nvs_outputs(out, args.out, src.names, tgt.names, ground_truth=tgt.images,
                              ply_stride=args.ply_stride)
    return {"out": args.out, "files": {k: str(v) for k, v in paths.items()},
            "timings_s": out.timings}


def main(argv=None) -> None:
    args = parse(argv)
    try:
        summary = run(args)
    except (SceneError, CameraError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
