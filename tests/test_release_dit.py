"""The release-compatibility API: `load_release_dit` against the GLD release's own DiT-DH.

tests/fixtures/release_dit_tiny/ was written by the release's code (tests/fixtures/
make_release_dit.py, which says how to regenerate it): its `DiTwDDTHead` at a tiny size of the
level-1 architecture with every parameter random, saved in its trainer's checkpoint format with
its YAML, and its velocities for inputs built as its trainer builds them (sources first, its
Plücker map and PRoPE cameras), with cameras and with its camera-dropped CFG branch. These tests
need none of the release's code.

Tolerance, fp32 against fp32: the two implementations do the same operations but not in the same
order (camera maps and matrices by other formulas, convolutions as matmuls, other SDPA calls),
so each output carries the rounding of the sums behind it. The longest fp32 sums have
K = 7 * 14 * 14 = 1372 terms (the camera patch embedding; the others are <= 512); with unit
roundoff u = 2^-24 a sum's typical relative error is sqrt(K) u = 2.2e-6, and the difference of
two independent roundings of the network's chain of normalised blocks stays within a few of
those: |ours - release| <= 1e-5 max|release|. That bound is checked to sit above our own
fp32-vs-fp64 difference on the same inputs, and far below what a wrong convention or the wrong
weights give.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gld.checkpoints.gld_release import (RELEASE_DIT_REQUIRED, ReleaseDiT, load_release_dit,
                                         release_dit_config)
from gld.checkpoints.loading import CheckpointError
from gld.diffusion import RELEASE_EVAL_SHIFT, RELEASE_TRAIN_SHIFT
from gld.models import DiTDH

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "release_dit_tiny"
CKPT, YAML = FIXTURE / "checkpoint.pt", FIXTURE / "release.yaml"
TOL = 1e-5          # relative to max |release output|; see the module docstring


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURE / "io.safetensors"))


@pytest.fixture(scope="module")
def dit():
    return load_release_dit(CKPT, YAML)


def run(model, io, drop=None, dtype=torch.float32):
    H, W = io["image_size"].tolist()
    with torch.no_grad():
        return model(io["x_t"].to(dtype), io["t"].to(dtype), source=io["source"].to(dtype),
                     is_src=io["is_src"], c2w=io["c2w"], K=io["K"], image_size=(H, W),
                     drop_camera=drop)


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.abs().max()).item()


def test_fixture_is_small_and_complete(io):
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 1 << 20
    B, V, N, C = io["x_t"].shape
    assert io["v_cond"].shape == io["v_drop"].shape == (B, V, N, C)
    # sources are a prefix (as the release requires) and zero where not a source
    assert io["is_src"][:, :2].all() and not io["is_src"][:, 2:].any()
    assert (io["source"][~io["is_src"]] == 0).all()


def test_loaded_model(dit):
    assert isinstance(dit, DiTDH) and not dit.training
    assert dit.cfg.convention == "release"
    assert (dit.cfg.widths, dit.cfg.depths, dit.cfg.heads) == ((32, 64), (2, 1), (2, 2))
    assert dit.cfg.latent_channels == 8 and dit.patch_size == 14
    info = dit.release
    assert isinstance(info, ReleaseDiT)
    assert info.weights == "ema" and info.level == 1
    assert info.checkpoint == str(CKPT) and info.yaml == str(YAML)
    assert info.time_shift == RELEASE_EVAL_SHIFT == pytest.approx(31.18, abs=5e-3)
    assert info.train_time_shift == RELEASE_TRAIN_SHIFT == pytest.approx(19.60, abs=5e-3)
    s = info.sampler
    assert (s.method, s.steps, s.t_min, s.cfg_scale, s.cfg_interval) == (
        "euler", 50, 0.001, 1.5, (0.0, 1.0))


def test_parity_with_release_conditional(dit, io):
    assert rel_err(run(dit, io), io["v_cond"]) <= TOL


def test_parity_with_release_camera_dropped(dit, io):
    drop = torch.ones(io["x_t"].shape[0], dtype=torch.bool)
    assert rel_err(run(dit, io, drop), io["v_drop"]) <= TOL


def test_parity_drop_per_sample(dit, io):
    """drop_camera is per sample: a mixed batch is the conditional and dropped rows."""
    out = run(dit, io, torch.tensor([False, True]))
    assert rel_err(out[0], io["v_cond"][0]) <= TOL
    assert rel_err(out[1], io["v_drop"][1]) <= TOL


def test_tolerance_is_above_fp32_rounding_and_below_real_differences(dit, io):
    ours64 = run(copy.deepcopy(dit).double(), io, dtype=torch.float64)
    assert rel_err(run(dit, io), ours64) <= TOL
    # the textbook camera convention, or the trainer's raw weights ("model"), are far outside
    textbook = copy.deepcopy(dit)
    textbook.cfg = replace(dit.cfg, convention="textbook")
    assert rel_err(run(textbook, io), io["v_cond"]) > 100 * TOL
    raw = DiTDH(dit.cfg, patch_size=dit.patch_size).eval()
    raw.load_state_dict(torch.load(CKPT, weights_only=True)["model"])
    assert rel_err(run(raw, io), io["v_cond"]) > 100 * TOL


# -- checkpoint entries and keys ------------------------------------------------------------------

def tiny_states():
    """Two different state dicts of the fixture's architecture."""
    cfg, patch, _ = release_dit_config(YAML)
    a = torch.load(CKPT, weights_only=True)["ema"]
    b = {k: v + 1 for k, v in a.items()}
    return cfg, patch, a, b


def assert_loaded(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("layout, expect", [
    ({"model": "a", "ema": "b", "train_steps": 3}, ("b", "ema")),
    ({"model": "a", "opt": {}, "epoch": 1}, ("a", "model")),
    ("a", ("a", "state dict")),
])
def test_weights_entry_ema_then_model_then_bare(tmp_path, layout, expect):
    _, _, a, b = tiny_states()
    pick = {"a": a, "b": b}
    obj = pick[layout] if isinstance(layout, str) else {
        k: pick.get(v, v) if isinstance(v, str) else v for k, v in layout.items()}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    model = load_release_dit(path, YAML)
    assert_loaded(model, pick[expect[0]])
    assert model.release.weights == expect[1]


def test_module_prefix_stripped(tmp_path):
    _, _, a, _ = tiny_states()
    path = tmp_path / "ddp.pt"
    torch.save({"ema": {"module." + k: v for k, v in a.items()}}, path)
    assert_loaded(load_release_dit(path, YAML), a)


def test_missing_and_unexpected_keys_named(tmp_path):
    _, _, a, _ = tiny_states()
    state = dict(a)
    del state["blocks.1.mlp.w3.bias"], state["t_embedder.W"]
    state["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save({"ema": state}, path)
    with pytest.raises(CheckpointError) as e:
        load_release_dit(path, YAML)
    msg = str(e.value)
    assert msg.startswith(str(path))
    assert "2 missing key(s): " in msg and "blocks.1.mlp.w3.bias" in msg and "t_embedder.W" in msg
    assert "1 unexpected key(s): blocks.7.attn.qkv.weight" in msg
    assert str(YAML) in msg and "'ema'" in msg


def test_shape_mismatch_named(tmp_path):
    """A YAML that does not describe the checkpoint: the key, both shapes and the YAML."""
    data = yaml.safe_load(YAML.read_text())
    data["stage_2"]["params"]["in_channels"] = 16
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError) as e:
        load_release_dit(CKPT, other)
    msg = str(e.value)
    assert msg.startswith(str(CKPT)) and str(other) in msg
    assert "final_layer.linear.weight: expected (16, 64), found (8, 64)" in msg


def test_not_a_release_checkpoint(tmp_path):
    path = tmp_path / "opt_only.pt"
    torch.save({"ema": {"step": 3}, "x": 1}, path)
    with pytest.raises(CheckpointError, match="entry 'ema' is not a state dict"):
        load_release_dit(path, YAML)
    with pytest.raises(FileNotFoundError):
        load_release_dit(tmp_path / "absent.pt", YAML)


# -- the YAML ------------------------------------------------------------------------------------

def write_yaml(tmp_path, params=None, drop=(), **top):
    data = yaml.safe_load(YAML.read_text())
    data["stage_2"]["params"].update(params or {})
    for k in drop:
        del data["stage_2"]["params"][k]
    data.update(top)
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def yaml_error(path):
    with pytest.raises(CheckpointError) as e:
        release_dit_config(path)
    assert str(e.value).startswith(str(path))
    return str(e.value)


@pytest.mark.parametrize("key, value", [
    ("architecture_mode", "old"), ("use_rope", True), ("use_pos_embed", True),
    ("use_prope", False), ("use_qknorm", True), ("use_swiglu", False), ("use_rmsnorm", False),
    ("wo_shift", True), ("predict_cls", True), ("num_special_tokens", 5),
    ("is_concat_mode", False), ("source_condition_mode", "l1_as_cond"), ("cfg_mode", "old"),
    ("cam_in_channels", 4), ("patch_size", 2),
])
def test_unsupported_setting_named(tmp_path, key, value):
    assert key in RELEASE_DIT_REQUIRED
    msg = yaml_error(write_yaml(tmp_path, {key: value}))
    assert f"stage_2.params.{key}: {value!r}" in msg and "not supported" in msg


@pytest.mark.parametrize("key", ["use_rope", "use_pos_embed", "use_prope", "is_concat_mode"])
def test_absent_setting_takes_release_default(tmp_path, key):
    """The release's constructor defaults (RoPE and position tables on, PRoPE off, no concat)."""
    msg = yaml_error(write_yaml(tmp_path, drop=[key]))
    assert f"stage_2.params.{key}:" in msg and "the release's default when absent" in msg


def test_architecture_mode_must_be_written(tmp_path):
    msg = yaml_error(write_yaml(tmp_path, drop=["architecture_mode"]))
    assert "stage_2.params.architecture_mode: missing" in msg and "'old'" in msg


def test_other_yaml_errors(tmp_path):
    assert "stage_2.params: unknown key(s) ['use_flash']" in yaml_error(
        write_yaml(tmp_path, {"use_flash": True}))
    assert "stage_2.params.hidden_size: equal widths" in yaml_error(
        write_yaml(tmp_path, {"hidden_size": [64, 64]}))
    assert "stage_2.params.depth: expected two positive integers" in yaml_error(
        write_yaml(tmp_path, {"depth": [2]}))
    assert "stage_2.params.heads[0]" in yaml_error(write_yaml(tmp_path, {"num_heads": [3, 2]}))
    assert "dataset.camera_mode: 'camray'" in yaml_error(
        write_yaml(tmp_path, dataset={"camera_mode": "camray"}))
    assert "stage_2.target: 'stage2.models.DDT_old.DiTwDDTHead'" in yaml_error(
        write_yaml(tmp_path, stage_2={"target": "stage2.models.DDT_old.DiTwDDTHead"}))
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"params": {"in_channels": 8}}))
    assert "'stage_2' section" in yaml_error(bare)


def test_sizes_from_yaml_match_the_release(tmp_path):
    """A second config through our YAML mapping gives the release's own state-dict layout
    (shapes.json: one int for num_heads, mlp_ratio 3.5, whose SwiGLU size depends on the
    rounding order)."""
    ref = json.loads((FIXTURE / "shapes.json").read_text())
    path = tmp_path / "shapes.yaml"
    path.write_text(yaml.safe_dump({"stage_2": {"target": "stage2.models.DDT.DiTwDDTHead",
                                                "params": ref["params"]}}))
    cfg, patch, _ = release_dit_config(path)
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in DiTDH(cfg, patch_size=patch).state_dict().items()}
    assert ours == ref["shapes"]
    assert ref["shapes"]["blocks.0.mlp.w3.weight"] == [48, 112]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_parity_on_gpu_fp32(io, backend):
    """On CUDA, "auto" runs the fused PRoPE kernels (fp32: IEEE dots, kernels/prope/core.py);
    cuDNN's TF32 convolutions are switched off for the call (the camera patch embedding)."""
    dit = load_release_dit(CKPT, YAML).cuda()
    dit.set_attention_backend(backend)
    cuda_io = {k: v.cuda() for k, v in io.items()}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cond = run(dit, cuda_io)
        drop = run(dit, cuda_io, torch.ones(2, dtype=torch.bool, device="cuda"))
    assert rel_err(cond.cpu(), io["v_cond"]) <= TOL
    assert rel_err(drop.cpu(), io["v_drop"]) <= TOL
