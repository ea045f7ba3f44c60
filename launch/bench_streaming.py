"""Benchmark: samples per second streamed from S3, decode included.

Writes synthetic JPEG sequences as MDS and WDS shards to an S3 endpoint (by default a local
SeaweedFS server started here on 127.0.0.1, gld/data/local_s3.py), then for each DataLoader
worker count streams two whole epochs of multi-view samples and records samples/s: cold = the
whole first epoch including worker start (MDS downloads into an empty cache), warm = the whole
second epoch (MDS from its cache, WDS from S3 again), steady = the second epoch after its first
batch (no worker start-up). Results go to launch/results/streaming_<tag>.{json,md}.

    python launch/bench_streaming.py [--records 16 --copies 12] [--workers 1 2 4] [--tag cpu]
    python launch/bench_streaming.py --endpoint http://host:port --bucket name  # own server
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from gld.data.config import DataConfig
from gld.data.local_s3 import start_s3_server
from gld.data.s3 import S3AccessError
from gld.data.schema import DatasetMeta, Sequence
from gld.data.streaming import build_loader
from gld.data.synthetic import synthetic_sequences
from gld.data.writers import write_dataset
from kernels.benchmarking import env_info, markdown_table, write_results

WRITERS = ("mds", "wds")
COLUMNS = {"writer": "format", "workers": "workers", "cold_samples_per_s": "cold samples/s",
           "warm_samples_per_s": "warm samples/s",
           "warm_steady_samples_per_s": "steady samples/s"}


def parse(argv=None) -> argparse.Namespace:
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
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return ap.parse_args(argv)


def write_shards(args, bucket: str) -> tuple[dict, float]:
    """-> ({writer: dataset URL}, seconds spent rendering)."""
    t = time.perf_counter()
    seqs = list(synthetic_sequences(args.records, seed=0, num_frames=args.frames,
                                    size=(args.size, args.size), image_format="jpeg",
                                    with_depth=False))
    render_s = time.perf_counter() - t
    mib = sum(len(f.image) for s in seqs for f in s.frames) / 2**20
    print(f"rendered {args.records} x {args.frames} frames in {render_s:.1f} s "
          f"({mib:.1f} MiB JPEG)", flush=True)
    stored = [Sequence(f"{s.scene_id}-copy{c}", s.frames, s.source)
              for c in range(args.copies) for s in seqs]
    urls = {w: f"{bucket}/bench-{w}-{args.records}" for w in WRITERS}
    for writer, url in urls.items():
        write_dataset(stored, url, writer, DatasetMeta(source="synthetic"), shard_records=8,
                      overwrite=True)
    return urls, render_s


def time_epochs(cfg: DataConfig) -> dict:
    """samples/s of two epochs of `cfg` (see the module docstring)."""
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
        if t_first is None:  # fewer records than one batch per (worker) slot
            raise SystemExit(f"bench_streaming: {cfg.source} with {cfg.num_workers} workers has "
                             f"an empty epoch; store more records (--records / --copies)")
        rates.append(n / (t_end - t))
        steady.append((n - n_first) / (t_end - t_first))
    return {"samples_per_epoch": n, "cold_samples_per_s": round(rates[0], 2),
            "warm_samples_per_s": round(rates[1], 2),
            "warm_steady_samples_per_s": round(steady[1], 2)}


def run(args, urls: dict) -> list[dict]:
    rows = []
    for writer in WRITERS:
        for nw in args.workers:
            cache = tempfile.mkdtemp(prefix="gld-bench-cache-")
            try:
                cfg = DataConfig(source=writer, paths=[urls[writer]], num_views=args.views,
                                 view_window=args.frames, max_sources=4,
                                 resolutions=[(args.size, args.size)],
                                 batch_size=args.batch_size, num_workers=nw, seed=0,
                                 cache_dir=cache)
                rows.append({"writer": writer, "workers": nw, **time_epochs(cfg)})
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            print(rows[-1], flush=True)
    return rows


def write(args, rows: list[dict], render_s: float) -> None:
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "env": env_info(["mosaicml-streaming", "webdataset", "boto3"]),
        "torch_threads": torch.get_num_threads(),
        "server": "SeaweedFS weed server on 127.0.0.1" if args.endpoint is None else "given",
        "sample": f"{args.views} views x {args.size}x{args.size} JPEG (quality 95), decoded "
                  f"to uint8, batch {args.batch_size}, records of {args.frames} frames",
        "records": args.records * args.copies, "render_seconds": round(render_s, 1), "rows": rows,
    }
    out = Path(args.out)
    write_results(out / f"streaming_{args.tag}.json", result)
    table = markdown_table(list(COLUMNS.values()), [[r[k] for k in COLUMNS] for r in rows])
    text = "\n".join([f"# Streaming benchmark ({args.tag})", "",
                      f"- machine: {result['machine']}, torch threads {result['torch_threads']}",
                      f"- server: {result['server']}", f"- sample: {result['sample']}",
                      f"- one epoch = {result['records']} records; cold, warm and steady as in "
                      "launch/bench_streaming.py's docstring", "", table, ""])
    (out / f"streaming_{args.tag}.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    args = parse(argv)
    server = None
    try:
        if args.endpoint is None:
            server = start_s3_server()
            bucket = server.bucket(args.bucket)
        else:
            os.environ["S3_ENDPOINT_URL"] = args.endpoint
            bucket = f"s3://{args.bucket}"
        urls, render_s = write_shards(args, bucket)
        rows = run(args, urls)
    except (S3AccessError, FileNotFoundError) as e:  # no server reachable, or no weed binary
        sys.exit(f"bench_streaming: {e}")
    finally:
        if server is not None:
            server.stop()
    write(args, rows, render_s)


if __name__ == "__main__":
    main()
