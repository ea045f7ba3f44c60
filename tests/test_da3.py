"""DA3 without the official package: loading and its errors, the GLD release's dpt_decoder.pt,
frozen / no-autograd behaviour, the attention entry point, invariants of the latent space."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import gld.encoders.da3.backbone as backbone_mod
from gld.checkpoints.da3 import CheckpointError, official_to_ours, ours_to_official
from gld.checkpoints.gld_release import load_gld_dpt_decoder
from gld.encoders import DA3
from gld.encoders.da3 import resolve_variant
from kernels.attention import use_backend

ALIASES = [f"model.head.scratch.output_conv2_aux.{i}.2.{p}" for i in (1, 2, 3)
           for p in ("weight", "bias")]


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            scale = 0.5 if p.dim() <= 1 or p.shape[0] == 1 else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def small():
    return _randomize(DA3("da3-small"))


def _published_state(model):
    """Official key names, tied aliases dropped, as the published safetensors store them."""
    state = {k: v.clone().contiguous() for k, v in ours_to_official(model.state_dict()).items()}
    for k in ALIASES:
        del state[k]
    assert len(state) == 437
    return state


@pytest.fixture(scope="module")
def published(small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("da3-small")
    save_file(_published_state(small), str(folder / "model.safetensors"))
    return folder


def _imgs(B, V, H, W, seed=0):
    return torch.rand(B, V, 3, H, W, generator=torch.Generator().manual_seed(seed))


# -- loading ------------------------------------------------------------------------------------

def test_load_file_infers_variant_and_round_trips(small, published):
    model = DA3.from_pretrained(published / "model.safetensors")
    assert model.variant == "da3-small" and model.load_report.ok
    assert sorted(model.load_report.aliases_filled) == sorted(official_to_ours(
        {k: None for k in ALIASES}))
    for (k, a), b in zip(small.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    # The four aliases are one parameter, as in the official head.
    heads = model.head.scratch.output_conv2_aux
    assert heads[0][2].weight is heads[3][2].weight


def test_config_json_and_explicit_variant(published, tmp_path):
    (published / "config.json").write_text(json.dumps({"model_name": "da3-small"}))
    assert DA3.from_pretrained(published).variant == "da3-small"
    with pytest.raises(CheckpointError, match=r"da3-base.*da3-small"):
        DA3.from_pretrained(published, variant="DA3-BASE")
    (published / "config.json").write_text(json.dumps({"model_name": "da3-giant"}))
    with pytest.raises(CheckpointError, match="da3-giant"):
        DA3.from_pretrained(published)
    (published / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DA3.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(small, tmp_path):
    state = _published_state(small)
    del state["model.cam_dec.fc_t.bias"], state["model.backbone.pretrained.blocks.3.ls2.gamma"]
    state["model.head.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        DA3.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "2 missing key(s)" in msg and "cam_dec.fc_t.bias" in msg
    assert "backbone.blocks.3.ls2.gamma" in msg and "head.extra.weight" in msg
    with pytest.warns(UserWarning, match="cam_dec.fc_t.bias"):
        model = DA3.from_pretrained(tmp_path, strict=False)
    assert model.load_report.missing == ["backbone.blocks.3.ls2.gamma", "cam_dec.fc_t.bias"]
    assert model.load_report.unexpected == ["head.extra.weight"]


def test_shape_mismatch_names_key_and_shapes(small, tmp_path):
    state = _published_state(small)
    state["model.head.projects.1.weight"] = torch.zeros(5, 768, 1, 1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError,
                       match=re.escape("head.projects.1.weight: expected (96, 768, 1, 1), "
                                       "found (5, 768, 1, 1)")):
        DA3.from_pretrained(tmp_path, strict=False)


def test_tied_aliases_must_agree(small, tmp_path):
    state = ours_to_official(small.state_dict())
    state = {k: v.clone() for k, v in state.items()}
    state[ALIASES[0]] = state[ALIASES[0]] + 1
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="tied keys"):
        DA3.from_pretrained(tmp_path / "model.pt")


def test_torch_file_with_model_entry_loads_weights_only(small, tmp_path):
    torch.save({"model": _published_state(small), "step": 3}, tmp_path / "ckpt.pth")
    model = DA3.from_pretrained(tmp_path / "ckpt.pth")
    assert torch.equal(model.backbone.camera_token, small.backbone.camera_token)
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        DA3.from_pretrained(tmp_path / "bad.pt")


def test_gld_dpt_decoder(small, tmp_path):
    """dpt_decoder.pt: {"model": {"decoder.<head key>" | "pred.<head key>": tensor, ...}}."""
    model = _randomize(DA3("da3-small"), seed=5)
    head = small.head.state_dict()  # torch.save keeps the tied aliases
    keys = sorted(head)
    release = {("decoder." if i % 2 else "pred.") + k: head[k].clone() for i, k in enumerate(keys)}
    release["encoder.blocks.0.weight"] = torch.zeros(2)
    torch.save({"model": release, "epoch": 4}, tmp_path / "dpt_decoder.pt")
    report = load_gld_dpt_decoder(model, tmp_path / "dpt_decoder.pt")
    assert report.ignored == ["encoder.blocks.0.weight"] and report.ok
    for k, v in small.head.state_dict().items():
        assert torch.equal(model.head.state_dict()[k], v), k
    del release[sorted(release)[0]]
    torch.save({"model": release}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="1 missing key"):
        load_gld_dpt_decoder(model, tmp_path / "partial.pt")


def test_variant_names():
    assert resolve_variant("depth-anything/DA3-LARGE").name == "da3-large"
    assert resolve_variant("vitb").name == "da3-base"
    with pytest.raises(ValueError, match="unknown DA3 variant 'vitg'"):
        resolve_variant("vitg")


# -- behaviour ----------------------------------------------------------------------------------

def test_frozen_eval_no_autograd(small):
    assert not small.training
    assert not any(p.requires_grad for p in small.parameters())
    with torch.enable_grad():
        levels = small.encode(_imgs(1, 2, 28, 42))
        geo = small.geometry(levels, (28, 42))
    assert all(lv.features.grad_fn is None and not lv.features.is_inference() for lv in levels)
    assert geo["depth"].grad_fn is None
    assert set(geo) == {"depth", "depth_conf", "ray", "ray_conf", "pose_enc", "w2c", "K"}


def test_output_shapes_and_camera_validity(small):
    B, V, H, W = 2, 3, 42, 56
    out = small(_imgs(B, V, H, W))
    assert [lv.features.shape for lv in out["levels"]] == [(B, V, 12, 768)] * 4
    assert [lv.cam_token.shape for lv in out["levels"]] == [(B, V, 768)] * 4
    assert out["depth"].shape == out["depth_conf"].shape == (B, V, H, W)
    assert out["ray"].shape == (B, V, 24, 32, 6) and out["ray_conf"].shape == (B, V, 24, 32)
    assert bool((out["depth"] > 0).all()) and bool((out["depth_conf"] >= 1).all())
    R = out["w2c"][..., :3, :3]
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand(B, V, 3, 3),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(out["K"][..., :2, 2], torch.tensor([W / 2, H / 2]).expand(B, V, 2))


def test_attention_goes_through_the_entry_point(small, monkeypatch):
    calls = []

    def spy(q, k, v, cameras=None):
        calls.append(tuple(q.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(backbone_mod, "attention", spy)
    small.encode(_imgs(1, 3, 28, 28))
    local, glob = (1 * 3, 6, 5, 64), (1, 6, 3 * 5, 64)
    assert calls == [local] * 5 + [glob, local] * 3 + [glob]  # 0-4 local, then 5, 7, 9, 11 global
    with use_backend("sdpa_math"):
        a = small.encode(_imgs(1, 2, 28, 28))[3].features
    torch.testing.assert_close(a, small.encode(_imgs(1, 2, 28, 28))[3].features, atol=1e-5, rtol=0)


def test_views_are_exchangeable_except_the_reference(small):
    """No position is shared across views: permuting views 1.. permutes every output."""
    imgs = _imgs(1, 4, 28, 42, seed=3)
    perm = torch.tensor([0, 2, 3, 1])
    a, b = small.encode(imgs), small.encode(imgs[:, perm])
    for la, lb in zip(a, b):
        torch.testing.assert_close(la.features[:, perm], lb.features, atol=1e-5, rtol=1e-5)
    # View 0 carries the reference camera token: moving it changes the result.
    c = small.encode(imgs[:, torch.tensor([1, 0, 2, 3])])
    assert not torch.allclose(a[3].features[:, 1], c[3].features[:, 0], atol=1e-3)


def test_batch_elements_are_independent(small):
    imgs = _imgs(2, 2, 28, 28, seed=4)
    both = small.encode(imgs)[2].features
    one = small.encode(imgs[1:])[2].features
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)


def test_input_errors_say_what_was_expected(small):
    with pytest.raises(ValueError, match=r"multiple of 14.*\(30, 28\)|\(30, 28\).*multiple of 14"):
        small.encode(torch.rand(1, 1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"expected images \(B, V, 3, H, W\)"):
        small.encode(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="both w2c and K"):
        small.encode(torch.rand(1, 1, 3, 28, 28), w2c=torch.eye(4)[None, None])
    levels = small.encode(torch.rand(1, 1, 3, 28, 42))
    with pytest.raises(ValueError, match="image_size"):
        small.propagate((levels[1].features, levels[1].cam_token), 1)
    with pytest.raises(ValueError, match=r"from_level must be in \[0, 3\]"):
        small.propagate(levels[1], 4)
    with pytest.raises(ValueError, match="do not match image size"):
        small.geometry(levels, (28, 28))


def test_graphed_call_refuses_cpu_inputs():
    from gld.encoders.da3.cuda_graph import GraphedCall

    with pytest.raises(ValueError, match="needs CUDA tensors"):
        GraphedCall(lambda x: x, torch.zeros(2))
