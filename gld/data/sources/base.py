"""The record-source interface: what the stream needs from any store of records.

A source holds the records of one split and shares them out per epoch: to this rank, and
within the rank to DataLoader worker `w` of `W`, which builds the batches of steps
`first + w, first + w + W, ...` (torch's round robin from the step `first` the iteration
started at). For those steps it yields, in order, `batch_size` items per step. An item is a
sample id (global record index), where it is stored (for error messages) and a `load()` that
returns a `Record`; bad data raises `DataError` from `load()` or `Record.sample`, so the stream
can skip it (cfg.data.skip_bad) and keep its batch size.

Lifecycle: `seek(epoch, step)` in the main process before the workers start (the position the
next iteration starts from), `items(worker, num_workers)` in each worker, `finish()` in each
worker after its last batch. `state_dict()` is what an exact resume needs to be the same;
`load_state_dict(state)` refuses a checkpoint written with other values.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator, NamedTuple, Protocol

import numpy as np

from gld.data.schema import Sequence, check_cameras, sequence_cameras
from gld.data.views import ViewSpec, make_sample

__all__ = ["Item", "Record", "RecordSource", "StoredRecord", "WorkerShare"]


class Record(Protocol):
    """A loaded record: `num_frames` to draw views from, and `sample` to make them."""

    num_frames: int

    def sample(self, positions: np.ndarray, source_mask: np.ndarray, out: tuple[int, int],
               spec: ViewSpec, sample_id: int) -> dict:
        """The sample dict (gld/data/views.py) of frames `positions` at resolution `out`."""


class Item(NamedTuple):
    sample_id: int
    where: str  # "shard <url> record <i> (sample <id>)", "synthetic scene <id>"
    load: Callable[[], Record]


class WorkerShare(NamedTuple):
    """What one worker serves in one iteration: `items` for `steps` (batch_size per step)."""

    epoch: int
    steps: range
    items: Iterator[Item]


class StoredRecord:
    """A stored `Sequence`. Every frame's camera is checked on load, not only the chosen
    views', so a bad record fails every time it is drawn."""

    def __init__(self, seq: Sequence, where: str):
        check_cameras(*sequence_cameras(seq), seq.image_sizes, f"{where} (scene {seq.scene_id!r})")
        self.seq, self.where, self.num_frames = seq, where, len(seq.frames)

    def sample(self, positions, source_mask, out, spec, sample_id) -> dict:
        return make_sample(self.seq, positions, source_mask, out, spec, self.where, sample_id)


class RecordSource(ABC):
    """Records of one split for one rank (see the module docstring).

    kind: the `data.source` name. batch_size, rank, world_size, num_workers (at least 1: no
    workers is one share), seed and shuffle are the stream's.
    """

    kind = ""
    # Checked on resume: a different value would serve other records at the same step.
    resume_keys = ("source", "seed", "batch_size", "world_size", "num_records")

    def __init__(self, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, shuffle: bool):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = max(1, num_workers)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.step = 0, 0
        self.num_records = 0

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Batches per rank in one epoch (the same on every rank)."""

    @abstractmethod
    def items(self, worker: int, num_workers: int) -> WorkerShare:
        """The share of DataLoader worker `worker` of `num_workers` from the sought position."""

    def seek(self, epoch: int, step: int) -> None:
        """Where the next iteration starts (main process, before the workers start)."""
        self.epoch, self.step = int(epoch), int(step)

    def finish(self) -> None:
        """Called in the worker after its last batch: raise what background work recorded."""

    def worker_steps(self, first: int, worker: int, num_workers: int) -> range:
        return range(first + worker, self.steps_per_epoch(), num_workers)

    def order(self, epoch: int, n: int, *salt: int) -> np.ndarray:
        """0..n-1, permuted by (seed, epoch, *salt) when shuffling."""
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch), *salt]).permutation(n)

    def state_dict(self) -> dict:
        return {"source": self.kind, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "num_records": self.num_records}

    def load_state_dict(self, state: dict) -> None:
        have = self.state_dict()
        for key in self.resume_keys:
            if state[key] != have[key]:
                raise ValueError(f"data state: {key}={state[key]} in the checkpoint, {have[key]} "
                                 f"now; an exact resume needs the same value")
