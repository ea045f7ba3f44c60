"""Cache the diffusion stage's latents offline in MDS shards (gld/train/latent_cache.py).

    python launch/cache_latents.py --config configs/gld_da3_base.yaml --out runs/latents --epochs 4
    python launch/train.py --config configs/gld_da3_base.yaml --train.stage=diffusion \
        --train.latent_cache=runs/latents

Options after --config are dotted config overrides (`--data.batch_size=8`). The cache holds
`--epochs` epochs of the training loader of `data` (one rank: the same view selection as
training), encoded as the diffusion stage does; --out is a local folder or an s3:// prefix,
written atomically (latent_cache.json last). Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys

from gld.config import load_config_or_exit


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML file (may use `extends:`)")
    ap.add_argument("--out", required=True, help="cache folder or s3:// prefix")
    ap.add_argument("--epochs", type=int, required=True, help="epochs of the training loader")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                    help="storage dtype of x and source (float16: relative rounding <= 2**-11)")
    ap.add_argument("--device", default=None, help="encoder device (default cuda if available)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    ap.add_argument("--no-progress", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config_or_exit(args.config, overrides)
    if args.epochs < 1:
        sys.exit(f"--epochs: must be >= 1, got {args.epochs}")
    from gld.train.latent_cache import LatentCacheError, write_latent_cache

    try:
        meta = write_latent_cache(cfg, args.out, args.epochs, dtype=args.dtype,
                                  device=args.device, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    except (FileExistsError, LatentCacheError) as e:
        sys.exit(f"cache_latents: {e}")
    summary = {"out": args.out, "records": meta["records"], "epochs": meta["epochs"],
               "dtype": meta["dtype"], "latent_shape": meta["latent_shape"]}
    print(json.dumps(summary))
    return meta


if __name__ == "__main__":
    main()
