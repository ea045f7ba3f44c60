"""Streaming multi-view batches from MDS (mosaicml-streaming), tar shards (webdataset) or the
synthetic world, with a disjoint share per rank and worker and sample-exact resumption.

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

Determinism: the order of records in an epoch depends on (seed, epoch); views on (seed, epoch,
record); the resolution of a batch on (seed, epoch, step), so all ranks agree without talking.
Step k of a rank comes from DataLoader worker (k - k0) mod W where k0 is the step the iterator
started at (torch's round robin); each worker builds its whole batches.

Partition, per epoch:
- mds: mosaicml-streaming's own (samples split across nodes, ranks, workers; its
  `state_dict` / `load_state_dict` give the mid-epoch resume). Samples padded by streaming when
  the count does not divide evenly.
- wds: shards (shuffled by seed + epoch) go round robin to the R x W (rank, worker) slots;
  records within a shard are permuted; every slot yields the same number of batches
  (the smallest slot's), the surplus records of bigger slots are left out of that epoch
  (`dropped_per_epoch`). Resume skips whole shards by their stored counts.
  Memory: one shard per worker (shards are read whole to permute them).
- synthetic: records `0..synthetic_scenes-1` permuted by seed + epoch; step k of rank r takes
  positions [k B R + r B, k B R + (r + 1) B).

Bad data raises `DataError` naming shard, record, scene and frame; with `skip_bad` such
samples are replaced by an earlier good sample of the same worker and counted (batches keep
their size so ranks stay in step). Shard-level failures of MDS (missing object, truncated
file) always raise: mosaicml-streaming downloads in background threads.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gld.data import records, s3
from gld.data.schema import DataError, Sequence, check_cameras
from gld.data.views import ViewSpec, collate, make_sample, select_views, view_rng
from gld.data.writers import iter_tar_records, read_meta, seq_c2w, seq_K

__all__ = ["MultiViewStream", "MultiViewLoader", "build_dataset", "build_loader",
           "rank_and_world", "resolution_for_step"]

log = logging.getLogger(__name__)

Item = tuple[int, str, Callable[[], Sequence]]  # (sample id, where, load -> Sequence)


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


class MultiViewStream(IterableDataset):
    """Iterable of whole batches (see module docstring); the DataLoader uses batch_size=None.

    source: "synthetic" | "mds" | "wds". Call `set_position(epoch, step)` before iterating
    (the loader does).
    """

    def __init__(self, source: str, spec: ViewSpec, resolutions, batch_size: int, *,
                 paths=(), weights=(), rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle: bool = True, skip_bad: bool = False, synthetic_scenes: int = 64,
                 cache_dir: Optional[str] = None, endpoint: Optional[str] = None):
        self.source, self.spec, self.batch_size = source, spec, batch_size
        self.resolutions = [tuple(r) for r in resolutions]
        self.paths, self.weights = list(paths), list(weights)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle, self.skip_bad, self.endpoint = shuffle, skip_bad, endpoint
        self.seed = spec.seed
        self.epoch, self.step = 0, 0
        s3.configure_endpoint(endpoint)
        if source == "synthetic":
            self.num_records = synthetic_scenes
        elif source == "wds":
            self._init_wds()
        elif source == "mds":
            self._init_mds(cache_dir)
        else:
            raise ValueError(f"data.source must be synthetic, mds or wds, got {source!r}")

    # ---- sizes and positions -------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        B, R = self.batch_size, self.world_size
        if self.source == "synthetic":
            return self.num_records // (B * R)
        if self.source == "mds":
            return -(-self.records.epoch_size // (B * R)) if self.records.epoch_size else 0
        return self._wds_plan(0)[1] * self._workers()

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def set_position(self, epoch: int, step: int) -> None:
        self.epoch, self.step = int(epoch), int(step)

    def _workers(self) -> int:
        return max(1, self.num_workers)

    # ---- worker side -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        if W != self._workers():
            raise RuntimeError(f"MultiViewStream was built for {self._workers()} workers but "
                               f"runs under {W}; build it with num_workers={W}")
        if self.source == "mds":
            yield from self._iter_mds(w, W)
            return
        epoch, s0 = self.epoch, self.step
        n_steps = self.steps_per_epoch()
        steps = range(s0 + w, n_steps, W)
        items = self._synthetic_items(epoch, steps) if self.source == "synthetic" else \
            self._wds_items(epoch, s0, w, W, n_steps)
        yield from self._batches(epoch, steps, items)

    def _batches(self, epoch: int, steps, items: Iterator[Item]) -> Iterator[dict]:
        items = _Pushback(items)
        last_good: Optional[Item] = None
        for step in steps:
            res = resolution_for_step(self.resolutions, self.seed, epoch, step)
            samples, skipped = [], 0
            for _ in range(self.batch_size):
                item = next(items)
                try:
                    samples.append(self._make(*item, epoch, res))
                    last_good = item
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    skipped += 1
                    log.warning("skipping bad sample: %s", e)
            if skipped:
                if last_good is None:  # nothing good yet in this worker: look ahead
                    last_good = self._look_ahead(items, epoch, res)
                fill = self._make(*last_good, epoch, res)
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
                self._make(*item, epoch, res)
            except DataError:
                continue
            break
        else:
            raise DataError(f"skip_bad: every remaining sample of this worker is bad "
                            f"(epoch {epoch})")
        for it in reversed(seen):
            items.push(it)
        return seen[-1]

    def _make(self, sid, where, load, epoch, res) -> dict:
        rng = view_rng(self.spec, epoch, sid)
        if self.source == "synthetic":
            return self._render_synthetic(sid, rng, res)
        seq = load()
        # The whole record's cameras, not only the chosen views: a bad record fails every time.
        check_cameras(seq_K(seq), seq_c2w(seq), seq.image_sizes, f"{where} (scene "
                      f"{seq.scene_id!r})")
        try:
            pos, mask = select_views(len(seq.frames), self.spec, rng)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        return make_sample(seq, pos, mask, res, self.spec, where, sid)

    # ---- synthetic ---------------------------------------------------------------------------
    def _order(self, epoch: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch), 29]).permutation(n)

    def _synthetic_items(self, epoch, steps) -> Iterator[Item]:
        order = self._order(epoch, self.num_records)
        B, R = self.batch_size, self.world_size
        for k in steps:
            base = k * B * R + self.rank * B
            for i in order[base:base + B]:
                yield int(i), f"synthetic scene {int(i)}", None

    def _render_synthetic(self, sid: int, rng, res) -> dict:
        from gld.data.synthetic import render, scene_cameras, to_uint8

        scene, K, c2w = scene_cameras(self.seed, sid, self.spec.window, res)
        pos, mask = select_views(self.spec.window, self.spec, rng)
        rgb, depth = render(scene, c2w[pos], K[pos], *res)
        sample = {
            "images": torch.from_numpy(to_uint8(rgb)).permute(0, 3, 1, 2).contiguous(),
            "K": torch.from_numpy(K[pos]).float(), "c2w": torch.from_numpy(c2w[pos]).float(),
            "source_mask": torch.from_numpy(mask),
            "frame_indices": torch.from_numpy(pos.astype(np.int64)),
            "has_depth": True, "scene_id": f"synthetic-{self.seed}-{sid:06d}", "sample_id": sid,
        }
        if self.spec.load_depth:
            sample["depth"] = depth
        return sample

    # ---- webdataset tar shards ---------------------------------------------------------------
    def _init_wds(self) -> None:
        if self.weights and len(set(self.weights)) > 1:
            raise ValueError("data.weights (mixing proportions) need data.source='mds'; "
                             "webdataset shards are read once each per epoch")
        self.shards = []  # (url, num_records, first global record id, file bytes)
        n = 0
        for path in self.paths:
            meta = read_meta(path, self.endpoint)
            if meta.writer != "wds":
                raise DataError(f"{path}: written by the {meta.writer!r} writer, but "
                                f"data.source='wds'")
            for info in meta.shards:
                self.shards.append((s3.join(path, info["name"]), int(info["num_records"]), n,
                                    int(info["bytes"])))
                n += int(info["num_records"])
        self.num_records = n

    def _wds_plan(self, epoch: int):
        """-> (slots: list of shard-index lists, batches per slot, dropped records)."""
        S = self.world_size * self._workers()
        order = self._order(epoch, len(self.shards))
        slots = [list(order[q::S]) for q in range(S)]
        counts = [sum(self.shards[i][1] for i in slot) for slot in slots]
        per_slot = min(counts) // self.batch_size
        return slots, per_slot, sum(counts) - per_slot * self.batch_size * S

    @property
    def dropped_per_epoch(self) -> int:
        return self._wds_plan(self.epoch)[2] if self.source == "wds" else 0

    def _wds_items(self, epoch, s0, w, W, n_steps) -> Iterator[Item]:
        # Step k belongs to slot k mod W of this rank, as its batch k // W; after a resume at
        # s0 this worker serves steps s0 + w + jW: one slot, from batch (s0 + w) // W.
        slots, per_slot, _ = self._wds_plan(epoch)
        first = s0 + w
        slot = slots[self.rank * W + first % W]
        skip = (first // W) * self.batch_size
        for shard_i in slot:
            url, count, base, size = self.shards[shard_i]
            if skip >= count:
                skip -= count
                continue
            perm = self._order_in_shard(epoch, shard_i, count)
            loaded = dict((local, (where, load)) for local, where, load in
                          self._read_shard(url, count, base, size))
            for local in perm[skip:]:
                where, load = loaded[int(local)]
                yield base + int(local), where, load
            skip = 0

    def _order_in_shard(self, epoch, shard_i, count) -> np.ndarray:
        if not self.shuffle:
            return np.arange(count)
        return np.random.default_rng([self.seed, int(epoch), int(shard_i), 37]).permutation(count)

    def _read_shard(self, url: str, count: int, base: int, size: int):
        """All records of one shard: (local index, where, load). A missing, truncated or
        unreadable shard raises DataError naming it, or with skip_bad its unreadable records
        become loads that raise (counted as skipped)."""
        got, error = [], None
        try:
            got = list(iter_tar_records(url, self.endpoint, size))
            if len(got) != count:
                error = DataError(f"shard {url}: {len(got)} records, gld_meta.json says "
                                  f"{count} (truncated shard?)")
        except DataError as e:
            error = e
        if error is not None:
            if not self.skip_bad:
                raise error
            got = got[:-1]  # the last record read from a broken tar may be partial
        for i, raw in got:
            where = f"shard {url} record {i} (sample {base + i})"
            yield i, where, (lambda raw=raw, where=where: records.from_wds(raw, where))
        if error is not None:
            def fail(e=error):
                raise e
            for i in range(len(got), count):
                yield i, f"shard {url} record {i} (sample {base + i})", fail

    # ---- MDS through mosaicml-streaming ---------------------------------------------------------
    def _init_mds(self, cache_dir: Optional[str]) -> None:
        from streaming import Stream

        streams = []
        total_w = sum(self.weights) if self.weights else 0
        for i, path in enumerate(self.paths):
            meta = read_meta(path, self.endpoint)  # refuses incomplete datasets
            if meta.writer != "mds":
                raise DataError(f"{path}: written by the {meta.writer!r} writer, but "
                                f"data.source='mds'")
            if s3.is_s3(path):
                root = cache_dir or os.path.join(tempfile.gettempdir(), "gld-cache")
                local = os.path.join(root, hashlib.sha1(path.encode()).hexdigest()[:16])
                remote = path
            else:
                local, remote = path, None
            kw = {"proportion": self.weights[i] / total_w} if total_w else {}
            streams.append(Stream(remote=remote, local=local, **kw))
        from streaming.base.world import World

        # Fixed (not streaming's lazy default) so the resume state can be built without it.
        self.num_nodes = World.detect().num_nodes
        from gld.data.mds import MDSRecords

        self.records = MDSRecords(streams=streams, batch_size=self.batch_size,
                                  shuffle=self.shuffle, shuffle_seed=self.seed,
                                  num_canonical_nodes=self.num_nodes,
                                  allow_unsafe_types=False)
        self.num_records = self.records.num_samples

    def _iter_mds(self, w: int, W: int) -> Iterator[dict]:
        it = iter(self.records)
        first = next(it, None)  # starts streaming's epoch: captures (epoch, sample_in_epoch)
        if first is None:
            self.records._raise_failure()
            return
        epoch = self.records._gld_epoch
        s0 = self.records._gld_sample_in_epoch // (self.batch_size * self.world_size)

        def items() -> Iterator[Item]:
            for sid, where, raw in _chain([first], it):
                if isinstance(raw, DataError):
                    def load(e=raw):
                        raise e
                else:
                    def load(raw=raw, where=where):
                        return records.from_mds(raw, where)
                yield sid, where, load
            self.records._raise_failure()

        gen = items()
        n_steps = self.steps_per_epoch()
        yield from self._batches(epoch, range(s0 + w, n_steps, W), gen)
        self.records._raise_failure()


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


def _chain(a, b):
    yield from a
    yield from b


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
        if ds.source == "mds":  # always: a stale resume state left in shared memory by an
            ds.records.load_state_dict(self._mds_state())  # earlier job must not apply
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

    def _mds_state(self) -> dict:
        """mosaicml-streaming's resume state for (epoch, step), built here rather than read
        from its shared memory (another rank of the node may be rewriting that)."""
        ds = self.dataset
        return {"epoch": self.epoch, "sample_in_epoch": self.step * ds.batch_size * ds.world_size,
                "num_canonical_nodes": ds.num_nodes, "shuffle_seed": ds.seed,
                "initial_physical_nodes": ds.num_nodes}

    def state_dict(self) -> dict:
        ds = self.dataset
        return {"epoch": self.epoch, "step": self.step, "num_skipped": self.num_skipped,
                "source": ds.source, "seed": ds.seed, "batch_size": ds.batch_size,
                "world_size": ds.world_size, "num_workers": ds._workers(),
                "num_records": ds.num_records}

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        for key, have in (("source", ds.source), ("seed", ds.seed),
                          ("batch_size", ds.batch_size), ("world_size", ds.world_size),
                          ("num_records", ds.num_records)) + (
                (("num_workers", ds._workers()),) if ds.source == "wds" else ()):
            if state[key] != have:
                raise ValueError(f"data state: {key}={state[key]} in the checkpoint, {have} now; "
                                 f"an exact resume needs the same value")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.num_skipped = int(state.get("num_skipped", 0))


def build_dataset(cfg, split: str = "train", rank: Optional[int] = None,
                  world_size: Optional[int] = None, eval_cfg=None) -> MultiViewStream:
    """The dataset for `cfg` (a DataConfig). split "train" (random views, shuffled) or "eval"
    (fixed views from `eval_cfg`: an EvalConfig; eval_paths if set; no shuffle)."""
    if rank is None or world_size is None:
        r, w = rank_and_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    train = split == "train"
    if not train and split != "eval":
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    spec = ViewSpec(num_views=cfg.num_views if train or eval_cfg is None else eval_cfg.num_views,
                    window=cfg.view_window, min_sources=cfg.min_sources,
                    max_sources=cfg.max_sources, mode="train" if train else "eval",
                    eval_sources=eval_cfg.num_sources if eval_cfg else cfg.max_sources,
                    eval_selection=eval_cfg.source_selection if eval_cfg else "interpolate",
                    seed=cfg.seed, load_depth=cfg.load_depth)
    resolutions = cfg.resolutions if train or eval_cfg is None else [eval_cfg.resolution]
    paths = cfg.paths if train or not cfg.eval_paths else cfg.eval_paths
    return MultiViewStream(cfg.source, spec, resolutions, cfg.batch_size, paths=paths,
                           weights=cfg.weights, rank=rank, world_size=world_size,
                           num_workers=cfg.num_workers, shuffle=cfg.shuffle and train,
                           skip_bad=cfg.skip_bad, synthetic_scenes=cfg.synthetic_scenes,
                           cache_dir=cfg.cache_dir, endpoint=cfg.s3_endpoint)


def build_loader(cfg, split: str = "train", rank: Optional[int] = None,
                 world_size: Optional[int] = None, eval_cfg=None) -> MultiViewLoader:
    """`MultiViewLoader` over `build_dataset(...)`; see the module docstring for batches."""
    return MultiViewLoader(build_dataset(cfg, split, rank, world_size, eval_cfg),
                           prefetch_factor=cfg.prefetch_factor)
