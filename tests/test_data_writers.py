"""Shard writers: lossless round trip (bytes, float64 cameras, depth), chunking, atomic output,
validation at write time."""
import json

import numpy as np
import pytest

from gld.data.schema import META_FILE, DataError, DatasetMeta
from gld.data.synthetic import synthetic_sequence
from gld.data.readers import read_meta, read_sequences
from gld.data.writers import chunk_sequence, write_dataset


def _seqs(n=3, frames=5, fmt="png"):
    return [synthetic_sequence(7, i, frames, (20, 28), fmt, with_depth=i % 2 == 0)
            for i in range(n)]


@pytest.mark.parametrize("writer", ["mds", "wds"])
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_round_trip_is_lossless(tmp_path, writer, fmt):
    seqs = _seqs(fmt=fmt)
    seqs[1].frames[2].c2w[0, 3] = 1.0 / 3.0  # a value that float32 cannot hold
    meta = write_dataset(seqs, str(tmp_path / "ds"), writer, DatasetMeta(source="synthetic"),
                         shard_records=2, max_frames=3)
    assert meta.num_records == 6 and meta.num_sequences == 3 and meta.num_frames == 15
    assert sum(s["num_records"] for s in meta.shards) == 6 and len(meta.shards) == 3
    assert read_meta(str(tmp_path / "ds")).to_json() == meta.to_json()
    back = list(read_sequences(str(tmp_path / "ds")))
    want = [r for s in seqs for r in chunk_sequence(s, 3)]
    assert len(back) == len(want)
    for a, b in zip(want, back):
        assert (a.scene_id, a.source) == (b.scene_id, b.source)
        for fa, fb in zip(a.frames, b.frames):
            assert fa.image == fb.image  # exact bytes: PNG pixels equal, JPEG not re-encoded
            assert fb.K.dtype == np.float64 and np.array_equal(fa.K, fb.K)
            assert np.array_equal(fa.c2w, fb.c2w)
            assert (fa.index, fa.timestamp) == (fb.index, fb.timestamp)
            if fa.depth is None:
                assert fb.depth is None
            else:
                assert np.array_equal(fa.depth, fb.depth)


def test_output_is_atomic(tmp_path):
    out = tmp_path / "ds"

    def failing():
        yield from _seqs(2)
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        write_dataset(failing(), str(out), "wds")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written folder
    write_dataset(_seqs(1), str(out), "mds")
    with pytest.raises(FileExistsError):
        write_dataset(_seqs(1), str(out), "mds")
    write_dataset(_seqs(2), str(out), "wds", overwrite=True)
    assert read_meta(str(out)).writer == "wds" and len(list(read_sequences(str(out)))) == 2
    (out / META_FILE).unlink()  # what a reader sees of an unfinished dataset
    with pytest.raises(DataError, match="no gld_meta.json: the dataset is incomplete"):
        list(read_sequences(str(out)))


def test_write_validates_cameras(tmp_path):
    seqs = _seqs(2)
    seqs[1].frames[3].c2w = seqs[1].frames[3].c2w * 2.0
    with pytest.raises(DataError, match="scene 'synthetic-7-000001'.*frame 3.*not rigid"):
        write_dataset(seqs, str(tmp_path / "ds"), "mds")
    assert not (tmp_path / "ds").exists()
    seqs = _seqs(1)
    seqs[0].frames[0].K = seqs[0].frames[0].K / np.array([[28.0], [20.0], [1.0]])
    with pytest.raises(DataError, match="normalised intrinsics"):
        write_dataset(seqs, str(tmp_path / "ds"), "wds")


def test_meta_records_conventions(tmp_path):
    write_dataset(_seqs(2, fmt="jpeg"), str(tmp_path / "ds"), "wds",
                  DatasetMeta(source="synthetic", extra={"note": "x"}))
    meta = json.loads((tmp_path / "ds" / META_FILE).read_text())
    assert meta["conventions"]["extrinsics"].startswith("c2w, OpenCV")
    assert meta["image_format"] == "jpeg" and meta["image_sizes"] == [[20, 28]]
    assert meta["has_depth"] and meta["extra"] == {"note": "x"}
