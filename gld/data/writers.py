"""Shard writers: MDS via mosaicml-streaming, tar shards via webdataset (readers: readers.py).

`write_dataset(sequences, output, writer, meta)` stores each `Sequence` (or chunks of
`max_frames` frames of a long one) as one record (layout: gld/data/records.py). Writing is
atomic: everything goes into a hidden temporary folder beside `output`, every file is fsynced,
`gld_meta.json` is written last, and the folder is renamed to `output` in one step. For an
`s3://` output the finished folder is uploaded with `gld_meta.json` as the last object. Readers
refuse a dataset without `gld_meta.json`, so a half-written dataset never looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator, Literal, Optional

from gld.data import records, s3
from gld.data.schema import META_FILE, DataError, DatasetMeta, Sequence, check_cameras

__all__ = ["write_dataset", "chunk_sequence"]


def chunk_sequence(seq: Sequence, max_frames: Optional[int]) -> list[Sequence]:
    """Split a long sequence into records of at most `max_frames` consecutive frames
    (original frame indices are kept; the scene id is shared)."""
    if not max_frames or len(seq.frames) <= max_frames:
        return [seq]
    return [Sequence(seq.scene_id, seq.frames[i:i + max_frames], seq.source)
            for i in range(0, len(seq.frames), max_frames)]


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WdsShards:
    """Rolls tar shards `shard-000000.tar` by record count / size (webdataset.TarWriter)."""

    def __init__(self, folder: Path, max_records: int, max_bytes: int):
        self.folder, self.max_records, self.max_bytes = folder, max_records, max_bytes
        self.shards: list[dict] = []
        self.writer = None

    def _roll(self):
        import webdataset as wds

        self.close()
        name = f"shard-{len(self.shards):06d}.tar"
        self.shards.append({"name": name, "num_records": 0, "bytes": 0})
        self.writer = wds.TarWriter(str(self.folder / name), encoder=False)

    def write(self, sample: dict) -> None:
        cur = self.shards[-1] if self.shards else None
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if cur is None or cur["num_records"] >= self.max_records or (
                cur["num_records"] and cur["bytes"] + size > self.max_bytes):
            self._roll()
            cur = self.shards[-1]
        self.writer.write(sample)
        cur["num_records"] += 1
        cur["bytes"] += size

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            last = self.shards[-1]
            last["bytes"] = os.path.getsize(self.folder / last["name"])  # the file's size


@contextmanager
def atomic_output(output: str, endpoint: Optional[str], overwrite: bool, meta_file: str,
                  what: str, hint: str = "pass overwrite") -> Iterator[Path]:
    """Yield the path of a hidden folder (not yet created) to write `output` into (a local folder or an s3:// prefix).

    On a clean exit the folder is fsynced and replaces `output` with one rename (a local
    destination), or is uploaded with `meta_file` last (s3://, staged locally first), so a
    reader never sees a half-written output that carries its meta file. On any error the
    partial folder is removed and `output` is left as it was. An existing output is refused
    unless `overwrite` (`what` / `hint` word the error).
    """
    remote = s3.is_s3(output)
    if remote:
        if s3.exists(s3.join(output, meta_file), endpoint) and not overwrite:
            raise FileExistsError(f"{output} already holds {what} ({hint})")
        staging_parent = tempfile.mkdtemp(prefix="gld-write-")
        final = Path(staging_parent) / "out"
    else:
        final = Path(output)
        if final.exists() and not overwrite:
            raise FileExistsError(f"{output} already exists ({hint} to replace it)")
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)  # makes the rename durable
        os.fsync(fd)
        os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if remote:
            shutil.rmtree(staging_parent, ignore_errors=True)
        raise
    if remote:
        try:
            s3.upload_dir(str(final), output, last=(meta_file,), endpoint=endpoint)
        finally:
            shutil.rmtree(staging_parent, ignore_errors=True)


def write_dataset(sequences: Iterable[Sequence], output: str,
                  writer: Literal["mds", "wds"] = "mds", meta: Optional[DatasetMeta] = None, *,
                  max_frames: Optional[int] = None, shard_records: int = 64,
                  shard_bytes: int = 1 << 28, validate: bool = True, overwrite: bool = False,
                  progress: bool = False, endpoint: Optional[str] = None) -> DatasetMeta:
    """Write sequences as a sharded dataset; returns the metadata written to gld_meta.json.

    sequences: any iterable (consumed once, streamed: memory stays at one shard).
    output: local folder or s3:// prefix; must not exist unless `overwrite`.
    writer: "mds" (mosaicml-streaming `shard.NNNNN.mds` + `index.json`) or "wds"
        (`shard-NNNNNN.tar`).
    meta: dataset metadata (source, extra, ...); counts, sizes, shards and writer are filled in.
    max_frames: split longer sequences into records of this many frames.
    shard_records / shard_bytes: a shard closes after this many records / about this size.
    validate: check cameras with `check_cameras` before writing (raise DataError naming the
        scene and frame); False only to build bad-data fixtures.
    """
    if writer not in ("mds", "wds"):
        raise ValueError(f"writer must be 'mds' or 'wds', got {writer!r}")
    meta = DatasetMeta(source="") if meta is None else meta
    with atomic_output(output, endpoint, overwrite, META_FILE, "a dataset",
                       "pass overwrite=True") as tmp:
        _write_shards(sequences, tmp, writer, meta, max_frames, shard_records, shard_bytes,
                      validate, progress)
        (tmp / META_FILE).write_text(meta.to_json())
    return meta


def _write_shards(sequences, folder: Path, writer, meta: DatasetMeta, max_frames, shard_records,
                  shard_bytes, validate, progress) -> None:
    from tqdm import tqdm

    sizes, fmts = set(), set()
    n_seq = n_rec = n_frames = 0
    has_depth = False
    scenes = set()
    if writer == "mds":
        from streaming import MDSWriter

        out = MDSWriter(out=str(folder), columns=records.MDS_COLUMNS, compression=None,
                        size_limit=shard_bytes, max_workers=1, exist_ok=True)
    else:
        folder.mkdir()
        out = _WdsShards(folder, shard_records, shard_bytes)
    mds_count = 0
    try:
        for seq in tqdm(sequences, desc=f"writing {writer}", unit="seq", disable=not progress):
            n_seq += 1
            scenes.add(seq.scene_id)
            for rec in chunk_sequence(seq, max_frames):
                fields = records.sequence_fields(rec)
                m, K, c2w, _ = fields
                if validate:
                    check_cameras(K, c2w, m["image_sizes"], where=f"scene {rec.scene_id!r}")
                if writer == "mds":
                    if mds_count >= shard_records:  # MDSWriter rolls by size; roll by count too
                        out.flush_shard()
                        out._reset_cache()
                        mds_count = 0
                    out.write(records.to_mds(rec, fields))
                    mds_count += 1
                else:
                    out.write(records.to_wds(rec, f"{n_rec:09d}", fields))
                n_rec += 1
                n_frames += len(rec.frames)
                sizes.update(tuple(s) for s in m["image_sizes"])
                fmts.add(m["image_format"])
                has_depth |= m["has_depth"]
    finally:
        if writer == "mds":
            out.finish()
        else:
            out.close()
    if n_rec == 0:
        raise DataError("write_dataset: no sequences to write")
    meta.writer = writer
    meta.num_sequences, meta.num_records, meta.num_frames = len(scenes), n_rec, n_frames
    meta.image_sizes = sorted(sizes)
    meta.image_format = fmts.pop() if len(fmts) == 1 else "mixed"
    meta.has_depth = has_depth
    if writer == "mds":
        index = json.loads((folder / "index.json").read_text())
        meta.shards = [{"name": s["raw_data"]["basename"], "num_records": s["samples"],
                        "bytes": s["raw_data"]["bytes"]} for s in index["shards"]]
    else:
        meta.shards = out.shards
