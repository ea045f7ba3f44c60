"""Benchmark: samples per second streamed from a local S3 server, decode included.

Writes synthetic 504x504 JPEG sequences as MDS and WDS shards to an S3 endpoint (by default
a SeaweedFS `weed server` started here on 127.0.0.1, see tests/s3_server.py), then for
1, 2 and 4 DataLoader workers streams whole epochs of 8-view samples at 504x504 and records
samples/s: epoch 1 cold (MDS downloads into an empty cache), epoch 2 warm (MDS reads its
cache; WDS streams from S3 again). Results go to launch/results/streaming_<tag>.{json,md}.

    python launch/bench_streaming.py [--records 16 --copies 12] [--workers 1 2 4] [--tag cpu]
    python launch/bench_streaming.py --endpoint http://host:port --bucket name  # own server
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=16, help="distinct scenes rendered")
    ap.add_argument("--copies", type=int, default=12,
                    help="each scene is stored this many times (a longer epoch, no extra render)")
    ap.add_argument("--frames", type=int, default=12, help="frames per stored record")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--size", type=int, default=504)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--endpoint", default=None, help="S3 endpoint; default: start weed here")
    ap.add_argument("--bucket", default="gld-bench")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "launch" / "results"))
    args = ap.parse_args()

    import torch

    from gld.config import DataConfig
    from gld.data.schema import DatasetMeta
    from gld.data.streaming import build_loader
    from gld.data.synthetic import synthetic_sequences
    from gld.data.writers import write_dataset

    server = None
    if args.endpoint is None:
        sys.path.insert(0, str(ROOT))
        from tests.s3_server import start_s3_server

        server = start_s3_server()
        bucket = server.bucket(args.bucket)
    else:
        os.environ["S3_ENDPOINT_URL"] = args.endpoint
        bucket = f"s3://{args.bucket}"
    try:
        t = time.perf_counter()
        seqs = list(synthetic_sequences(args.records, seed=0, num_frames=args.frames,
                                        size=(args.size, args.size), image_format="jpeg",
                                        with_depth=False))
        render_s = time.perf_counter() - t
        mb = sum(len(f.image) for s in seqs for f in s.frames) / 2**20
        print(f"rendered {args.records} x {args.frames} frames in {render_s:.1f} s "
              f"({mb:.1f} MiB JPEG)", flush=True)
        from gld.data.schema import Sequence

        stored = [Sequence(f"{s.scene_id}-copy{c}", s.frames, s.source)
                  for c in range(args.copies) for s in seqs]
        urls = {}
        for writer in ("mds", "wds"):
            urls[writer] = f"{bucket}/bench-{writer}-{args.records}"
            write_dataset(stored, urls[writer], writer, DatasetMeta(source="synthetic"),
                          shard_records=8, overwrite=True)
        rows, caches = [], []
        for writer in ("mds", "wds"):
            for nw in args.workers:
                cfg = DataConfig(source=writer, paths=[urls[writer]], num_views=args.views,
                                 view_window=args.frames, max_sources=4,
                                 resolutions=[(args.size, args.size)],
                                 batch_size=args.batch_size, num_workers=nw, seed=0,
                                 cache_dir=tempfile.mkdtemp(prefix="gld-bench-cache-"))
                caches.append(cfg.cache_dir)
                cfg.validate()
                loader = build_loader(cfg, rank=0, world_size=1)
                rates, steady = [], []
                for _ in range(2):
                    t = time.perf_counter()
                    n, t_first, n_first = 0, None, 0
                    for b in loader:
                        n += b["images"].shape[0]
                        if t_first is None:
                            t_first, n_first = time.perf_counter(), n
                    t_end = time.perf_counter()
                    rates.append(n / (t_end - t))
                    steady.append((n - n_first) / (t_end - t_first))
                row = {"writer": writer, "workers": nw, "samples_per_epoch": n,
                       "cold_samples_per_s": round(rates[0], 2),
                       "warm_samples_per_s": round(rates[1], 2),
                       "warm_steady_samples_per_s": round(steady[1], 2)}
                print(row, flush=True)
                rows.append(row)
                del loader
    finally:
        if server is not None:
            server.stop()
        for c in caches if "caches" in locals() else ():
            shutil.rmtree(c, ignore_errors=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"no GPU (the project's CPU development machine)",
        "torch_threads": torch.get_num_threads(),
        "server": "SeaweedFS weed server on 127.0.0.1" if args.endpoint is None else "given",
        "sample": f"{args.views} views x {args.size}x{args.size} JPEG (quality 95), decoded "
                  f"to uint8, batch {args.batch_size}, records of {args.frames} frames",
        "records": args.records * args.copies, "render_seconds": round(render_s, 1), "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"streaming_{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Streaming benchmark ({args.tag})", "",
             f"- machine: {result['machine']}", f"- server: {result['server']}",
             f"- sample: {result['sample']}",
             f"- one epoch = {args.records * args.copies} records; cold = whole first epoch "
             "including worker start (MDS downloads into an empty cache), warm = whole second "
             "epoch (MDS from its cache, WDS from S3 again), steady = second epoch after its "
             "first batch (no worker start-up)",
             "- measured on this project's CPU development machine: 2 cores, shared with the "
             "S3 server and with other engineers' jobs (load average 2-4 during the run), so "
             "more workers than cores cannot show scaling here and run-to-run noise is about "
             "+-20%; rerun on a GPU node for numbers that matter", "",
             "| format | workers | cold samples/s | warm samples/s | steady samples/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['writer']} | {r['workers']} | {r['cold_samples_per_s']} | "
              f"{r['warm_samples_per_s']} | {r['warm_steady_samples_per_s']} |" for r in rows]
    (out / f"streaming_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
