"""Multi-view data: sample schema, synthetic world, format converters, shard writers, streaming."""
from gld.data.schema import CONVENTIONS, SCHEMA_VERSION, DatasetMeta, Frame, Sequence

__all__ = ["CONVENTIONS", "SCHEMA_VERSION", "DatasetMeta", "Frame", "Sequence"]
