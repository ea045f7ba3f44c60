"""Export a training run as a model folder (safetensors weights, config, statistics, time shift).

    python launch/export.py --run runs/tiny [--out runs/tiny/model] [--weights ema|raw]

RUN is a job or single-stage run folder (<run>/config.yaml, <run>/decoder/, <run>/diffusion/);
the latest complete checkpoint of each stage present is consolidated (ZeRO shards gathered;
EMA weights when trained with EMA and --weights ema, else the raw ones). The folder
(gld/checkpoints/model_folder.py) is what launch/sample.py and evaluation read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gld.checkpoints.loading import CheckpointError
from gld.config import ConfigError, load_config
from gld.train.job import export


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run folder")
    ap.add_argument("--out", default=None, help="model folder (default <run>/model)")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = ap.parse_args(argv)
    run = Path(args.run)
    try:
        cfg = load_config(run / "config.yaml")
        out = export(cfg, run, Path(args.out) if args.out else run / "model", args.weights)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"export.py: {e}")
    print(json.dumps({"model": str(out)}))


if __name__ == "__main__":
    main()
