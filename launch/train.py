"""Train GLD: one stage, or the main job (every stage of `job.stages`, then export and report).

    deepspeed --hostfile launch/hostfile.example launch/train.py --config configs/gld_da3_base.yaml
    torchrun --nproc_per_node 8 launch/train.py --config configs/gld_da3_base.yaml --train.stage=decoder
    python launch/train.py --config configs/tiny.yaml          # the README's main job, on a CPU

Options after --config are dotted config overrides (`--train.zero_stage=3`). With `job.stages`
empty the stage `train.stage` is trained in <train.out_dir>/<stage>/ (resuming per
train.resume); otherwise gld/train/job.py's main job runs. The process group comes from the
launcher (deepspeed, torchrun) or is a world of one (python).
"""
from __future__ import annotations

import argparse

from gld.config import load_config_or_exit
from gld.train.job import run_job, run_stage


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML file (may use `extends:`)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    ap.add_argument("--no-progress", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config_or_exit(args.config, overrides)
    if cfg.job.stages:
        run_job(cfg, progress=not args.no_progress)
    else:
        run_stage(cfg, progress=not args.no_progress)


if __name__ == "__main__":
    main()
