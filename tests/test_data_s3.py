"""Streaming from a real S3-compatible server (SeaweedFS on 127.0.0.1): 2 ranks x 2 workers
see every record exactly once, a resume after k steps continues exactly, and every kind of bad
data gets an error naming the shard and the record (or is skipped and counted). Missing
credentials and an unreachable endpoint end in one line naming the endpoint and what to set."""
import socket

import numpy as np
import pytest

from gld.data import s3
from gld.data.config import DataConfig
from gld.data.readers import read_meta, read_sequences
from gld.data.schema import DataError, DatasetMeta
from gld.data.streaming import build_dataset, build_loader
from gld.data.writers import write_dataset
from tests.data_helpers import (NUM_RECORDS, cfg_dict, check_exactly_once, check_resume,
                                prepare_data, run_ranks, tiny_sequences)
from tests.s3_server import s3_server  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def s3_shards(s3_server):  # noqa: F811
    bucket = s3_server.bucket("gld-stream")
    seqs = list(tiny_sequences())
    urls = {}
    for writer in ("mds", "wds"):
        urls[writer] = f"{bucket}/tiny-{writer}"
        write_dataset(seqs, urls[writer], writer, DatasetMeta(source="synthetic"),
                      shard_records=2)
    return urls


@pytest.mark.slow  # 2 processes x 2 workers streaming from S3: 6-12 s
@pytest.mark.parametrize("source", ["mds", "wds"])
def test_two_ranks_two_workers_exactly_once_and_resume(s3_shards, source, tmp_path):
    cfg = cfg_dict(source, [s3_shards[source]], cache_dir=str(tmp_path / "cache"))
    results = run_ranks(cfg, 2, resume_after=3)
    check_exactly_once(results, NUM_RECORDS)
    for res in results:
        check_resume(res, 3)


def test_mds_forked_workers_download_through_their_own_connections(s3_shards, tmp_path):
    """The local leader fetches index.json through each stream's downloader, which keeps the
    S3 client and its keep-alive connection; forked DataLoader workers inherited both, and two
    processes on one socket read each other's responses (shard 3's bytes saved as shard 0).
    A forked process must download through a downloader of its own."""
    import multiprocessing as mp
    import os

    cfg = DataConfig(**cfg_dict("mds", [s3_shards["mds"]], num_workers=0,
                                cache_dir=str(tmp_path / "cache")))
    records = build_dataset(cfg).source.records
    stream = records.streams[0]
    assert getattr(stream._downloader, "_s3_client", None) is not None  # index.json came here

    def child(q):
        inherited = stream._downloader  # held, so a new one cannot reuse its address
        records.prepare_shard(0)
        path = os.path.join(stream.local, records.shards[0].raw_data.basename)
        q.put((stream._downloader is not inherited,
               os.path.getsize(path) == records.shards[0].raw_data.bytes))

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    got = q.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0 and got == (True, True)


def test_s3_round_trip_and_endpoint_from_config(s3_shards, monkeypatch):
    endpoint = s3.client().meta.endpoint_url
    monkeypatch.delenv("S3_ENDPOINT_URL")
    s3._CLIENTS.clear()
    back = list(read_sequences(s3_shards["wds"], endpoint=endpoint))
    want = list(tiny_sequences())
    assert [b.scene_id for b in back] == [w.scene_id for w in want]
    assert all(fa.image == fb.image and np.array_equal(fa.c2w, fb.c2w)
               for a, b in zip(want, back) for fa, fb in zip(a.frames, b.frames))
    cfg = DataConfig(**cfg_dict("wds", [s3_shards["wds"]], s3_endpoint=endpoint,
                                num_workers=0))
    assert len(list(build_loader(cfg))) == NUM_RECORDS // 2
    s3._CLIENTS.clear()


# ---- bad data ------------------------------------------------------------------------------
BAD_RECORD = 1  # in shard 0 (2 records per shard)
BAD_SHARD = 1


def _flip_inside(data: bytes, needle: bytes) -> bytes:
    at = data.find(needle)
    assert at >= 0
    mid = at + len(needle) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]


def _make_bad(case, writer, bucket):
    """A 4-record dataset (2 shards) on S3 with one defect; returns (url, shard names)."""
    seqs = list(tiny_sequences(4))
    frame = seqs[BAD_RECORD].frames[2]
    if case == "undecodable_image":  # broken before writing (crc32 matches): every frame, as
        for f in seqs[BAD_RECORD].frames:  # only the sampled views are decoded
            n = len(f.image) // 2
            f.image = _flip_inside(f.image, f.image[n - 8:n + 8])
    elif case == "nan_pose":
        frame.c2w = frame.c2w.copy()
        frame.c2w[0, 3] = np.nan
    elif case == "non_rigid_pose":
        frame.c2w = frame.c2w.copy()
        frame.c2w[:3, :3] *= 1.5
    elif case == "normalised_K":
        frame.K = frame.K / np.array([[30.0], [20.0], [1.0]])
    url = f"{bucket}/{case}-{writer}"
    meta = write_dataset(seqs, url, writer, shard_records=2, validate=False, overwrite=True)
    names = [s["name"] for s in meta.shards]
    c = s3.client()
    b, prefix = s3.split_s3(url)
    if case == "corrupt_bytes":  # damaged in storage after writing: caught by the crc32
        body = s3.read_bytes(f"{url}/{names[0]}")
        c.put_object(Bucket=b, Key=f"{prefix}/{names[0]}", Body=_flip_inside(body, frame.image))
    elif case == "truncated_shard":
        body = s3.read_bytes(f"{url}/{names[BAD_SHARD]}")
        c.put_object(Bucket=b, Key=f"{prefix}/{names[BAD_SHARD]}", Body=body[:len(body) // 2])
    elif case == "missing_object":
        c.delete_object(Bucket=b, Key=f"{prefix}/{names[BAD_SHARD]}")
    return url, names


def _loader(url, writer, tmp_path, **kw):
    cfg = DataConfig(**cfg_dict(writer, [url], batch_size=1, num_workers=0,
                                cache_dir=str(tmp_path / "cache"), **kw))
    return build_loader(cfg)


SAMPLE_CASES = {
    "corrupt_bytes": "corrupt image bytes \\(crc32",
    "undecodable_image": "cannot decode image",
    "nan_pose": "frame 2: non-finite camera-to-world pose",
    "non_rigid_pose": "frame 2: camera-to-world pose is not rigid",
    "normalised_K": "frame 2: focal lengths .* normalised intrinsics",
}


@pytest.mark.parametrize("writer", ["mds", "wds"])
@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_bad_sample_error_names_shard_and_record(s3_server, tmp_path, case, writer):  # noqa: F811
    url, names = _make_bad(case, writer, s3_server.bucket("gld-bad"))
    where = f"shard {url}/{names[0]} record {BAD_RECORD} \\(sample {BAD_RECORD}\\)"
    with pytest.raises(DataError, match=f"{where}.*{SAMPLE_CASES[case]}"):
        for _ in _loader(url, writer, tmp_path):
            pass
    # skip_bad: the epoch completes, the bad record never appears, the count is reported.
    loader = _loader(url, writer, tmp_path / "skip", skip_bad=True)
    ids = [i for b in loader for i in b["sample_id"].tolist()]
    assert loader.num_skipped == 1 and BAD_RECORD not in ids and len(ids) == 4


SHARD_CASES = {
    "truncated_shard": {
        "wds": r"shard {u}/{n}: \d+ bytes, gld_meta.json says \d+ \(truncated shard\)",
        "mds": r"shard {u}/{n} record \d \(sample \d\): shard file has \d+ bytes, index.json "
               r"says \d+ \(truncated shard\)"},
    "missing_object": {"wds": r"shard {u}/{n}: missing \(object {u}/{n} does not exist",
                       "mds": r"shard {u}/{n}: cannot fetch"},
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_shard_error_names_it(s3_server, tmp_path, case):  # noqa: F811
    """A truncated or missing shard raises naming it; WDS can skip what is missing of a shard
    (its records are counted from gld_meta.json), MDS cannot (streaming downloads in background
    threads)."""
    for writer, pattern in SHARD_CASES[case].items():
        url, names = _make_bad(case, writer, s3_server.bucket("gld-bad"))
        with pytest.raises(DataError, match=pattern.format(u=url, n=names[BAD_SHARD])):
            for _ in _loader(url, writer, tmp_path / writer):
                pass
    url, names = _make_bad(case, "wds", s3_server.bucket("gld-bad"))
    loader = _loader(url, "wds", tmp_path / "skip", skip_bad=True)
    ids = [i for b in loader for i in b["sample_id"].tolist()]
    # The shard's size is checked before it is read: both of its records count as bad.
    assert loader.num_skipped == 2 and len(ids) == 4 and sorted(set(ids)) == [0, 1]


def test_incomplete_dataset_is_refused(s3_server, tmp_path):  # noqa: F811
    url, _ = _make_bad("nan_pose", "wds", s3_server.bucket("gld-bad"))
    b, prefix = s3.split_s3(url)
    s3.client().delete_object(Bucket=b, Key=f"{prefix}/gld_meta.json")
    with pytest.raises(DataError, match="no gld_meta.json: the dataset is incomplete"):
        read_meta(url)
    with pytest.raises(DataError, match="no gld_meta.json"):
        _loader(url, "wds", tmp_path)


# ---- S3 that cannot be used as configured ------------------------------------------------------
@pytest.fixture
def dead_endpoint(monkeypatch):
    """S3_ENDPOINT_URL on a closed loopback port, no credentials anywhere boto3 looks (files,
    metadata service), one attempt per request."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "BOTO_CONFIG"):
        monkeypatch.setenv(key, "/nonexistent/gld-test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setattr(s3, "_CLIENTS", {})
    return endpoint


def _one_line_naming(text: str, endpoint: str, reason: str) -> None:
    assert len(text.strip().splitlines()) == 1, text
    for part in (endpoint, reason, "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        assert part in text, (part, text)


def test_s3_output_without_credentials(dead_endpoint, capsys):
    assert prepare_data("synthetic", "scenes=1,frames=2,size=14x14", "s3://gld-out/ds") == 1
    err = capsys.readouterr().err
    assert err.startswith("prepare_data: error: s3://gld-out/ds/gld_meta.json: S3 endpoint ")
    _one_line_naming(err, dead_endpoint, "no usable credentials")


def test_s3_dead_endpoint(dead_endpoint, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "gldtest")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-printed")
    assert prepare_data("synthetic", "scenes=1,frames=2,size=14x14", "s3://gld-out/ds") == 1
    err = capsys.readouterr().err
    _one_line_naming(err, dead_endpoint, "cannot connect")
    assert "never-printed" not in err
    # An s3:// input the same way, from the environment or from data.s3_endpoint.
    for source in ("wds", "mds"):
        with pytest.raises(s3.S3AccessError) as e:
            build_loader(DataConfig(source=source, paths=["s3://gld-in/ds"], num_workers=0))
        _one_line_naming(str(e.value), dead_endpoint, "cannot connect")
    monkeypatch.delenv("S3_ENDPOINT_URL")
    with pytest.raises(s3.S3AccessError, match=f"S3 endpoint {dead_endpoint}: cannot connect"):
        build_loader(DataConfig(source="wds", paths=["s3://gld-in/ds"], s3_endpoint=dead_endpoint))
