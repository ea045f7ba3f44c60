"""The release-compatibility API: `load_release_decoder` against the GLD release's own decoder.

tests/fixtures/release_decoder_tiny/ was written by the release's code (tests/fixtures/
make_release_decoder.py, which says how to regenerate it): its `GeneralDecoder_Variable` at a
tiny size (width 32, 2 layers, 2 heads, MLP 64, 4 levels x 8 channels, a 5 x 5 base position
table) with every parameter random, saved as its loader reads `mae_decoder.pt` ("ema" and
"model" entries, "decoder." prefixes) with its config.json, and its RGB (after the ImageNet
std / mean) for four random levels of 2 x 2 views at 28 x 42. These tests need none of the
release's code.

Tolerance, fp32 against fp32: the same operations in another order (eager softmax(QK^T / sqrt(d))
V against SDPA, other reshapes). The longest fp32 sums have K = 64 terms (the MLP; the input
embedding has 32, attention 7 tokens of head dim 16); with unit roundoff u = 2^-24 a sum's
typical relative error is sqrt(K) u = 4.8e-7, and two independent roundings of a chain of two
normalised layers differ by a few of those: |ours - release| <= 1e-5 max|release|, far below
what the "model" weights instead of "ema" give (checked).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gld.checkpoints.gld_release import (load_release_decoder, release_decoder_config,
                                         release_decoder_state)
from gld.checkpoints.loading import CheckpointError
from gld.models import RGBDecoder, decoder_preset
from gld.models.decoder import sincos_table

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "release_decoder_tiny"
CKPT, CONFIG = FIXTURE / "mae_decoder.pt", FIXTURE / "config.json"
TINY = dict(in_channels=32, base_image_size=(70, 70))
TOL = 1e-5          # relative to max |release output|; see the module docstring


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURE / "io.safetensors"))


def run(model, io):
    H, W = io["image_size"].tolist()
    with torch.no_grad():
        return model([io[f"level{i}"] for i in range(4)], image_size=(H, W))


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.abs().max()).item()


def save_variant(tmp_path, obj, name="variant.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def ckpt():
    return torch.load(CKPT, weights_only=True)


def test_fixture_is_small_and_complete(io):
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 1 << 20
    B, V, N, c = io["level0"].shape
    assert (B, V, N, c) == (2, 2, 6, 8)
    assert io["rgb"].shape == (B, V, 3, 28, 42)


def test_parity_with_release(io):
    dec = load_release_decoder(CKPT, CONFIG, **TINY)
    assert isinstance(dec, RGBDecoder) and not dec.training
    assert dec.release_weights == "ema"
    cfg = dec.cfg
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.patch_size) == (32, 2, 2, 64, 14)
    assert cfg.base_grid == (5, 5) and cfg.layer_norm_eps == 1e-12
    out = run(dec, io)
    assert out.shape == io["rgb"].shape
    assert rel_err(out, io["rgb"]) < TOL


def test_sincos_table_is_the_release_one(io):
    # the release's own table for its 5 x 5 base grid before the fixture randomised it
    assert torch.equal(sincos_table(32, (5, 5))[None], io["init_pos_embed"])


def test_ema_preferred_then_model_then_bare(io, ckpt, tmp_path):
    ema_out = run(load_release_decoder(CKPT, CONFIG, **TINY), io)
    only_model = save_variant(tmp_path, {"model": ckpt["model"], "epoch": 3})
    dec = load_release_decoder(only_model, CONFIG, **TINY)
    assert dec.release_weights == "model"
    assert rel_err(run(dec, io), io["rgb"]) > 100 * TOL      # other weights, other output
    bare = save_variant(tmp_path, dict(ckpt["ema"]), "bare.pt")
    dec = load_release_decoder(bare, CONFIG, **TINY)
    assert dec.release_weights == "state dict"
    assert torch.equal(run(dec, io), ema_out)


def test_decoder_prefix(ckpt, tmp_path):
    state, which, ignored = release_decoder_state(CKPT)
    assert which == "ema" and not ignored
    assert all(not k.startswith("decoder.") for k in state) and "decoder_embed.weight" in state
    # keys of other modules in the same file are skipped, as the release skips them
    other = dict(ckpt["ema"], **{"encoder.proj.weight": torch.zeros(2)})
    _, _, ignored = release_decoder_state(save_variant(tmp_path, {"ema": other}))
    assert ignored == ["encoder.proj.weight"]
    unprefixed = {k[len("decoder."):]: v for k, v in ckpt["ema"].items()}
    with pytest.raises(CheckpointError, match=r"unprefixed.pt: no key .*'decoder\.'"):
        load_release_decoder(save_variant(tmp_path, {"ema": unprefixed}, "unprefixed.pt"),
                             CONFIG, **TINY)


def test_missing_and_unexpected_keys_named(ckpt, tmp_path):
    state = dict(ckpt["ema"])
    del state["decoder.decoder_norm.weight"]
    del state["decoder.decoder_layers.1.attention.attention.key.bias"]
    state["decoder.decoder_layers.2.output.dense.weight"] = torch.zeros(32, 64)
    path = save_variant(tmp_path, {"ema": state}, "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_release_decoder(path, CONFIG, **TINY)
    msg = str(err.value)
    assert msg.startswith(str(path))
    for key in ("decoder_norm.weight", "decoder_layers.1.attention.attention.key.bias",
                "decoder_layers.2.output.dense.weight"):
        assert key in msg


def test_shape_mismatch_named():
    # the release's own input width (4 x 1536) does not fit the tiny file
    with pytest.raises(CheckpointError, match=r"decoder_embed\.weight"):
        load_release_decoder(CKPT, CONFIG, base_image_size=(70, 70))


def test_config_folder_and_errors(tmp_path):
    shutil.copy(CONFIG, tmp_path / "config.json")
    assert release_decoder_config(tmp_path, **TINY) == release_decoder_config(CONFIG, **TINY)
    data = json.loads(CONFIG.read_text())
    for key, value, pattern in [("hidden_act", "relu", "hidden_act: 'relu'"),
                                ("decoder_hidden_size", None, "decoder_hidden_size"),
                                ("decoder_num_attention_heads", 3, "heads")]:
        bad = dict(data)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        path = tmp_path / f"bad_{key}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=pattern) as err:
            release_decoder_config(path, **TINY)
        assert str(path) in str(err.value)


def test_release_xl_config(tmp_path):
    xl = {"decoder_hidden_size": 1152, "decoder_intermediate_size": 4096,
          "decoder_num_attention_heads": 16, "decoder_num_hidden_layers": 28,
          "hidden_act": "gelu", "hidden_size": 3072, "layer_norm_eps": 1e-12,
          "num_channels": 3, "patch_size": "SHOULD BE RELOADED", "qkv_bias": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(xl))
    cfg = release_decoder_config(path)
    assert cfg == decoder_preset("xl")
    with torch.device("meta"):
        model = RGBDecoder(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["decoder_pos_embed"] == (1, 1297, 1152)
    assert shapes["decoder_embed.weight"] == (1152, 6144)
    assert shapes["decoder_pred.weight"] == (588, 1152)
    assert shapes["decoder_layers.27.intermediate.dense.weight"] == (4096, 1152)
    # 422.5M with the position table, as the release counts it (docs/release-facts.md)
    assert round(sum(v.numel() for v in model.state_dict().values()) / 1e5) == 4225
