"""Record sources: the one interface through which the stream reads records (base.py), and its
three implementations: the synthetic world (synthetic.py), tar shards (wds.py) and MDS shards
through mosaicml-streaming (mds.py, imported only when used: mosaicml-streaming takes seconds to
import). `gld.data.streaming.open_source` picks one from the config."""
from gld.data.sources.base import Item, Record, RecordSource, StoredRecord, WorkerShare

__all__ = ["Item", "Record", "RecordSource", "StoredRecord", "WorkerShare"]
