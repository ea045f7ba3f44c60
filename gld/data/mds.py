"""mosaicml-streaming adapter: a StreamingDataset that yields (sample id, where, raw record or
DataError), records the epoch and offset it starts at (so batches know their global step), and
turns shard failures into DataErrors that name the shard.

Why a subclass: streaming downloads in background threads and, when one fails, its iterator
simply stops early; `_raise_failure` turns that into an error instead of a short epoch.

Fork safety: each stream's downloader keeps its S3 client (and that client's keep-alive
connections) from the first download, which is `index.json` in the local leader's main process.
DataLoader workers are forked from that process and would inherit the client; two workers
writing requests to one inherited socket read each other's responses, so a worker saved shard 3's
bytes as `shard.00000.mds`. Every process therefore downloads through its own downloaders
(`_own_downloaders`).
"""
from __future__ import annotations

import os
from typing import Optional

from streaming import StreamingDataset
from streaming.base.storage.download import CloudDownloader

from gld.data.schema import DataError

__all__ = ["MDSRecords"]


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
        self._gld_epoch, self._gld_sample_in_epoch = epoch, sample_in_epoch
        return epoch, sample_in_epoch

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

    def _raise_failure(self):
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
            self._raise_failure()
            trunc = self._truncation(shard_id)
            if trunc:
                raise DataError(f"{where}: {trunc}") from None
            return sample_id, where, DataError(f"{where}: unreadable ({type(e).__name__}: {e})")
        trunc = self._truncation(shard_id)
        if trunc:  # a shard-level fault: always raised, even with skip_bad
            raise DataError(f"{where}: {trunc}")
        return sample_id, where, raw
