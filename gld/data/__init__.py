"""Multi-view data: sample schema, synthetic world, format converters, shard writers and readers,
record sources, streaming.

- config.py     the `data` config section (DataConfig, its eval split)
- schema.py     stored record schema (Frame, Sequence, DatasetMeta), DataError, check_cameras
- synthetic.py  procedural ray-cast world (the built-in dataset)
- records.py    how a Sequence is laid out in MDS / tar shards (lossless)
- writers.py    write_dataset (atomic)
- readers.py    read_meta, read_sequences, iter_tar_records
- views.py      view selection, decode, resize / crop with exact intrinsics
- sources/      the record-source interface and its implementations: synthetic, tar (wds), MDS
- streaming.py  build_dataset / build_loader: batches for the trainer, resumable
- s3.py         object-storage access (endpoint and credentials from env or config)
- local_s3.py   a local S3 server (SeaweedFS) for tests and benchmarks
- formats/      readers for RealEstate10K, DL3DV, COLMAP, TartanAir, HyperSim, ...
"""
from gld.data.schema import CONVENTIONS, SCHEMA_VERSION, DatasetMeta, Frame, Sequence

__all__ = ["CONVENTIONS", "SCHEMA_VERSION", "DatasetMeta", "Frame", "Sequence"]
