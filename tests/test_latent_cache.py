"""Latents cached offline (gld/train/latent_cache.py, launch/cache_latents.py): the cache holds
what the diffusion stage encodes on the fly, training from it gives the same losses, its loader
resumes exactly, and caches that are incomplete or made for another config are refused.

Tolerance: x and source are stored as float16, round to nearest, so each value is within half
an ulp of the float32 one: |cached - exact| <= 2**-11 |exact| for normal values (unit roundoff
of a 10-bit mantissa), <= 2**-25 below 2**-14 (float16's subnormal spacing 2**-24, halved).
Everything else (is_src, c2w, K, image size, frame indices) is stored exactly. A loss of the
same weights and seeds takes that rounding through one squared error (relative error doubled)
and the model: compared with rtol 4 * 2**-11 (about 2e-3). Training steps are compared on a
float32 cache, where they must agree exactly: after float16 inputs, Adam's first updates
(about lr * sign(gradient) per weight) flip where a gradient element is near zero, so the
weights, and the losses of later steps, drift apart by more than the storage rounding.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from gld.config import ConfigError
from gld.data.streaming import build_loader
from gld.train.latent_cache import (META_FILE, LatentCacheError, build_cache_loader,
                                    write_latent_cache)
from gld.train.stages import DiffusionStage

from tests.s3_server import s3_server  # noqa: F401  (the fixture)
from tests.test_train_stages import tiny

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 2.0 ** -11, 2.0 ** -25      # float16 rounding (module doc)
LOSS_RTOL = 4 * 2.0 ** -11
EPOCHS = 2                               # 4 scenes, batch 2: 2 batches an epoch


def cache_main(argv):
    spec = importlib.util.spec_from_file_location("cache_latents", ROOT / "launch" /
                                                  "cache_latents.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A float16 cache of 2 epochs written by launch/cache_latents.py, its config, and the
    on-the-fly inputs of the same batches (a separately built stage: same random encoder)."""
    out = tmp_path_factory.mktemp("lc") / "cache"
    meta = cache_main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out),
                       "--epochs", str(EPOCHS), "--no-progress", "--data.synthetic_scenes=4",
                       "--data.batch_size=2"])
    cfg = tiny()
    stage = DiffusionStage(cfg)
    loader = build_loader(cfg.data, "train", rank=0, world_size=1)
    fly = [(batch, stage.inputs(batch)) for _ in range(EPOCHS) for batch in loader]
    return cfg, out, meta, stage, fly


def test_cached_latents_equal_on_the_fly(cache):
    cfg, out, meta, stage, fly = cache
    saved = json.loads((out / META_FILE).read_text())
    assert saved == meta and meta["dtype"] == "float16" and meta["records"] == 8
    assert meta["epoch_records"] == [4, 4] and meta["boundary_level"] == 1
    loader = build_cache_loader(cfg, str(out), rank=0, world_size=1)
    cached = [b for _ in range(EPOCHS) for b in loader]
    assert len(cached) == len(fly) == 4
    for c, (batch, want) in zip(cached, fly):
        assert "images" not in c and c["x"].dtype == torch.float16
        got = stage.inputs(c)
        assert got["encode_ms"] == 0.0 and got["x"].dtype == torch.float32
        for k in ("x", "source"):
            torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL)
            assert (got[k] != want[k]).any()         # really rounded: the bound is not vacuous
        for k in ("is_src", "c2w", "K"):
            assert torch.equal(got[k], want[k]), k
        assert got["image_size"] == want["image_size"]
        assert c["scene_id"] == batch["scene_id"]
        assert torch.equal(c["sample_id"], batch["sample_id"])
        assert sorted(c["frame_indices"][0].tolist()) == sorted(batch["frame_indices"][0].tolist())
        for fn in ("samples_in", "tokens_in", "flops_per_sample"):
            assert getattr(stage, fn)(c) == getattr(stage, fn)(batch), fn
        # the loss of the same weights and seed: within the float16 rounding's reach
        losses = []
        for inputs in (want, c):
            torch.manual_seed(3)
            losses.append(stage.loss(stage.model, inputs, 1)[0].item())
        assert losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_training_from_cache_matches_on_the_fly(cache, tmp_path):
    """launch/train.py's run_stage, 4 steps (2 epochs), on the fly and from a float32 cache of
    the same config: the same losses, bit for bit."""
    from gld.train.job import run_stage

    cfg, _, _, stage, _ = cache
    out = tmp_path / "f32"
    meta = write_latent_cache(cfg, str(out), EPOCHS, dtype="float32", stage=stage)
    assert meta["dtype"] == "float32"
    common = ["--train.stage=diffusion", "--train.steps=4", "--train.log_every=1",
              "--train.resume=none", "--train.save_every=0", "--train.ema_decay=0.0"]
    fly = run_stage(tiny(*common, f"--train.out_dir={tmp_path / 'fly'}"), progress=False)
    cached = run_stage(tiny(*common, f"--train.out_dir={tmp_path / 'cached'}",
                            f"--train.latent_cache={out}"), progress=False)
    a, b = _losses(fly), _losses(cached)
    assert len(a) == len(b) == 4 and b == a
    assert all(json.loads(line)["encode_ms"] == 0.0
               for line in (cached / "metrics.jsonl").read_text().splitlines())


def test_cache_loader_resumes_and_splits_ranks(cache):
    cfg, out, *_ = cache
    one = build_cache_loader(cfg, str(out), rank=0, world_size=1)
    it = iter(one)
    next(it)
    state = one.state_dict()
    rest = [b["sample_id"].tolist() for b in it] + [b["sample_id"].tolist()
                                                    for _ in range(2) for b in one]
    again = build_cache_loader(cfg, str(out), rank=0, world_size=1)
    again.load_state_dict(state)
    assert [b["sample_id"].tolist() for _ in range(3) for b in again] == rest
    assert one.state_dict()["epoch"] == again.state_dict()["epoch"] == 3   # past the cache: repeats
    # two ranks of batch 1: a partition of each epoch, in the written order
    ranks = [build_cache_loader(tiny("--data.batch_size=1"), str(out), rank=r, world_size=2)
             for r in range(2)]
    assert len(ranks[0]) == 2
    ids = [[b["sample_id"].item() for b in ld] for ld in ranks]
    whole = [b["sample_id"].tolist() for b in build_cache_loader(cfg, str(out), 0, 1)]
    assert [ids[0][s] for s in range(2)] == [whole[s][0] for s in range(2)]
    assert [ids[1][s] for s in range(2)] == [whole[s][1] for s in range(2)]


@pytest.mark.parametrize("override, field", [
    ("--latent.boundary_level=2", "boundary_level"),
    ("--data.num_views=3", "num_views"),
    ("--data.resolutions=[[42,42]]", "resolution"),
    ("--latent.weights=other.safetensors", "weights"),
])
def test_mismatching_cache_is_refused(cache, override, field):
    _, out, *_ = cache
    with pytest.raises(LatentCacheError, match=rf"latent cache field '{field}'"):
        build_cache_loader(tiny(override), str(out), rank=0, world_size=1)


def test_edited_meta_names_the_field(cache, tmp_path):
    cfg, out, *_ = cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / META_FILE).read_text())
    (copy / META_FILE).write_text(json.dumps({**meta, "encoder": "da3-base"}))
    with pytest.raises(LatentCacheError, match=r"'encoder' is 'da3-base'.*latent.encoder"):
        build_cache_loader(cfg, str(copy), rank=0, world_size=1)


def test_incomplete_cache_is_refused(cache, tmp_path, monkeypatch):
    cfg, out, meta, stage, _ = cache
    killed = tmp_path / "killed"                   # shards without latent_cache.json
    shutil.copytree(out, killed)
    (killed / META_FILE).unlink()
    with pytest.raises(LatentCacheError, match=r"no latent_cache.json: not a complete"):
        build_cache_loader(cfg, str(killed), rank=0, world_size=1)
    # a writer interrupted mid-way leaves nothing that looks like a cache
    calls = []
    real = stage.inputs

    def dies(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(stage, "inputs", dies)
    target = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        write_latent_cache(cfg, str(target), 1, stage=stage)
    assert not target.exists() and list(tmp_path.iterdir()) == [killed]


def test_cache_on_s3(cache, s3_server, tmp_path):
    """Written to s3:// (latent_cache.json uploaded last), read through a local copy: the same
    batches as the local cache's first epoch."""
    cfg, out, _, stage, _ = cache
    url = s3_server.bucket("latents") + "/run/cache"
    write_latent_cache(cfg, url, 1, stage=stage)
    with pytest.raises(FileExistsError):
        write_latent_cache(cfg, url, 1, stage=stage)
    remote = build_cache_loader(tiny(f"--data.cache_dir={tmp_path}"), url, rank=0, world_size=1)
    local = build_cache_loader(cfg, str(out), rank=0, world_size=1)
    for a, b in zip(remote, local, strict=True):
        for k in ("x", "source", "is_src", "c2w", "K", "sample_id"):
            assert torch.equal(a[k], b[k]), k


def test_latent_cache_needs_the_diffusion_stage():
    with pytest.raises(ConfigError, match=r"train.latent_cache: only the diffusion stage"):
        tiny("--train.stage=decoder", "--train.latent_cache=runs/latents")
    with pytest.raises(ConfigError, match=r"train.latent_cache: must be a cache folder"):
        tiny("--train.latent_cache=")
