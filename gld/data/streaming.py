"""Multi-view batches for the trainer, from any record source, with a disjoint share per rank
and worker and sample-exact resumption.

What the trainer calls:
    loader = build_loader(cfg.data, split="train")        # rank / world from torch.distributed
    for batch in loader: ...                                # one epoch per `for`
    ckpt["data"] = loader.state_dict(); loader.load_state_dict(ckpt["data"])

A batch (dict), B = cfg.data.batch_size, one resolution (H, W) per batch:
    images        (B, V, 3, H, W) uint8 RGB
    K             (B, V, 3, 3) float32 pixel intrinsics at (H, W) (resize / crop applied)
    c2w           (B, V, 4, 4) float32 OpenCV camera-to-world as stored (not normalised)
    source_mask   (B, V) bool
    frame_indices (B, V) int64
    depth         (B, V, H, W) float32 planar z, 0 = unknown (only with cfg.data.load_depth)
    has_depth     (B,) bool
    sample_id     (B,) int64 record index (global over the dataset's shards)
    scene_id      list[str] of B
    epoch, step   int: the step within the epoch (the same on every rank)
    num_skipped   int: bad samples replaced in this batch (cfg.data.skip_bad)

Records come through one interface (gld/data/sources/): the synthetic world, tar shards or MDS
shards, each with its own partition over ranks and workers (see its module). The stream itself
only draws the views, batches (one resolution per batch) and skips bad samples.

Determinism: the order of records in an epoch depends on (seed, epoch); views on (seed, epoch,
record); the resolution of a batch on (seed, epoch, step), so all ranks agree without talking.
Step k of a rank comes from DataLoader worker (k - k0) mod W where k0 is the step the iterator
started at (torch's round robin); each worker builds its whole batches.

Bad data raises `DataError` naming shard, record, scene and frame; with `skip_bad` such
samples are replaced by an earlier good sample of the same worker and counted (batches keep
their size so ranks stay in step).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gld.data import s3
from gld.data.config import DataConfig
from gld.data.schema import DataError
from gld.data.sources.base import Item, RecordSource
from gld.data.views import ViewSpec, collate, select_views, view_rng

__all__ = ["MultiViewStream", "MultiViewLoader", "build_dataset", "build_loader", "open_source",
           "rank_and_world", "resolution_for_step"]

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from an initialised torch.distributed group, else RANK / WORLD_SIZE."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolution_for_step(resolutions, seed: int, epoch: int, step: int) -> tuple[int, int]:
    """The (H, W) of batch `step` of `epoch`: the same on every rank."""
    if len(resolutions) == 1:
        return tuple(resolutions[0])
    rng = np.random.default_rng([int(seed), int(epoch), int(step), 17])
    return tuple(resolutions[int(rng.integers(len(resolutions)))])


def open_source(cfg: DataConfig, split: str, rank: int, world_size: int) -> RecordSource:
    """The record source of `cfg.source` for `split` and this rank."""
    kw = dict(batch_size=cfg.batch_size, rank=rank, world_size=world_size,
              num_workers=cfg.num_workers, seed=cfg.seed, shuffle=cfg.shuffle and split == "train")
    if cfg.source == "synthetic":
        from gld.data.sources.synthetic import SyntheticSource

        return SyntheticSource(cfg.synthetic_scenes, cfg.view_window, **kw)
    paths = cfg.split_paths(split)
    if cfg.source == "wds":
        from gld.data.sources.wds import WdsSource

        return WdsSource(paths, cfg.s3_endpoint, skip_bad=cfg.skip_bad, **kw)
    if cfg.source == "mds":
        from gld.data.sources.mds import MDSSource  # mosaicml-streaming: seconds to import

        return MDSSource(paths, cfg.weights, cfg.s3_endpoint, cfg.cache_dir, **kw)
    raise ValueError(f"data.source must be synthetic, mds or wds, got {cfg.source!r}")


class MultiViewStream(IterableDataset):
    """Iterable of whole batches of `split` ("train": random views, shuffled; "eval": the
    fixed views of cfg.eval, its paths if set, no shuffle); the DataLoader uses
    batch_size=None. Call `set_position(epoch, step)` before iterating (the loader does).
    rank / world_size default to `rank_and_world()`."""

    def __init__(self, cfg: DataConfig, split: str = "train", rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        cfg.validate()
        if rank is None or world_size is None:
            r, w = rank_and_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        s3.configure_endpoint(cfg.s3_endpoint)  # before any worker starts (mosaicml-streaming)
        self.spec = ViewSpec.from_config(cfg, split)
        self.resolutions = cfg.split_resolutions(split)
        self.batch_size, self.skip_bad, self.num_workers = (cfg.batch_size, cfg.skip_bad,
                                                            cfg.num_workers)
        self.seed = cfg.seed
        self.source = open_source(cfg, split, rank, world_size)

    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch()

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def set_position(self, epoch: int, step: int) -> None:
        self.source.seek(epoch, step)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        if W != self.source.num_workers:
            raise RuntimeError(f"MultiViewStream was built for {self.source.num_workers} "
                               f"workers but runs under {W}; build it with num_workers={W}")
        epoch, steps, items = self.source.items(w, W)
        yield from self._batches(epoch, steps, items)
        self.source.finish()

    def _batches(self, epoch: int, steps, items: Iterator[Item]) -> Iterator[dict]:
        items = _Pushback(items)
        last_good: Optional[Item] = None
        for step in steps:
            res = resolution_for_step(self.resolutions, self.seed, epoch, step)
            samples, skipped = [], 0
            for _ in range(self.batch_size):
                item = next(items)
                try:
                    samples.append(self._make(item, epoch, res))
                    last_good = item
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    skipped += 1
                    log.warning("skipping bad sample: %s", e)
            if skipped:
                if last_good is None:  # nothing good yet in this worker: look ahead
                    last_good = self._look_ahead(items, epoch, res)
                fill = self._make(last_good, epoch, res)
                samples += [fill] * (self.batch_size - len(samples))
            batch = collate(samples)
            batch.update(epoch=epoch, step=step, num_skipped=skipped)
            yield batch

    def _look_ahead(self, items: "_Pushback", epoch, res) -> Item:
        """The next good item of this worker. Everything looked at is pushed back, so every
        item is still served (and bad ones counted) in its own turn."""
        seen = []
        for item in items:
            seen.append(item)
            try:
                self._make(item, epoch, res)
            except DataError:
                continue
            break
        else:
            raise DataError(f"skip_bad: every remaining sample of this worker is bad "
                            f"(epoch {epoch})")
        for it in reversed(seen):
            items.push(it)
        return seen[-1]

    def _make(self, item: Item, epoch: int, res) -> dict:
        rng = view_rng(self.spec, epoch, item.sample_id)
        record = item.load()
        try:
            pos, mask = select_views(record.num_frames, self.spec, rng)
        except DataError as e:
            raise DataError(f"{item.where}: {e}") from None
        return record.sample(pos, mask, res, self.spec, item.sample_id)


class _Pushback:
    """An iterator that can take items back."""

    def __init__(self, it):
        self.it, self.back = iter(it), []

    def __iter__(self):
        return self

    def __next__(self):
        return self.back.pop() if self.back else next(self.it)

    def push(self, item) -> None:
        self.back.append(item)


class MultiViewLoader:
    """One `for batch in loader` = the rest of the current epoch; tracks (epoch, step) for
    `state_dict()` / `load_state_dict()` (counts batches handed to the caller, not prefetched
    ones). Breaking out of the loop and iterating again continues where it stopped."""

    def __init__(self, dataset: MultiViewStream, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        self.dataset = dataset
        self.epoch, self.step = 0, 0
        self.num_skipped = 0
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory

    def __len__(self) -> int:
        return self.dataset.steps_per_epoch()

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds.set_position(self.epoch, self.step)
        nw = ds.num_workers
        dl = DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=self.pin_memory,
                        prefetch_factor=self.prefetch_factor if nw else None,
                        persistent_workers=False)
        for batch in dl:
            if (batch["epoch"], batch["step"]) != (self.epoch, self.step):
                raise RuntimeError(f"data loader out of step: expected epoch {self.epoch} step "
                                   f"{self.step}, got epoch {batch['epoch']} step {batch['step']}")
            self.step += 1
            self.num_skipped += int(batch["num_skipped"])
            yield batch
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "num_skipped": self.num_skipped,
                **self.dataset.source.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.source.load_state_dict(state)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.num_skipped = int(state.get("num_skipped", 0))


def build_dataset(cfg: DataConfig, split: str = "train", rank: Optional[int] = None,
                  world_size: Optional[int] = None) -> MultiViewStream:
    """The stream of `split` for `cfg` (the data section); see `MultiViewStream`."""
    return MultiViewStream(cfg, split, rank, world_size)


def build_loader(cfg: DataConfig, split: str = "train", rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> MultiViewLoader:
    """`MultiViewLoader` over `build_dataset(...)`; see the module docstring for batches."""
    pin = torch.cuda.is_available() if cfg.pin_memory is None else bool(cfg.pin_memory)
    return MultiViewLoader(build_dataset(cfg, split, rank, world_size),
                           prefetch_factor=cfg.prefetch_factor, pin_memory=pin)
