"""DA3 without the official package: loading and its errors, the GLD release's dpt_decoder.pt,
frozen / no-autograd behaviour, the attention backend, FLOP counts, invariants of the latent
space.

Tolerances. Two fp32 evaluations of the same network that differ only in the order of their
sums (BLAS blocks a matmul differently for another batch size, thread count or attention
backend) differ, per dot product of length K, by about EPS * sqrt(K) of its magnitude: the
rounding errors of a reordered sum behave like a random walk (Higham and Mary, "A new approach
to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41, 2019). Through the blocks
up to a level these add, so `fp32_bound` allows EPS * sqrt(K) * blocks of the level's largest
feature, K being the longest contraction (the MLP's 4C = 1536 in Small). That is 50-100x
what is seen, and far below what a real fault gives (mixing batch elements or views changes
outputs by their own size; `test_views_are_exchangeable_except_the_reference` checks the
bound separates the two).
"""
from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import gld.encoders.da3.backbone as backbone_mod
from gld.checkpoints.da3 import load_da3, official_to_ours, ours_to_official, read_da3
from gld.checkpoints.gld_release import load_gld_dpt_decoder
from gld.checkpoints.loading import CheckpointError, load_into
from gld.encoders import DA3
from gld.encoders.da3 import resolve_variant
from gld.encoders.da3.measure import backbone_flops, randomize_

ALIASES = [f"model.head.scratch.output_conv2_aux.{i}.2.{p}" for i in (1, 2, 3)
           for p in ("weight", "bias")]
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def small():
    return randomize_(DA3("da3-small"))


def fp32_bound(model: DA3, reference: torch.Tensor, level: int) -> float:
    """Largest difference expected at `level` from summation order alone (module docstring)."""
    cfg = model.config
    blocks = cfg.out_layers[level] + 1
    return EPS * (4 * cfg.dim) ** 0.5 * blocks * reference.abs().max().item()


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
    ckpt = read_da3(published / "model.safetensors")
    assert ckpt.config.name == "da3-small" and ckpt.weights == published / "model.safetensors"
    model = DA3(ckpt.config)
    report = load_into(model, ckpt.state, where=ckpt.weights)
    assert report.ok and report.where == str(ckpt.weights)
    assert sorted(report.aliases_filled) == sorted(official_to_ours({k: None for k in ALIASES}))
    for (k, a), b in zip(small.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    # The four aliases are one parameter, as in the official head.
    heads = model.head.scratch.output_conv2_aux
    assert heads[0][2].weight is heads[3][2].weight
    loaded = load_da3(published)
    assert loaded.variant == "da3-small" and not loaded.training
    assert torch.equal(loaded.backbone.pos_embed, small.backbone.pos_embed)


def test_config_json_and_explicit_variant(published, tmp_path):
    (published / "config.json").write_text(json.dumps({"model_name": "da3-small"}))
    assert load_da3(published).variant == "da3-small"
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*da3-base.*da3-small"):
        load_da3(published, variant="DA3-BASE")
    (published / "config.json").write_text(json.dumps({"model_name": "da3-giant"}))
    with pytest.raises(CheckpointError, match=r"config.json: .*da3-giant"):
        load_da3(published)
    (published / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_da3(tmp_path)


def test_missing_and_unexpected_keys_are_named(small, tmp_path):
    state = _published_state(small)
    del state["model.cam_dec.fc_t.bias"], state["model.backbone.pretrained.blocks.3.ls2.gamma"]
    state["model.head.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_da3(tmp_path)
    msg = str(err.value)
    assert err.value.where == str(tmp_path / "model.safetensors")
    assert msg.startswith(err.value.where + ": ") and "2 missing key(s)" in msg
    assert "cam_dec.fc_t.bias" in msg
    assert "backbone.blocks.3.ls2.gamma" in msg and "head.extra.weight" in msg
    with pytest.warns(UserWarning, match="cam_dec.fc_t.bias"):
        load_da3(tmp_path, strict=False)
    ckpt = read_da3(tmp_path)
    with pytest.warns(UserWarning):
        report = load_into(DA3(ckpt.config), ckpt.state, where=ckpt.weights, strict=False)
    assert report.missing == ["backbone.blocks.3.ls2.gamma", "cam_dec.fc_t.bias"]
    assert report.unexpected == ["head.extra.weight"]


def test_shape_mismatch_names_key_and_shapes(small, tmp_path):
    state = _published_state(small)
    state["model.head.projects.1.weight"] = torch.zeros(5, 768, 1, 1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError,
                       match=re.escape("head.projects.1.weight: expected (96, 768, 1, 1), "
                                       "found (5, 768, 1, 1)")):
        load_da3(tmp_path, strict=False)


def test_tied_aliases_must_agree(small, tmp_path):
    state = ours_to_official(small.state_dict())
    state = {k: v.clone() for k, v in state.items()}
    state[ALIASES[0]] = state[ALIASES[0]] + 1
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="tied keys"):
        load_da3(tmp_path / "model.pt")


def test_torch_file_with_model_entry_loads_weights_only(small, tmp_path):
    torch.save({"model": _published_state(small), "step": 3}, tmp_path / "ckpt.pth")
    model = load_da3(tmp_path / "ckpt.pth")
    assert torch.equal(model.backbone.camera_token, small.backbone.camera_token)
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: no state dict found"):
        load_da3(tmp_path / "bad.pt")
    # An arbitrary pickled object is refused, not run.
    torch.save({"model": _published_state(small), "args": argparse.Namespace(lr=1)},
               tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"pickled.pt: .*weights_only=True.*Namespace"):
        load_da3(tmp_path / "pickled.pt")


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors"):
        load_da3(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"weights.npz: unknown checkpoint format '.npz'"):
        load_da3(tmp_path / "weights.npz")


def test_gld_dpt_decoder(small, tmp_path):
    """dpt_decoder.pt: {"model": {"decoder.<head key>" | "pred.<head key>": tensor, ...}}."""
    model = randomize_(DA3("da3-small"), seed=5)
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
    with pytest.raises(CheckpointError, match="partial.pt: 1 missing key"):
        load_gld_dpt_decoder(model, tmp_path / "partial.pt")
    torch.save({"model": {"encoder.x": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: no keys start with \('decoder."):
        load_gld_dpt_decoder(model, tmp_path / "other.pt")


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
    # Each entry of R comes from the quaternion in about 5 roundings and R R^T adds a sum of 3
    # products of entries at most 1: at most (5 + 3) EPS from the identity; twice that allowed.
    R = out["w2c"][..., :3, :3]
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand(B, V, 3, 3),
                               atol=16 * EPS, rtol=0)
    torch.testing.assert_close(out["K"][..., :2, 2], torch.tensor([W / 2, H / 2]).expand(B, V, 2))


def test_attention_backend_reaches_every_call(small, monkeypatch):
    calls = []

    def spy(q, k, v, cameras=None, *, backend="auto"):
        calls.append((tuple(q.shape), backend))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(backbone_mod, "attention", spy)
    small.encode(_imgs(1, 3, 28, 28))
    local, glob = (1 * 3, 6, 5, 64), (1, 6, 3 * 5, 64)
    # blocks 0-4 local, then 5, 7, 9, 11 global
    assert calls == [(s, "auto") for s in [local] * 5 + [glob, local] * 3 + [glob]]
    other = DA3("da3-small", attention_backend="sdpa")
    assert other.attention_backend == "sdpa" and small.attention_backend == "auto"
    calls.clear()
    w2c, K = torch.eye(4).expand(1, 2, 4, 4), torch.diag(torch.tensor([20.0, 20, 1]))
    other.encode(_imgs(1, 2, 28, 28), w2c=w2c, K=K.expand(1, 2, 3, 3))
    assert len(calls) == 4 + 12 and {b for _, b in calls} == {"sdpa"}  # camera encoder too
    assert other.set_attention_backend("reference") is other
    calls.clear()
    other.encode(_imgs(1, 2, 28, 28))
    assert {b for _, b in calls} == {"reference"} and small.attention_backend == "auto"
    with pytest.raises(ValueError, match="unknown attention backend 'fa9'.*reference"):
        DA3("da3-small", attention_backend="fa9")
    with pytest.raises(ValueError, match="unknown attention backend 'fa9'"):
        other.set_attention_backend("fa9")


def test_attention_backends_agree(small):
    """SDPA's math backend (softmax of explicit q k^T) against the default CPU kernel: the same
    function summed in another order."""
    other = DA3("da3-small", attention_backend="sdpa_math")
    other.load_state_dict(small.state_dict())
    imgs = _imgs(1, 2, 28, 28, seed=1)
    for level, (a, b) in enumerate(zip(other.encode(imgs), small.encode(imgs))):
        torch.testing.assert_close(a.features, b.features, rtol=0,
                                   atol=fp32_bound(small, b.features, level))


def test_backbone_flops_match_counted(small, monkeypatch):
    """The analytic count equals torch's FlopCounterMode with attention written as two matmuls
    (the counter does not see inside SDPA on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    def matmul_attention(q, k, v, cameras=None, *, backend="auto"):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(backbone_mod, "attention", matmul_attention)
    x = small.normalize_images(_imgs(2, 3, 28, 42))
    with FlopCounterMode(display=False) as counter:
        small.backbone(x)
    assert counter.get_total_flops() == backbone_flops(small.config, 3, 28, 42, batch=2)


def test_views_are_exchangeable_except_the_reference(small):
    """No position is shared across views: permuting views 1.. permutes every output."""
    imgs = _imgs(1, 4, 28, 42, seed=3)
    perm = torch.tensor([0, 2, 3, 1])
    a, b = small.encode(imgs), small.encode(imgs[:, perm])
    for level, (la, lb) in enumerate(zip(a, b)):
        torch.testing.assert_close(la.features[:, perm], lb.features, rtol=0,
                                   atol=fp32_bound(small, lb.features, level))
    # View 0 carries the reference camera token: moving it changes the result, by far more than
    # the tolerance above.
    c = small.encode(imgs[:, torch.tensor([1, 0, 2, 3])])
    moved = (a[3].features[:, 1] - c[3].features[:, 0]).abs().max().item()
    assert moved > 100 * fp32_bound(small, a[3].features, 3)


def test_batch_elements_are_independent(small):
    imgs = _imgs(2, 2, 28, 28, seed=4)
    for level, (both, one) in enumerate(zip(small.encode(imgs), small.encode(imgs[1:]))):
        torch.testing.assert_close(both.features[1:], one.features, rtol=0,
                                   atol=fp32_bound(small, one.features, level))


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
