"""The statistics pass: per-channel moments of raw levels over a data stream, on one or more
ranks, with a result that does not depend on the number of ranks.

    loader = build_loader(replace(cfg.data, batch_size=global_batch // world), "train")
    stats = collect_stats(space, loader, batches=500, levels=[1])   # on every rank

Why the result is the same on 1 or R ranks (up to float64 rounding):
- the samples: every rank loads `global_batch / R` samples per step, so step k covers the same
  global batch whatever R is, for sources that share out a global batch by position (the
  synthetic source: step k of rank r is positions [k G + r G/R, k G + (r+1) G/R) of the
  epoch's order, and a batch's resolution depends on (seed, epoch, step) only);
- the encoder's numbers: samples are encoded `encode_batch` at a time, a shape that does not
  depend on R (a matmul over another batch size may sum in another order);
- the reduction: `Moments` merge exactly (Chan et al.), across ranks in rank order.
The mds and wds sources share records out by their own rules, which depend on the rank count
(gld/data/sources/): there R ranks read other samples of the same data, and the statistics
agree within sampling noise, not to the last bit.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch

from gld.latents.moments import Moments
from gld.latents.ranks import merge_across_ranks
from gld.latents.space import LatentSpace
from gld.latents.stats import LatentStats

__all__ = ["take_batches", "level_moments", "collect_stats"]


def take_batches(loader: Iterable[dict], batches: int) -> Iterator[dict]:
    """The first `batches` batches of a loader whose `for` runs one epoch (gld.data's
    `MultiViewLoader`), continuing into the next epochs as needed."""
    done = 0
    while done < batches:
        before = done
        for batch in loader:
            yield batch
            done += 1
            if done == batches:
                return
        if done == before:
            raise ValueError("the data stream yields no batch: fewer samples than one global "
                             "batch (data.batch_size x ranks)?")


def level_moments(space: LatentSpace, batches: Iterable[dict], levels: Sequence[int],
                  encode_batch: int = 1, device=None) -> dict[int, Moments]:
    """{level: Moments} of the raw patch features of `levels` over every batch.

    A batch holds "images" (B, V, 3, H, W) uint8 (gld/data/streaming.py); B must be a multiple
    of `encode_batch`, the samples the encoder sees per call.
    """
    device = torch.device(device) if device is not None else next(space.parameters()).device
    C = space.channels
    acc = {lv: Moments.empty(C, device) for lv in levels}
    for batch in batches:
        images = batch["images"]
        if images.shape[0] % encode_batch:
            raise ValueError(f"a batch of {images.shape[0]} samples does not split into "
                             f"encoder calls of {encode_batch}")
        for i in range(0, images.shape[0], encode_batch):
            x = images[i:i + encode_batch].to(device, non_blocking=True).float() / 255.0
            raw = space.encode_levels(x)
            for lv in levels:
                acc[lv] = acc[lv].add(raw[lv].features)
    return acc


def collect_stats(space: LatentSpace, loader: Iterable[dict], batches: int,
                  levels: Sequence[int], encode_batch: int = 1,
                  info: Optional[Mapping[str, str]] = None) -> LatentStats:
    """`LatentStats` of `levels` over the first `batches` batches of `loader` on this rank,
    merged over all ranks of the default process group (when one is initialised): every rank
    returns the same statistics."""
    mine = level_moments(space, take_batches(loader, batches), levels, encode_batch)
    total = merge_across_ranks(mine)
    return LatentStats.from_moments(total, space.encoder.variant, info)
