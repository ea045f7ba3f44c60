"""The novel-view pipeline end to end on the synthetic world with tiny random models, our model
folder (round trip, checksums), the release's files through `from_release`, and
launch/sample.py with each bad-input error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gld.checkpoints.loading import CheckpointError
from gld.checkpoints.model_folder import read_model_folder, write_model_folder
from gld.config import load_config
from gld.diffusion import SamplerConfig
from gld.eval.ply import read_ply
from gld.latents import build_latent_space
from gld.latents.stats import LatentStats
from gld.models import DiTDH, RGBDecoder
from gld.pipeline import NVSPipeline
from tests.data_fixtures import world_sequences, write_npz_folder

ROOT = Path(__file__).resolve().parents[1]
SIZE = (42, 56)           # (H, W): a 3 x 4 patch grid


def tiny_config(**latent):
    over = ["--model.dit.preset=tiny", "--model.decoder.preset=tiny",
            "--diffusion.sampler.steps=3", "--diffusion.time_shift=2.0"]
    over += [f"--latent.{k}={v}" for k, v in latent.items()]
    return load_config(ROOT / "configs" / "tiny.yaml", over)


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    torch.manual_seed(0)
    space = build_latent_space(cfg.latent)
    dit = DiTDH(cfg.model.dit_config(cfg.level_channels))
    dec = RGBDecoder(cfg.model.decoder_config(cfg.level_channels))
    for p in dit.parameters():       # adaLN-Zero starts at a zero velocity: make it non-trivial
        torch.nn.init.normal_(p, std=0.02)
    return cfg, space, dit, dec


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    seqs = world_sequences(n_scenes=1, n_frames=4, size=SIZE)
    write_npz_folder(seqs, root)
    return root / seqs[0].scene_id


def views(scene_dir, names):
    from gld.data.scene_files import read_scene_views
    v = read_scene_views(scene_dir, names)
    t = lambda a: torch.from_numpy(a).float()[None]  # noqa: E731
    return t(v.images), t(v.K), t(v.c2w)


def make_pipe(parts, steps=3):
    cfg, space, dit, dec = parts
    return NVSPipeline(space, dit, dec, time_shift=2.0, sampler=SamplerConfig(steps=steps))


def test_pipeline_shapes_range_and_timings(parts, scene):
    img, K, c2w = views(scene, ["frame_0", "frame_3", "frame_1", "frame_2"])
    out = make_pipe(parts)(img[:, :2], K[:, :2], c2w[:, :2], K[:, 2:], c2w[:, 2:], seed=0)
    H, W = SIZE
    assert out.images.shape == (1, 2, 3, H, W)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.depth.shape == out.depth_conf.shape == (1, 4, H, W)
    assert out.w2c.shape == (1, 4, 4, 4) and out.K.shape == (1, 4, 3, 3)
    assert out.latents.shape == (1, 4, 12, parts[0].level_channels)
    assert torch.isfinite(out.depth).all() and (out.depth > 0).all()
    assert set(out.timings) == {"encode", "sample", "propagate", "decode", "geometry", "total"}
    # the sources keep their encoded latent
    enc = parts[1].encode(img[:, :2])
    torch.testing.assert_close(out.latents[:, :2], enc.z.float())


def test_pipeline_deterministic_by_seed_and_batched(parts, scene):
    img, K, c2w = views(scene, ["frame_0", "frame_3", "frame_1", "frame_2"])
    pipe = make_pipe(parts)
    a = pipe(img[:, :2], K[:, :2], c2w[:, :2], K[:, 2:], c2w[:, 2:], seed=3)
    b = pipe(img[:, :2], K[:, :2], c2w[:, :2], K[:, 2:], c2w[:, 2:], seed=3)
    c = pipe(img[:, :2], K[:, :2], c2w[:, :2], K[:, 2:], c2w[:, 2:], seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.depth, b.depth)
    assert (a.latents[:, 2:] - c.latents[:, 2:]).abs().max() > 1e-2
    # two scenes in one batch: scene 0 of the batch equals the single run's latents (the noise
    # of row 0 is the same draw) up to batched-matmul rounding
    two = pipe(img[:, :2].repeat(2, 1, 1, 1, 1), K[:, :2].repeat(2, 1, 1, 1),
               c2w[:, :2].repeat(2, 1, 1, 1), K[:, 2:].repeat(2, 1, 1, 1),
               c2w[:, 2:].repeat(2, 1, 1, 1), seed=3)
    assert two.images.shape[0] == 2
    torch.testing.assert_close(two.latents[0], a.latents[0], atol=1e-4, rtol=1e-4)


def test_point_cloud_and_ply(parts, scene, tmp_path):
    from gld.eval.ply import write_ply
    img, K, c2w = views(scene, ["frame_0", "frame_1", "frame_2"])
    out = make_pipe(parts)(img[:, :2], K[:, :2], c2w[:, :2], K[:, 2:], c2w[:, 2:], seed=0)
    pts, cols = out.point_cloud(0)
    assert pts.shape == (3 * SIZE[0] * SIZE[1], 3) and cols.shape == pts.shape
    assert cols.dtype == np.uint8 and np.isfinite(pts).all()
    write_ply(tmp_path / "p.ply", pts, cols)
    p2, c2 = read_ply(tmp_path / "p.ply")
    np.testing.assert_array_equal(p2, pts.astype(np.float32))
    np.testing.assert_array_equal(c2, cols)
    # view 0's points lie at its DA3 depth along its predicted camera's optical axis (random
    # weights predict focal lengths ~1e7 px, so a reprojection in pixels would only measure
    # float32 rounding; gld/eval/ply.py's tests check the pixel geometry)
    w2c = out.w2c[0, 0].double()
    P = torch.from_numpy(pts[: SIZE[0] * SIZE[1]]).double()
    z = (P @ w2c[:3, :3].T + w2c[:3, 3])[:, 2]
    torch.testing.assert_close(z, out.depth[0, 0].double().flatten(), atol=1e-5, rtol=1e-5)


def test_pipeline_input_errors(parts, scene):
    img, K, c2w = views(scene, ["frame_0", "frame_1"])
    pipe = make_pipe(parts)
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        pipe(img[:, :1, :, :40], K[:, :1], c2w[:, :1], K[:, 1:], c2w[:, 1:])
    bad = c2w.clone()
    bad[0, 1, 0, 0] = 2.0                                    # not a rotation
    with pytest.raises(ValueError, match=r"target camera\[0\]"):
        pipe(img[:, :1], K[:, :1], c2w[:, :1], K[:, 1:], bad[:, 1:])
    with pytest.raises(ValueError, match="target K: expected"):
        pipe(img[:, :1], K[:, :1], c2w[:, :1], K[:, :0], c2w[:, 1:])


def save_tiny_folder(parts, folder, with_stats=True):
    cfg, space, dit, dec = parts
    stats = None
    if with_stats:
        C = cfg.level_channels
        stats = LatentStats([1], torch.randn(1, C, dtype=torch.float64) * 0.1,
                            torch.rand(1, C, dtype=torch.float64) + 0.5, [10], "da3-small")
    return write_model_folder(folder, cfg, dit_state=dit.state_dict(), dit_config=dit.cfg,
                              decoder_state=dec.state_dict(), decoder_config=dec.cfg,
                              stats=stats, time_shift=2.0, step=7)


def test_model_folder_round_trip(parts, scene, tmp_path):
    folder = save_tiny_folder(parts, tmp_path / "model")
    mf = read_model_folder(folder)
    assert mf.time_shift == 2.0 and mf.convention == "release" and mf.meta["step"] == 7
    assert mf.dit_config == parts[2].cfg and mf.decoder_config == parts[3].cfg
    for k, v in parts[2].state_dict().items():
        assert torch.equal(mf.dit_state[k], v), k
    pipe = NVSPipeline.from_folder(folder)
    assert pipe.space.stats is not None and pipe.time_shift == 2.0
    ref = NVSPipeline(pipe.space, parts[2], parts[3], time_shift=2.0, sampler=pipe.sampler)
    img, K, c2w = views(scene, ["frame_0", "frame_1", "frame_2"])
    a = pipe(img[:, :1], K[:, :1], c2w[:, :1], K[:, 1:], c2w[:, 1:], seed=1)
    b = ref(img[:, :1], K[:, :1], c2w[:, :1], K[:, 1:], c2w[:, 1:], seed=1)
    assert torch.equal(a.images, b.images)
    # rewriting replaces the folder as a whole
    save_tiny_folder(parts, folder, with_stats=False)
    assert read_model_folder(folder).stats_path is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_model_folder_errors(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.json"):
        read_model_folder(tmp_path)
    folder = save_tiny_folder(parts, tmp_path / "model")
    data = bytearray((folder / "dit.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "dit.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"dit.safetensors.*checksum"):
        read_model_folder(folder)
    (folder / "dit.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"dit.safetensors.*missing"):
        read_model_folder(folder)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        read_model_folder(folder)


def test_from_release_files(parts, scene, tmp_path):
    """The release's file layout (trainer dict with 'ema', the stage_2 YAML, the decoder's
    config.json, a DA3 safetensors, the stats .pt) loads into the same networks."""
    from safetensors.torch import save_file

    from gld.checkpoints.da3 import ours_to_official
    from dataclasses import replace
    cfg, space, dit, dec = parts
    # the release's decoder table is for 504 x 504 (a 36 x 36 grid)
    dec = RGBDecoder(replace(dec.cfg, base_grid=(36, 36)))
    torch.save({"ema": dit.state_dict(), "model": {}}, tmp_path / "level1.pt")
    (w0, w1), (d0, d1), (h0, h1) = dit.cfg.widths, dit.cfg.depths, dit.cfg.heads
    params = dict(patch_size=1, in_channels=dit.cfg.latent_channels, hidden_size=[w0, w1],
                  depth=[d0, d1], num_heads=[h0, h1], mlp_ratio=dit.cfg.mlp_ratio,
                  use_qknorm=False,
                  use_swiglu=True, use_rope=False, use_rmsnorm=True, wo_shift=False,
                  use_pos_embed=False, use_prope=True, architecture_mode="new",
                  cfg_mode="new", cam_patch_size=14, level=1, is_concat_mode=True)
    (tmp_path / "level1.yaml").write_text(yaml.safe_dump(
        {"stage_2": {"target": "stage2.models.DDT.DiTwDDTHead", "params": params}}))
    torch.save({"ema": {f"decoder.{k}": v for k, v in dec.state_dict().items()}},
               tmp_path / "mae_decoder.pt")
    (tmp_path / "config.json").write_text(json.dumps(dict(
        decoder_hidden_size=dec.cfg.width, decoder_num_hidden_layers=dec.cfg.depth,
        decoder_num_attention_heads=dec.cfg.heads, decoder_intermediate_size=dec.cfg.mlp_dim,
        layer_norm_eps=1e-12, hidden_act="gelu")))
    save_file({k: v.clone() for k, v in ours_to_official(space.encoder.state_dict()).items()},
              tmp_path / "model.safetensors")
    C = cfg.level_channels
    torch.save({"mean": torch.zeros(1, C, 1, 1), "var": torch.ones(1, C, 1, 1)},
               tmp_path / "normalization_stats_level1.pt")
    pipe = NVSPipeline.from_release(tmp_path / "level1.pt", tmp_path / "level1.yaml",
                                    tmp_path / "mae_decoder.pt", tmp_path / "config.json",
                                    da3_weights=tmp_path / "model.safetensors",
                                    stats=tmp_path / "normalization_stats_level1.pt",
                                    encoder="da3-small", sampler=SamplerConfig(steps=3))
    assert pipe.time_shift == pytest.approx(31.18, abs=0.01)
    pipe.time_shift = 2.0
    img, K, c2w = views(scene, ["frame_0", "frame_1", "frame_2"])
    a = pipe(img[:, :1], K[:, :1], c2w[:, :1], K[:, 1:], c2w[:, 1:], seed=1)
    b = make_pipe((cfg, space, dit, dec))(img[:, :1], K[:, :1], c2w[:, :1], K[:, 1:],
                                          c2w[:, 1:], seed=1)
    # the same networks and inputs; only the stats differ: the release's (0, 1) vs none, and
    # (z - 0) / sqrt(1 + 1e-5) rescales the latent by 5e-6 relative
    torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=0)


# -- launch/sample.py ------------------------------------------------------------------------

def sample_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def model_folder(parts, tmp_path_factory):
    return save_tiny_folder(parts, tmp_path_factory.mktemp("m") / "model")


def test_sample_py_writes_outputs(model_folder, scene, tmp_path):
    r = sample_py("--model", model_folder, "--scene", scene, "--sources", "frame_0,frame_3",
                  "--targets", "frame_1,frame_2", "--out", tmp_path / "out", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    for name in ("generated/frame_1.png", "generated/frame_2.png", "depth/frame_0.png",
                 "depth/frame_2.npy", "grid.png", "points.ply", "cameras.json"):
        assert (out / name).is_file(), name
    from PIL import Image
    assert Image.open(out / "generated/frame_1.png").size == (SIZE[1], SIZE[0])
    assert np.load(out / "depth/frame_2.npy").shape == SIZE
    pts, cols = read_ply(out / "points.ply")
    assert pts.shape == (4 * SIZE[0] * SIZE[1], 3)
    cams = json.loads((out / "cameras.json").read_text())
    assert cams["views"] == ["frame_0", "frame_3", "frame_1", "frame_2"]
    # a camera file gives the same images as the same frames named as targets (same seed)
    np.savez(tmp_path / "cams.npz", intrinsic=np.stack([np.load(scene / f"frame_{i}.npz")
                                                        ["intrinsic"] for i in (1, 2)]),
             pose=np.stack([np.load(scene / f"frame_{i}.npz")["pose"] for i in (1, 2)]),
             names=np.array(["a", "b"]))
    r = sample_py("--model", model_folder, "--scene", scene, "--sources", "frame_0,frame_3",
                  "--target-cameras", tmp_path / "cams.npz", "--out", tmp_path / "o2",
                  "--no-progress")
    assert r.returncode == 0, r.stderr
    a = np.asarray(Image.open(out / "generated/frame_1.png"))
    b = np.asarray(Image.open(tmp_path / "o2" / "generated" / "a.png"))
    np.testing.assert_array_equal(a, b)


def test_sample_py_bad_inputs(model_folder, scene, tmp_path):
    base = ["--model", model_folder, "--out", tmp_path / "o", "--no-progress"]
    r = sample_py(*base, "--scene", scene, "--sources", "frame_0", "--targets", "frame_9")
    assert r.returncode == 2 and "no frame 'frame_9'" in r.stderr and str(scene) in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in scene.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    z = dict(np.load(bad / "frame_1.npz"))
    z["pose"] = z["pose"] * np.array([[2.0], [1], [1], [1]])       # a scaled rotation
    np.savez(bad / "frame_1.npz", **z)
    r = sample_py(*base, "--scene", bad, "--sources", "frame_0", "--targets", "frame_1")
    assert r.returncode == 2 and "frame_1.npz" in r.stderr and "not rigid" in r.stderr, r.stderr
    odd = tmp_path / "odd"
    write_npz_folder(world_sequences(n_scenes=1, n_frames=2, size=(48, 64)), odd)
    scene_odd = next(odd.iterdir())
    r = sample_py(*base, "--scene", scene_odd, "--sources", "frame_0", "--targets", "frame_1")
    assert r.returncode == 2 and "frame_0.png" in r.stderr and "multiples of 14" in r.stderr
    (tmp_path / "c.json").write_text(json.dumps({"cameras": [{"intrinsic": [[1]]}]}))
    r = sample_py(*base, "--scene", scene, "--sources", "frame_0", "--target-cameras",
                  tmp_path / "c.json")
    assert r.returncode == 2 and "c.json" in r.stderr
    r = sample_py("--model", tmp_path, "--scene", scene, "--sources", "frame_0", "--targets",
                  "frame_1", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no model.json" in r.stderr
