"""The synthetic world as a record source (`data.source: synthetic`, gld/data/synthetic.py).

Records `0..synthetic_scenes-1` are scenes of world `seed`, each a trajectory of `view_window`
frames; only the chosen views are rendered, at the batch's resolution. Partition: the records
permuted by (seed, epoch); step k of rank r takes positions [k B R + r B, k B R + (r + 1) B).
"""
from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np
import torch

from gld.data.sources.base import Item, RecordSource, WorkerShare
from gld.data.synthetic import render, scene_cameras, to_uint8

__all__ = ["SyntheticSource", "SyntheticRecord"]


class SyntheticRecord:
    """Scene `index` of world `seed` along a trajectory of `num_frames` frames."""

    def __init__(self, seed: int, index: int, num_frames: int):
        self.seed, self.index, self.num_frames = seed, index, num_frames

    def sample(self, positions, source_mask, out, spec, sample_id) -> dict:
        scene, K, c2w = scene_cameras(self.seed, self.index, self.num_frames, out)
        rgb, depth = render(scene, c2w[positions], K[positions], *out)
        sample = {
            "images": torch.from_numpy(to_uint8(rgb)).permute(0, 3, 1, 2).contiguous(),
            "K": torch.from_numpy(K[positions]).float(),
            "c2w": torch.from_numpy(c2w[positions]).float(),
            "source_mask": torch.from_numpy(source_mask),
            "frame_indices": torch.from_numpy(positions.astype(np.int64)),
            "has_depth": True, "scene_id": f"synthetic-{self.seed}-{self.index:06d}",
            "sample_id": sample_id,
        }
        if spec.load_depth:
            sample["depth"] = depth
        return sample


class SyntheticSource(RecordSource):
    kind = "synthetic"

    def __init__(self, num_scenes: int, num_frames: int, **kw):
        super().__init__(**kw)
        self.num_records, self.num_frames = num_scenes, num_frames

    def steps_per_epoch(self) -> int:
        return self.num_records // (self.batch_size * self.world_size)

    def items(self, worker: int, num_workers: int) -> WorkerShare:
        steps = self.worker_steps(self.step, worker, num_workers)
        return WorkerShare(self.epoch, steps, self._items(self.epoch, steps))

    def _items(self, epoch: int, steps: range) -> Iterator[Item]:
        order = self.order(epoch, self.num_records, 29)
        B, R = self.batch_size, self.world_size
        for k in steps:
            base = k * B * R + self.rank * B
            for i in order[base:base + B]:
                yield Item(int(i), f"synthetic scene {int(i)}",
                           partial(SyntheticRecord, self.seed, int(i), self.num_frames))
