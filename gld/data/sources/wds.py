"""Tar shards (WebDataset layout, `data.source: wds`) as a record source.

Partition, per epoch: the shards (shuffled by seed + epoch) go round robin to the R x W
(rank, worker) slots; records within a shard are permuted; every slot yields the same number
of batches (the smallest slot's), so the surplus records of bigger slots are left out of that
epoch (`plan(epoch)` says how many). A resume skips whole shards by their stored counts.
Memory: one shard per worker (a shard is read whole to permute it).

A shard that is missing, truncated or unreadable raises a DataError naming it; with skip_bad
its records that could not be read are served as bad items (counted, replaced by the stream).
"""
from __future__ import annotations

from typing import Iterator, Optional

from gld.data import records, s3
from gld.data.readers import iter_tar_records, read_meta
from gld.data.schema import DataError
from gld.data.sources.base import Item, RecordSource, StoredRecord, WorkerShare

__all__ = ["WdsSource"]


class WdsSource(RecordSource):
    kind = "wds"
    # Records go to (rank, worker) slots: another worker count serves other records.
    resume_keys = RecordSource.resume_keys + ("num_workers",)

    def __init__(self, paths: list[str], endpoint: Optional[str] = None,
                 skip_bad: bool = False, **kw):
        super().__init__(**kw)
        self.endpoint, self.skip_bad = endpoint, skip_bad
        self.shards = []  # (url, num_records, first global record id, file bytes)
        for path in paths:
            meta = read_meta(path, endpoint)
            if meta.writer != "wds":
                raise DataError(f"{path}: written by the {meta.writer!r} writer, but "
                                f"data.source='wds'")
            for info in meta.shards:
                self.shards.append((s3.join(path, info["name"]), int(info["num_records"]),
                                    self.num_records, int(info["bytes"])))
                self.num_records += int(info["num_records"])

    def plan(self, epoch: int) -> tuple[list[list[int]], int, int]:
        """(shard indices per (rank, worker) slot, batches per slot, records left out)."""
        S = self.world_size * self.num_workers
        order = self.order(epoch, len(self.shards), 29)
        slots = [list(order[q::S]) for q in range(S)]
        counts = [sum(self.shards[i][1] for i in slot) for slot in slots]
        per_slot = min(counts) // self.batch_size
        return slots, per_slot, sum(counts) - per_slot * self.batch_size * S

    def steps_per_epoch(self) -> int:
        return self.plan(0)[1] * self.num_workers

    def items(self, worker: int, num_workers: int) -> WorkerShare:
        steps = self.worker_steps(self.step, worker, num_workers)
        return WorkerShare(self.epoch, steps, self._items(self.epoch, steps.start, num_workers))

    def _items(self, epoch: int, first: int, W: int) -> Iterator[Item]:
        # Step k belongs to slot k mod W of this rank, as its batch k // W; after a resume at
        # s0 worker w serves steps s0 + w + jW: one slot, from batch (s0 + w) // W.
        slots, _, _ = self.plan(epoch)
        slot = slots[self.rank * W + first % W]
        skip = (first // W) * self.batch_size
        for shard_i in slot:
            url, count, base, size = self.shards[shard_i]
            if skip >= count:
                skip -= count
                continue
            perm = self.order(epoch, count, shard_i, 37)
            loaded = {item.sample_id - base: item for item in self._read_shard(url, count, base,
                                                                               size)}
            for local in perm[skip:]:
                yield loaded[int(local)]
            skip = 0

    def _read_shard(self, url: str, count: int, base: int, size: int) -> Iterator[Item]:
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
            yield Item(base + i, where, lambda raw=raw, where=where: StoredRecord(
                records.from_wds(raw, where), where))
        if error is not None:
            def fail(e=error):
                raise e
            for i in range(len(got), count):
                yield Item(base + i, f"shard {url} record {i} (sample {base + i})", fail)
