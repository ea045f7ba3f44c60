"""mosaicml-streaming adapter: a StreamingDataset that yields (sample id, where, raw record or
DataError), records the epoch and offset it starts at (so batches know their global step), and
turns shard failures into DataErrors that name the shard.

Why a subclass: streaming downloads in background threads and, when one fails, its iterator
simply stops early; `_raise_failure` turns that into an error instead of a short epoch.
"""
from __future__ import annotations

import os
from typing import Optional

from streaming import StreamingDataset

from gld.data.schema import DataError

__all__ = ["MDSRecords"]


class MDSRecords(StreamingDataset):
    """StreamingDataset yielding (sample id, where, raw record or DataError), recording the
    epoch it starts and turning shard failures into DataErrors that name the shard."""

    def _resume_incr_epoch(self):
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._gld_epoch, self._gld_sample_in_epoch = epoch, sample_in_epoch
        return epoch, sample_in_epoch

    def _shard_name(self, shard_id: int) -> str:
        shard = self.shards[shard_id]
        stream = self.streams[self.stream_per_shard[shard_id]]
        return f"{stream.remote or stream.local}/{shard.raw_data.basename}"

    def prepare_shard(self, shard_id: int, blocking: bool = True):
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
