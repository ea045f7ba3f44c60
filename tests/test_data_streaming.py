"""Streaming from local shards and the synthetic world: 2 ranks x 2 workers see every record
exactly once per epoch, ranks agree on each batch's resolution, a resume after k steps
continues exactly, batches have the documented shapes."""
import pytest
import torch

from gld.data.config import DataConfig, EvalDataConfig
from gld.data.schema import DatasetMeta
from gld.data.streaming import build_loader
from gld.data.views import resize_crop_size
from gld.data.writers import write_dataset
from tests.data_helpers import (NUM_RECORDS, cfg_dict, check_exactly_once, check_resume,
                                in_process_rank, run_ranks, tiny_sequences)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    seqs = list(tiny_sequences())
    out = {}
    for writer in ("mds", "wds"):
        out[writer] = str(root / writer)
        write_dataset(seqs, out[writer], writer, DatasetMeta(source="synthetic"),
                      shard_records=2)
    return out


def test_batch_shapes_and_keys(local_shards):
    cfg = DataConfig(**cfg_dict("wds", [local_shards["wds"]], load_depth=True, num_workers=0))
    batch = next(iter(build_loader(cfg)))
    B, V = 2, 3
    H, W = batch["images"].shape[-2:]
    assert (H, W) in [(14, 14), (14, 28)]
    assert batch["images"].shape == (B, V, 3, H, W) and batch["images"].dtype == torch.uint8
    assert batch["K"].shape == (B, V, 3, 3) and batch["K"].dtype == torch.float32
    assert batch["c2w"].shape == (B, V, 4, 4) and batch["c2w"].dtype == torch.float32
    assert batch["depth"].shape == (B, V, H, W)
    assert batch["source_mask"].shape == (B, V) and batch["source_mask"].dtype == torch.bool
    assert (batch["source_mask"].sum(1) >= 1).all() and (batch["source_mask"].sum(1) <= 2).all()
    assert batch["frame_indices"].shape == (B, V) and batch["sample_id"].shape == (B,)
    assert len(batch["scene_id"]) == B and batch["has_depth"].all()
    assert (batch["step"], batch["epoch"], batch["num_skipped"]) == (0, 0, 0)
    # The principal point (15, 10) of the stored 20x30 images follows the resize and crop.
    (nh, nw), top, left = resize_crop_size((20, 30), (H, W))
    assert torch.allclose(batch["K"][..., 0, 2], torch.full((B, V), 15 * nw / 30 - left))
    assert torch.allclose(batch["K"][..., 1, 2], torch.full((B, V), 10 * nh / 20 - top))


def test_pin_memory_follows_cuda_unless_set(local_shards):
    cfg = DataConfig(**cfg_dict("wds", [local_shards["wds"]], num_workers=0))
    assert cfg.pin_memory is None
    assert build_loader(cfg).pin_memory is torch.cuda.is_available()
    for v in (True, False):
        cfg.pin_memory = v
        assert build_loader(cfg).pin_memory is v


@pytest.mark.parametrize("source", ["synthetic", "wds"])
def test_two_ranks_two_workers_exactly_once_and_resume(local_shards, source):
    cfg = cfg_dict(source, [local_shards["wds"]] if source == "wds" else [])
    results = [in_process_rank(cfg, r, 2, resume_after=3, epochs=2) for r in range(2)]
    check_exactly_once(results, NUM_RECORDS, epochs=2)
    for res in results:
        check_resume(res, 3)


@pytest.mark.slow  # 2 processes x 2 workers, each importing mosaicml-streaming: ~12 s
def test_mds_two_ranks_two_workers_exactly_once_and_resume(local_shards):
    cfg = cfg_dict("mds", [local_shards["mds"]])
    results = run_ranks(cfg, 2, resume_after=3)
    check_exactly_once(results, NUM_RECORDS)
    for res in results:
        check_resume(res, 3)


def test_break_and_continue_and_eval_split(local_shards):
    cfg = DataConfig(**cfg_dict("wds", [local_shards["wds"]], num_workers=1))
    loader = build_loader(cfg)
    full = [b["sample_id"].tolist() for b in build_loader(cfg)]
    got = []
    for b in loader:
        got.append(b["sample_id"].tolist())
        if len(got) == 2:
            break
    got += [b["sample_id"].tolist() for b in loader]  # continues, does not restart
    assert got == full and loader.state_dict()["epoch"] == 1
    cfg.eval = EvalDataConfig(num_views=3, num_sources=1, resolution=(14, 28))
    ev = build_loader(cfg, split="eval")
    a = [b["sample_id"].tolist() for b in ev]
    assert sorted(sum(a, [])) == list(range(NUM_RECORDS)) and a[0] == [0, 1]  # no shuffle
    b = next(iter(build_loader(cfg, split="eval")))
    assert b["images"].shape[-2:] == (14, 28) and b["source_mask"][:, 0].all()


def test_eval_scene_mean_is_the_mean_of_all_frames(local_shards):
    from gld.data.views import _fit
    from tests.data_helpers import tiny_sequences
    from PIL import Image
    import io
    import numpy as np

    cfg = DataConfig(**cfg_dict("wds", [local_shards["wds"]], num_workers=0))
    cfg.eval = EvalDataConfig(num_views=3, num_sources=1, resolution=(14, 28), scene_mean=True)
    b = next(iter(build_loader(cfg, split="eval")))
    assert "scene_mean" not in next(iter(build_loader(cfg)))          # eval split only
    assert b["scene_mean"].shape == (2, 3, 14, 28) and b["scene_mean"].dtype == torch.float32
    seqs = {s.scene_id: s for s in tiny_sequences()}
    for i, sid in enumerate(b["scene_id"]):
        frames = [np.array(_fit(Image.open(io.BytesIO(f.image)).convert("RGB"), (14, 28))[0])
                  for f in seqs[sid].frames]
        assert len(frames) == 8                                        # every frame, not the 3
        want = torch.from_numpy(np.mean(frames, 0) / 255.0).permute(2, 0, 1).float()
        torch.testing.assert_close(b["scene_mean"][i], want, atol=1e-6, rtol=0)


def test_resume_refuses_a_different_setup(local_shards):
    cfg = DataConfig(**cfg_dict("wds", [local_shards["wds"]], num_workers=0))
    state = build_loader(cfg).state_dict()
    cfg.batch_size = 4
    with pytest.raises(ValueError, match="batch_size=2 in the checkpoint, 4 now"):
        build_loader(cfg).load_state_dict(state)


def test_data_config_validation():
    from gld.config import ConfigError, load_config

    with pytest.raises(ConfigError,
                       match="data.weights: mixing proportions need data.source='mds'"):
        load_config(None, ["--data.source=wds", "--data.paths=[a, b]", "--data.weights=[1, 2]"])
    with pytest.raises(ConfigError, match=r"data.paths\[0\]: S3 bucket names need at least 3"):
        load_config(None, ["--data.source=mds", "--data.paths=['s3://ab/x']"])
    cfg = load_config(None, ["--data.load_depth=true", "--data.cache_dir=/tmp/c"])
    assert cfg.data.load_depth and cfg.data.cache_dir == "/tmp/c" and cfg.data.eval.paths == []


def test_mds_mixture_by_weights(local_shards, tmp_path):
    """Two MDS datasets mixed 3:1 through mosaicml-streaming's stream proportions."""
    other = str(tmp_path / "other")
    from gld.data.synthetic import synthetic_sequences

    write_dataset(synthetic_sequences(4, seed=9, num_frames=8, size=(20, 30)), other, "mds",
                  shard_records=2)
    cfg = DataConfig(**cfg_dict("mds", [local_shards["mds"], other], weights=[3.0, 1.0],
                                num_workers=0))
    loader = build_loader(cfg)
    scenes = [s for b in loader for s in b["scene_id"]]
    from_other = sum(s.startswith("synthetic-9-") for s in scenes)
    assert len(scenes) == 20 and from_other == 5  # 20 per epoch, a quarter from `other`
