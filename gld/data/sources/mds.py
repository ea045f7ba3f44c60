"""MDS shards through mosaicml-streaming (`data.source: mds`) as a record source.

Partition, per epoch: mosaicml-streaming's own (samples split across nodes, ranks, workers,
mixed by `data.weights` as stream proportions; samples padded when the count does not divide
evenly). Its resume state is written from (epoch, step) before the workers start, never read
back from its shared memory (another rank of the node may be rewriting that). Shard-level
failures (missing object, truncated file) always raise, even with skip_bad: streaming downloads
in background threads.

`MDSRecords` is the StreamingDataset underneath: it yields (sample id, where, raw record or
DataError), records the epoch and offset each iteration starts at (`started_at`), and turns
shard failures into DataErrors that name the shard (`raise_failure`).

Why a subclass: streaming downloads in background threads and, when one fails, its iterator
simply stops early; `raise_failure` turns that into an error instead of a short epoch.

Fork safety: each stream's downloader keeps its S3 client (and that client's keep-alive
connections) from the first download, which is `index.json` in the local leader's main process.
DataLoader workers are forked from that process and would inherit the client; two workers
writing requests to one inherited socket read each other's responses, so a worker saved shard 3's
bytes as `shard.00000.mds`. Every process therefore downloads through its own downloaders
(`_own_downloaders`).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from typing import Iterator, Optional

from streaming import Stream, StreamingDataset
from streaming.base.storage.download import CloudDownloader
from streaming.base.world import World

from gld.data import records, s3
from gld.data.readers import read_meta
from gld.data.schema import DataError
from gld.data.sources.base import Item, RecordSource, StoredRecord, WorkerShare

__all__ = ["MDSSource", "MDSRecords"]


class MDSRecords(StreamingDataset):
    """StreamingDataset yielding (sample id, where, raw record or DataError), recording the
    epoch it starts and turning shard failures into DataErrors that name the shard."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gld_pid = os.getpid()  # the process whose downloaders these are

    def _own_downloaders(self) -> None:
        """Give each stream a fresh downloader when running in a process other than the one that
        built the dataset (a forked DataLoader worker): the inherited ones hold the parent's
        open connections. Replaced before the pid is recorded, so a second thread of a new
        worker never downloads through an inherited one (at worst it replaces them again)."""
        pid = os.getpid()
        if self.__dict__.get("_gld_pid") != pid:
            for stream in self.streams:
                stream._downloader = CloudDownloader.get(stream.remote)
            self._gld_pid = pid

    def __iter__(self):
        self._own_downloaders()  # before streaming starts its download threads
        yield from super().__iter__()

    def _resume_incr_epoch(self):
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._gld_started_at = (epoch, sample_in_epoch)
        return epoch, sample_in_epoch

    @property
    def started_at(self) -> tuple[int, int]:
        """(epoch, sample in epoch) the current iteration started at (after its first item)."""
        return self._gld_started_at

    def _shard_name(self, shard_id: int) -> str:
        shard = self.shards[shard_id]
        stream = self.streams[self.stream_per_shard[shard_id]]
        return f"{stream.remote or stream.local}/{shard.raw_data.basename}"

    def prepare_shard(self, shard_id: int, blocking: bool = True):
        self._own_downloaders()
        try:
            out = super().prepare_shard(shard_id, blocking)
        except Exception as e:
            msg = f"shard {self._shard_name(shard_id)}: cannot fetch ({type(e).__name__}: {e})"
            self.__dict__.setdefault("_gld_failures", []).append(msg)
            raise DataError(msg) from None
        return out

    def raise_failure(self) -> None:
        """Raise the first download failure of streaming's background threads, if any."""
        fails = self.__dict__.get("_gld_failures")
        if fails:
            raise DataError(fails[0])
        if getattr(self, "_event", None) is not None and self._event.is_set():
            raise DataError("mosaicml-streaming's download thread failed (see the log above)")

    def _truncation(self, shard_id: int) -> Optional[str]:
        shard = self.shards[shard_id]
        path = os.path.join(self.streams[self.stream_per_shard[shard_id]].local,
                            shard.raw_data.basename)
        if os.path.exists(path) and os.path.getsize(path) != shard.raw_data.bytes:
            return (f"shard file has {os.path.getsize(path)} bytes, index.json says "
                    f"{shard.raw_data.bytes} (truncated shard)")
        return None

    def __getitem__(self, sample_id: int):
        shard_id, local = self.spanner[sample_id]
        where = f"shard {self._shard_name(shard_id)} record {local} (sample {sample_id})"
        try:
            raw = self.get_item(sample_id)
        except Exception as e:
            self.raise_failure()
            trunc = self._truncation(shard_id)
            if trunc:
                raise DataError(f"{where}: {trunc}") from None
            return sample_id, where, DataError(f"{where}: unreadable ({type(e).__name__}: {e})")
        trunc = self._truncation(shard_id)
        if trunc:  # a shard-level fault: always raised, even with skip_bad
            raise DataError(f"{where}: {trunc}")
        return sample_id, where, raw


class MDSSource(RecordSource):
    """`records`: the `MDSRecords` over every path, one mosaicml-streaming Stream each (public
    for tools and tests that look at its streams and shards)."""

    kind = "mds"

    def __init__(self, paths: list[str], weights=(), endpoint: Optional[str] = None,
                 cache_dir: Optional[str] = None, **kw):
        super().__init__(**kw)
        streams = []
        total_w = sum(weights) if weights else 0
        for i, path in enumerate(paths):
            meta = read_meta(path, endpoint)  # refuses incomplete datasets
            if meta.writer != "mds":
                raise DataError(f"{path}: written by the {meta.writer!r} writer, but "
                                f"data.source='mds'")
            if s3.is_s3(path):
                root = cache_dir or os.path.join(tempfile.gettempdir(), "gld-cache")
                local = os.path.join(root, hashlib.sha1(path.encode()).hexdigest()[:16])
                remote = path
            else:
                local, remote = path, None
            mix = {"proportion": weights[i] / total_w} if total_w else {}
            streams.append(Stream(remote=remote, local=local, **mix))
        # Fixed (not streaming's lazy default) so the resume state can be built without it.
        self.num_nodes = World.detect().num_nodes
        self.records = MDSRecords(streams=streams, batch_size=self.batch_size,
                                  shuffle=self.shuffle, shuffle_seed=self.seed,
                                  num_canonical_nodes=self.num_nodes, allow_unsafe_types=False)
        self.num_records = self.records.num_samples

    def steps_per_epoch(self) -> int:
        size = self.records.epoch_size
        return -(-size // (self.batch_size * self.world_size)) if size else 0

    def seek(self, epoch: int, step: int) -> None:
        # Always written: a stale resume state left in shared memory by an earlier job must
        # not apply.
        super().seek(epoch, step)
        self.records.load_state_dict({
            "epoch": self.epoch, "sample_in_epoch": self.step * self.batch_size * self.world_size,
            "num_canonical_nodes": self.num_nodes, "shuffle_seed": self.seed,
            "initial_physical_nodes": self.num_nodes})

    def items(self, worker: int, num_workers: int) -> WorkerShare:
        it = iter(self.records)
        first = next(it, None)  # starts streaming's epoch: fixes `started_at`
        if first is None:
            self.records.raise_failure()
            return WorkerShare(self.epoch, range(0), iter(()))
        epoch, sample_in_epoch = self.records.started_at
        s0 = sample_in_epoch // (self.batch_size * self.world_size)
        return WorkerShare(epoch, self.worker_steps(s0, worker, num_workers),
                           self._items(first, it))

    def _items(self, first, rest) -> Iterator[Item]:
        for sid, where, raw in itertools.chain([first], rest):
            if isinstance(raw, DataError):
                def load(e=raw):
                    raise e
            else:
                def load(raw=raw, where=where):
                    return StoredRecord(records.from_mds(raw, where), where)
            yield Item(sid, where, load)
        self.records.raise_failure()

    def finish(self) -> None:
        self.records.raise_failure()
