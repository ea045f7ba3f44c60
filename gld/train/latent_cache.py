"""Latents of the diffusion stage cached offline in MDS shards, and a loader that trains from them.

    write_latent_cache(cfg, "runs/cache", epochs=4)      # launch/cache_latents.py
    loader = build_cache_loader(cfg, "runs/cache")       # train.latent_cache (gld/train/job.py)

Writing: the training loader of `cfg.data` (rank 0 of a world of one: the view selection, order
and batches of a one-rank training run, epoch after epoch) feeds `DiffusionStage.inputs`, the
stage's own encoding (views sources first; x: all views encoded together; source: the sources
alone, zeros for targets). One MDS record per sample: x and source (V, N, C) in the cache's
dtype (float16 by default: relative rounding <= 2**-11; float32 is exact), is_src (V,)
(uint8 in the shard, bool in a batch), c2w
(V, 4, 4), K (V, 3, 3), image_size, frame_indices (V,) (sources first), scene_id, sample_id,
epoch. Records are stored epoch by epoch in the order the loader gave them.

`latent_cache.json` (written last) says what the latents are (encoder variant and weights,
boundary level, normalize and the statistics' fingerprint, resolution, num_views, dtype) and
how many records each epoch holds. A reader refuses a cache whose fields differ from the config,
naming the field, and a folder without that file (a killed writer). Writing is atomic: shards go
into a hidden temporary folder beside the output, renamed to it once complete; for s3:// the
finished folder is uploaded with latent_cache.json last.

Reading (`LatentCacheLoader`, the trainer's loader interface): training epoch e reads cached
epoch e mod E (it repeats the cache's epochs, with a warning, past E). An epoch of n records
gives n // (B * world) steps; step s of rank r is records [s*B*world + r*B, ... + B) of that
epoch (a partition, the same on every run). With world 1 and the writer's batch size, the
batches are exactly those of training on the fly. state_dict / load_state_dict: (epoch, step).
Each pass over the loader takes one number from torch's global generator, as torch's DataLoader
does, so that a run from the cache draws the same times and noise as a run on the fly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from gld.data import s3

__all__ = ["META_FILE", "LatentCacheError", "write_latent_cache", "read_cache_meta",
           "expected_meta", "check_cache_meta", "LatentCacheDataset", "LatentCacheLoader",
           "build_cache_loader", "stats_fingerprint"]

log = logging.getLogger(__name__)

META_FILE = "latent_cache.json"
FORMAT = "gld-latent-cache"
DTYPES = ("float16", "float32")
COLUMNS = {"x": "ndarray", "source": "ndarray", "is_src": "ndarray", "c2w": "ndarray",
           "K": "ndarray", "image_size": "ndarray", "frame_indices": "ndarray", "scene_id": "str",
           "sample_id": "int", "epoch": "int"}
# Fields a cache must share with the config it trains (the config key each one comes from).
CHECKED = {"encoder": "latent.encoder", "weights": "latent.weights",
           "boundary_level": "latent.boundary_level", "normalize": "latent.normalize",
           "stats": "latent.stats", "resolution": "data.resolutions",
           "num_views": "data.num_views"}


class LatentCacheError(ValueError):
    """A latent cache that cannot be used: incomplete, or made for another configuration."""


def stats_fingerprint(stats, level: int) -> Optional[str]:
    """sha256 of the statistics' values (mean and var of `level`, float64) or None."""
    if stats is None:
        return None
    i = stats.index(level)
    h = hashlib.sha256()
    for t in (stats.mean[i], stats.var[i]):
        h.update(t.detach().double().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolution(cfg) -> list[int]:
    if len(cfg.data.resolutions) != 1:
        raise LatentCacheError(f"data.resolutions: a latent cache holds one resolution, the "
                               f"config has {len(cfg.data.resolutions)}")
    return [int(v) for v in cfg.data.resolutions[0]]


def expected_meta(cfg, stats="load") -> dict:
    """The checked fields (`CHECKED`) a cache for `cfg` must have. stats: the LatentStats in
    use (None: none), or "load" to load them from cfg.latent."""
    from gld.encoders.da3 import resolve_variant

    lat = cfg.latent
    if isinstance(stats, str):
        from gld.latents.stats import load_stats

        stats = load_stats(lat.stats, resolve_variant(lat.encoder)) if lat.normalize else None
    return {"encoder": resolve_variant(lat.encoder).name,
            "weights": None if lat.weights is None else Path(lat.weights).name,
            "boundary_level": int(lat.boundary_level), "normalize": bool(lat.normalize),
            "stats": stats_fingerprint(stats, lat.boundary_level) if lat.normalize else None,
            "resolution": _resolution(cfg), "num_views": int(cfg.data.num_views)}


def check_cache_meta(meta: dict, cfg, where: str, stats="load") -> None:
    """Raise LatentCacheError naming the first field where the cache differs from `cfg`."""
    want = expected_meta(cfg, stats)
    for field, key in CHECKED.items():
        if meta.get(field) != want[field]:
            raise LatentCacheError(
                f"{where}: latent cache field {field!r} is {meta.get(field)!r} but the config "
                f"({key}) gives {want[field]!r}; write the cache again for this config")


def read_cache_meta(path: str, endpoint: Optional[str] = None) -> dict:
    """latent_cache.json of a complete cache; LatentCacheError for an incomplete one."""
    meta_path = s3.join(path, META_FILE)
    if s3.is_s3(path):
        if not s3.exists(meta_path, endpoint):
            raise LatentCacheError(f"{path}: no {META_FILE}: not a complete latent cache (a "
                                   f"killed writer leaves none); write it again")
        meta = json.loads(s3.read_bytes(meta_path, endpoint))
    else:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such latent cache folder")
        if not Path(meta_path).is_file():
            raise LatentCacheError(f"{path}: no {META_FILE}: not a complete latent cache (a "
                                   f"killed writer leaves none); write it again")
        meta = json.loads(Path(meta_path).read_text())
    if meta.get("format") != FORMAT:
        raise LatentCacheError(f"{path}: {META_FILE} is not a {FORMAT} file")
    return meta


# ---- writing -----------------------------------------------------------------------------------
def _sample_records(inp: dict, batch: dict, order: torch.Tensor, dtype: str, epoch: int):
    """One MDS record per sample of a batch's stage inputs."""
    x = inp["x"].to(getattr(torch, dtype)).cpu()
    source = inp["source"].to(getattr(torch, dtype)).cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(source).all()):
        raise LatentCacheError(f"latents overflow {dtype} (write the cache with dtype float32)")
    frames = batch["frame_indices"].cpu().gather(1, order.cpu())
    size = np.asarray(inp["image_size"], dtype=np.int64)
    for b in range(x.shape[0]):
        yield {"x": x[b].numpy(), "source": source[b].numpy(),
               "is_src": inp["is_src"][b].cpu().numpy().astype(np.uint8),  # no bool in MDS
               "c2w": inp["c2w"][b].cpu().numpy(), "K": inp["K"][b].cpu().numpy(),
               "image_size": size, "frame_indices": frames[b].numpy(),
               "scene_id": str(batch["scene_id"][b]), "sample_id": int(batch["sample_id"][b]),
               "epoch": int(epoch)}


def write_latent_cache(cfg, out_dir: str, epochs: int, *, dtype: str = "float16", device=None,
                       shard_bytes: int = 1 << 28, overwrite: bool = False,
                       progress: bool = False, endpoint: Optional[str] = None,
                       stage=None) -> dict:
    """Encode `epochs` epochs of the training loader of `cfg.data` (one rank) with the
    diffusion stage's `inputs` and write them to `out_dir` (local folder or s3://); returns the
    meta written to latent_cache.json. device: default cuda if available; stage: a
    DiffusionStage to encode with (default: built from cfg)."""
    from streaming import MDSWriter
    from tqdm import tqdm

    from gld.data.streaming import build_loader
    from gld.data.writers import atomic_output
    from gld.train.stages.common import sources_first

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    endpoint = endpoint or cfg.data.s3_endpoint
    if stage is None:
        from gld.train.stages import DiffusionStage

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        stage = DiffusionStage(cfg, device)
    meta = {"format": FORMAT, "version": 1,
            **expected_meta(cfg, stage.space.stats if cfg.latent.normalize else None),
            "stats_files": list(cfg.latent.stats) if cfg.latent.normalize else [],
            "dtype": dtype, "epochs": int(epochs),
            "data": {k: getattr(cfg.data, k) for k in (
                "source", "paths", "seed", "shuffle", "batch_size", "min_sources", "max_sources",
                "view_window", "synthetic_scenes") if hasattr(cfg.data, k)}}
    with atomic_output(out_dir, endpoint, overwrite, META_FILE, "a latent cache") as tmp:
        loader = build_loader(cfg.data, "train", rank=0, world_size=1)
        counts = []
        writer = MDSWriter(out=str(tmp), columns=COLUMNS, compression=None,
                           size_limit=shard_bytes, max_workers=1, exist_ok=True)
        try:
            bar = tqdm(total=epochs * len(loader), desc="caching latents", unit="batch",
                       disable=not progress)
            for epoch in range(epochs):
                n = 0
                for batch in loader:
                    batch = {k: v.to(stage.device) if isinstance(v, torch.Tensor) else v
                             for k, v in batch.items()}
                    inp = stage.inputs(batch)
                    order, _ = sources_first(batch)
                    for rec in _sample_records(inp, batch, order, dtype, epoch):
                        writer.write(rec)
                        n += 1
                    bar.update(1)
                counts.append(n)
            bar.close()
        finally:
            writer.finish()
        if not all(counts):
            raise LatentCacheError(f"{out_dir}: an epoch of the training loader gave no "
                                   f"samples ({counts})")
        x_shape = list(inp["x"].shape[1:])
        meta.update(records=sum(counts), epoch_records=counts, latent_shape=x_shape)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


# ---- reading -----------------------------------------------------------------------------------
def _local_copy(path: str, meta: dict, endpoint: Optional[str], cache_dir: Optional[str]) -> str:
    """A local folder holding the cache at `path` (s3:// caches are downloaded once, atomically,
    into cache_dir; a copy whose meta differs from the remote one is replaced)."""
    if not s3.is_s3(path):
        return path
    root = Path(cache_dir or os.path.join(tempfile.gettempdir(), "gld-cache"))
    local = root / ("latents-" + hashlib.sha1(path.encode()).hexdigest()[:16])

    def current() -> bool:
        f = local / META_FILE
        return f.is_file() and json.loads(f.read_text()) == meta

    if current():
        return str(local)
    tmp = root / f".{local.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        s3.download_dir(path, str(tmp), endpoint)
        if not current():                  # another rank of this node may have finished first
            if local.exists():             # a stale copy (another cache at the same URL)
                shutil.rmtree(local, ignore_errors=True)
            os.rename(tmp, local)
    except OSError:
        if not current():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


class LatentCacheDataset:
    """The records of a complete cache, split into per-rank batches (module doc). batch_size:
    samples per rank per step (the trainer's micro batch)."""

    def __init__(self, path: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 endpoint: Optional[str] = None, cache_dir: Optional[str] = None,
                 meta: Optional[dict] = None):
        from streaming import LocalDataset

        self.path, self.batch_size, self.rank, self.world_size = path, batch_size, rank, world_size
        self.meta = meta if meta is not None else read_cache_meta(path, endpoint)
        self.records = LocalDataset(_local_copy(path, self.meta, endpoint, cache_dir))
        if self.records.num_samples != self.meta["records"]:
            raise LatentCacheError(f"{path}: its shards hold {self.records.num_samples} records, "
                                   f"{META_FILE} says {self.meta['records']}")
        self.epoch_records = [int(n) for n in self.meta["epoch_records"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.epoch_records)]).tolist()
        if min(self.epoch_records) < batch_size * world_size:
            raise LatentCacheError(
                f"{path}: a cached epoch holds {min(self.epoch_records)} samples, fewer than "
                f"data.batch_size x ranks = {batch_size} x {world_size}")
        self._warned = False

    def cached_epoch(self, epoch: int) -> int:
        E = len(self.epoch_records)
        if epoch >= E and not self._warned:
            log.warning("%s holds %d epochs: training epoch %d repeats cached epoch %d (and so "
                        "on)", self.path, E, epoch, epoch % E)
            self._warned = True
        return epoch % E

    def steps_per_epoch(self, epoch: int = 0) -> int:
        n = self.epoch_records[epoch % len(self.epoch_records)]
        return n // (self.batch_size * self.world_size)

    def batch(self, epoch: int, step: int) -> dict:
        """Step `step` of training epoch `epoch` for this rank."""
        e = self.cached_epoch(epoch)
        start = (self.offsets[e] + step * self.batch_size * self.world_size
                 + self.rank * self.batch_size)
        recs = [self.records.get_item(i) for i in range(start, start + self.batch_size)]
        out = {k: torch.from_numpy(np.stack([r[k] for r in recs]))
               for k in ("x", "source", "is_src", "c2w", "K", "frame_indices")}
        sizes = {tuple(int(v) for v in r["image_size"]) for r in recs}
        if len(sizes) != 1:
            raise LatentCacheError(f"{self.path}: one batch mixes image sizes {sorted(sizes)}")
        out.update(image_size=sizes.pop(), scene_id=[r["scene_id"] for r in recs],
                   sample_id=torch.tensor([int(r["sample_id"]) for r in recs]),
                   epoch=epoch, step=step)
        out["is_src"] = out["is_src"].bool()
        return out


class LatentCacheLoader:
    """The trainer's loader over a latent cache: one `for batch in loader` = the rest of the
    current epoch; state_dict / load_state_dict continue at the next unserved batch."""

    def __init__(self, dataset: LatentCacheDataset, pin_memory: bool = False):
        self.dataset, self.pin_memory = dataset, pin_memory
        self.epoch, self.step = 0, 0

    def __len__(self) -> int:
        return self.dataset.steps_per_epoch(self.epoch)

    def __iter__(self) -> Iterator[dict]:
        # One draw of torch's global generator per pass, as the DataLoader of the on-the-fly
        # loader takes for its worker seeds: training then draws the same random numbers (times,
        # noise) from a cache as on the fly.
        torch.empty((), dtype=torch.int64).random_()
        while self.step < self.dataset.steps_per_epoch(self.epoch):
            batch = self.dataset.batch(self.epoch, self.step)
            if self.pin_memory:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
            self.step += 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "latent_cache": self.dataset.path}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def build_cache_loader(cfg, path: str, rank: Optional[int] = None,
                       world_size: Optional[int] = None, stats="load") -> LatentCacheLoader:
    """The loader over the cache at `path` for `cfg` (checked against its meta; stats: the
    LatentStats in use, or "load" from cfg.latent). Micro batch: cfg.data.batch_size; rank /
    world default to torch.distributed's (gld.data.streaming.rank_and_world)."""
    from gld.data.streaming import rank_and_world

    if rank is None or world_size is None:
        r, w = rank_and_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    endpoint = cfg.data.s3_endpoint
    meta = read_cache_meta(path, endpoint)
    check_cache_meta(meta, cfg, path, stats)
    pin = torch.cuda.is_available() if cfg.data.pin_memory is None else bool(cfg.data.pin_memory)
    ds = LatentCacheDataset(path, cfg.data.batch_size, rank, world_size, endpoint,
                            cfg.data.cache_dir, meta)
    return LatentCacheLoader(ds, pin_memory=pin)
