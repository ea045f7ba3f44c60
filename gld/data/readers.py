"""Shard readers: the dataset's metadata, every record back as a Sequence, one tar shard's
records. Training streams through gld/data/streaming.py; `read_sequences` is for round-trip
tests and tools.

`read_meta` refuses a dataset without `gld_meta.json` (written last by `write_dataset`), so a
half-written dataset never looks complete.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from gld.data import records, s3
from gld.data.schema import META_FILE, DataError, DatasetMeta, Sequence, check_cameras, \
    sequence_cameras

__all__ = ["read_meta", "read_sequences", "iter_tar_records"]


def read_meta(path: str, endpoint: Optional[str] = None) -> DatasetMeta:
    """The dataset's gld_meta.json; DataError if absent (incomplete or not a GLD dataset)."""
    url = s3.join(path, META_FILE)
    try:
        text = s3.read_bytes(url, endpoint).decode()
    except FileNotFoundError:
        raise DataError(f"{path}: no {META_FILE}: the dataset is incomplete (still being "
                        f"written, or the write failed) or is not a GLD dataset") from None
    return DatasetMeta.from_json(text)


def read_sequences(path: str, endpoint: Optional[str] = None,
                   check: bool = True) -> Iterator[Sequence]:
    """Yield every stored record as a Sequence, in write order (exact bytes and float64 cameras).

    path: local folder or s3:// prefix written by `write_dataset`. check: validate cameras
    (DataError naming shard and record index on failure).
    """
    meta = read_meta(path, endpoint)
    if meta.writer == "mds":
        yield from _read_mds(path, meta, endpoint, check)
    else:
        yield from _read_wds(path, meta, endpoint, check)


def _read_mds(path, meta, endpoint, check):
    from streaming.base.format import reader_from_json

    tmp = None
    local = path
    if s3.is_s3(path):
        tmp = local = tempfile.mkdtemp(prefix="gld-read-")
        s3.download_dir(path, tmp, endpoint)
    try:
        index = json.loads((Path(local) / "index.json").read_text())
        for info in index["shards"]:
            shard = reader_from_json(local, None, info)
            name = info["raw_data"]["basename"]
            for i in range(shard.samples):
                where = f"{path}/{name} record {i}"
                try:
                    raw = shard[i]
                except Exception as e:
                    raise DataError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
                yield _checked(records.from_mds(raw, where), where, check)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def iter_tar_records(url: str, endpoint: Optional[str] = None,
                     expected_bytes: Optional[int] = None) -> Iterator[tuple[int, dict]]:
    """(index in shard, {member suffix: bytes, '__key__': key}) for each record of one tar
    shard; DataError naming the shard (and record) when it is missing, has another size than
    `expected_bytes` (truncated: tar readers stop silently at a block boundary) or is
    unreadable."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    i = -1
    if expected_bytes is not None:
        try:
            size = s3.size_of(url, endpoint)
        except FileNotFoundError as e:
            raise DataError(f"shard {url}: missing ({e})") from None
        if size != expected_bytes:
            raise DataError(f"shard {url}: {size} bytes, {META_FILE} says {expected_bytes} "
                            f"(truncated shard)")
    try:
        stream = s3.open_binary(url, endpoint)
    except FileNotFoundError as e:
        raise DataError(f"shard {url}: missing ({e})") from None
    try:
        members = tar_file_expander([{"url": url, "stream": stream}],
                                    handler=_reraise)
        for i, sample in enumerate(group_by_keys(members, handler=_reraise)):
            yield i, sample
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"shard {url}: truncated or corrupt tar after record {i} "
                        f"({type(e).__name__}: {e})") from None
    finally:
        stream.close()


def _reraise(exn):
    raise exn


def _read_wds(path, meta, endpoint, check):
    for info in meta.shards:
        url = s3.join(path, info["name"])
        n = 0
        for i, sample in iter_tar_records(url, endpoint, info["bytes"]):
            where = f"{url} record {i}"
            n += 1
            yield _checked(records.from_wds(sample, where), where, check)
        if n != info["num_records"]:
            raise DataError(f"shard {url}: {n} records, {META_FILE} says {info['num_records']} "
                            f"(truncated shard?)")


def _checked(seq: Sequence, where: str, check: bool) -> Sequence:
    if check:
        check_cameras(*sequence_cameras(seq), seq.image_sizes, where)
    return seq
