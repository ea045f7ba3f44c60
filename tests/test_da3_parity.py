"""DA3 parity against the official package (depth-anything-3==0.1.1), random weights.

The official network is built from its own config with every parameter randomised, saved the
way the published `model.safetensors` files are (the network under `.model`, tied aliases
dropped: 437 stored keys for 443 state-dict entries) and loaded through our loader.

No tolerance in fp32: our code runs the official operations in the official order (docs/da3.md),
and the same fp32 operations on the same shapes in one process give the same bits, so levels,
propagation, heads, poses and the API's pose normalisation are compared with `torch.equal`.
Where the computations differ (bf16 autocast on the CPU; gld.geometry's pose normalisation), the
bound is derived in the test.

CI installs the official package without its dependency tree:
    pip install --no-deps depth-anything-3==0.1.1 addict omegaconf
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("addict")
pytest.importorskip("omegaconf")
da3_cfg = pytest.importorskip("depth_anything_3.cfg")

from depth_anything_3.model.utils.transform import pose_encoding_to_extri_intri  # noqa: E402
from depth_anything_3.utils.geometry import affine_inverse  # noqa: E402
from safetensors.torch import save_model  # noqa: E402

from gld.checkpoints.da3 import read_da3  # noqa: E402
from gld.checkpoints.loading import load_into  # noqa: E402
from gld.encoders import DA3  # noqa: E402
from gld.encoders.da3.camera import normalize_extrinsics  # noqa: E402
from gld.encoders.da3.measure import randomize_  # noqa: E402
from gld.geometry import c2w_to_w2c, make_intrinsics, normalize_poses  # noqa: E402
from tests.geometry_utils import random_c2w  # noqa: E402

EPS = torch.finfo(torch.float32).eps
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significand bits)
CASES = [(v, hw) for v in (1, 2, 4) for hw in ((56, 56), (42, 70))]


class _Published(nn.Module):
    """The official API holds the network as `.model`: keys "model.backbone.pretrained...."."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net


@pytest.fixture(scope="module", params=["small", pytest.param("base", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory):
    """(official network, ours) with the same random weights. Base repeats every check at its
    width (building and saving it alone takes about 4 s on 2 cores): slow; Small is quick."""
    variant = request.param
    torch.manual_seed(0)
    net = da3_cfg.create_object(da3_cfg.load_config(f"depth_anything_3.configs.da3-{variant}"))
    net.eval()
    randomize_(net, seed=1 if variant == "small" else 2)  # no tensor can be silently ignored
    folder = tmp_path_factory.mktemp(f"da3-{variant}")
    save_model(_Published(net), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_name": f"da3-{variant}"}))
    ckpt = read_da3(folder)
    assert ckpt.config.name == f"da3-{variant}"
    ours = DA3(ckpt.config)
    report = load_into(ours, ckpt.state, where=ckpt.weights)
    assert report.ok and len(report.aliases_filled) == 6
    return net, ours


def _images(B, V, H, W, seed):
    return torch.rand(B, V, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _maxdiff(a, b):
    return (a - b).abs().max().item()


def _same(a, b, what):
    assert a.shape == b.shape and torch.equal(a, b), f"{what}: max |diff| {_maxdiff(a, b)}"


@pytest.mark.parametrize("views,size", CASES)
def test_unposed_parity(pair, views, size):
    net, ours = pair
    H, W = size
    imgs = _images(2, views, H, W, seed=views * 100 + H)
    x = ours.normalize_images(imgs)
    with torch.no_grad():
        ref_levels, _ = net.backbone(x, cam_token=None, export_feat_layers=[],
                                     ref_view_strategy="first")
        ref_head = net.head(ref_levels, H, W, patch_start_idx=0)
        ref_out = net(x, ref_view_strategy="first")  # the network's own camera path
    levels = ours.encode(imgs)
    geo = ours.geometry(levels, (H, W))

    C = ours.config.dim
    for i, (lv, (ref_feat, ref_tok)) in enumerate(zip(levels, ref_levels)):
        assert lv.features.shape == (2, views, (H // 14) * (W // 14), 2 * C)
        assert lv.cam_token.shape == (2, views, 2 * C)
        _same(lv.features, ref_feat, f"level {i}")
        _same(lv.cam_token, ref_tok, f"cam token {i}")
    for key in ("depth", "depth_conf", "ray", "ray_conf"):
        _same(geo[key], ref_head[key], key)
    assert geo["ray"].shape == (2, views, 8 * H // 14, 8 * W // 14, 6)
    _same(geo["depth"], ref_out["depth"], "depth (whole network)")
    _same(geo["w2c"][..., :3, :], ref_out["extrinsics"], "w2c")
    _same(geo["K"], ref_out["intrinsics"], "K")
    torch.testing.assert_close(geo["w2c"][..., 3, :], torch.tensor([0.0, 0, 0, 1]).expand(2, views, 4))


def _official_api_normalize(w2c):
    """The official API's `DepthAnything3._normalize_extrinsics` (api.py), restated because
    importing depth_anything_3.api needs the package's full dependency tree."""
    ex = w2c @ affine_inverse(w2c[:, :1])
    dist = affine_inverse(ex)[..., :3, 3].norm(dim=-1)
    med = torch.clamp(torch.median(dist), min=1e-1)
    ex[..., :3, 3] = ex[..., :3, 3] / med
    return ex


@pytest.mark.parametrize("views,size", [(1, (56, 56)), (2, (42, 70)), (4, (42, 70))])
def test_posed_parity(pair, views, size):
    """Camera encoder path: poses normalised as the API does, then camera tokens replace the
    learned ones (no view reordering with poses)."""
    net, ours = pair
    H, W = size
    g = torch.Generator().manual_seed(7 + views)
    c2w = random_c2w(views, g).float()
    c2w[:, :3, 3] *= 3.0
    w2c = c2w_to_w2c(c2w)[None]
    K = make_intrinsics(torch.rand(views, generator=g) * 20 + 40, torch.rand(views, generator=g) * 20 + 40,
                        W / 2, H / 2)[None].float()
    imgs = _images(1, views, H, W, seed=views)
    x = ours.normalize_images(imgs)
    w2c_norm = _official_api_normalize(w2c.clone())
    _same(normalize_extrinsics(w2c), w2c_norm, "normalised poses")
    with torch.no_grad():
        tok = net.cam_enc(w2c_norm, K, (H, W))
        ref_levels, _ = net.backbone(x, cam_token=tok, export_feat_layers=[])
        ref_out = net(x, extrinsics=w2c_norm, intrinsics=K)
    levels = ours.encode(imgs, w2c=w2c, K=K)
    geo = ours.geometry(levels, (H, W))
    for i, (lv, (ref_feat, ref_tok)) in enumerate(zip(levels, ref_levels)):
        _same(lv.features, ref_feat, f"level {i}")
        _same(lv.cam_token, ref_tok, f"cam token {i}")
    for key in ("depth", "depth_conf"):
        _same(geo[key], ref_out[key], key)
    _same(geo["w2c"][..., :3, :], ref_out["extrinsics"], "w2c")
    # Camera tokens differ from the learned ones, so the poses really entered the backbone.
    assert not torch.allclose(levels[0].cam_token, ours.encode(imgs)[0].cam_token)


def test_api_normalisation_is_gld_median_scheme():
    """The API's scheme equals gld.geometry's "median" normalisation relative to view 0.

    Two different fp32 computations of the same 4x4 matrices: between them eight steps (4x4
    products and rigid inverses, the distance norm, the division by the median), each a sum of
    at most 4 terms, so each off by at most 4 eps of the entries' magnitude (the worst case:
    too short a sum for a random-walk estimate), and they agree to 4 eps * 8 * max |entry|.
    """
    g = torch.Generator().manual_seed(3)
    c2w = random_c2w(5, g).float()[None]
    ours_c2w, _ = normalize_poses(c2w, ref_index=0, scale="median")
    want = c2w_to_w2c(ours_c2w)
    bound = 4 * EPS * 8 * want.abs().max().item()
    torch.testing.assert_close(normalize_extrinsics(c2w_to_w2c(c2w)), want, atol=bound, rtol=0)


def test_propagate_is_exact(pair):
    _, ours = pair
    imgs = _images(1, 3, 42, 70, seed=11)
    levels = ours.encode(imgs)
    for from_level in (0, 1, 2):
        deeper = ours.propagate(levels[from_level], from_level)
        assert len(deeper) == 3 - from_level
        for got, want in zip(deeper, levels[from_level + 1:]):
            assert torch.equal(got.features, want.features), from_level
            assert torch.equal(got.cam_token, want.cam_token), from_level
    # A bare (features, cam_token) pair needs the image size for a non-square grid.
    bare = (levels[1].features, levels[1].cam_token)
    again = ours.propagate(bare, 1, image_size=(42, 70))
    assert torch.equal(again[-1].features, levels[3].features)
    assert ours.propagate(levels[3], 3) == []


def test_propagate_needs_token0(pair):
    """Dropping token 0 (zeros instead) changes deeper levels: why the cam token is kept."""
    _, ours = pair
    if ours.variant != "da3-small":
        pytest.skip("one variant suffices (cost)")
    levels = ours.encode(_images(1, 2, 56, 56, seed=5))
    lv = levels[1]
    wrong = ours.propagate((lv.features, torch.zeros_like(lv.cam_token)), 1, image_size=(56, 56))
    assert not torch.allclose(wrong[0].features, levels[2].features, atol=1e-4)


@pytest.mark.slow  # two 518 x 518 backbones: 2-8 s on 2 cores
def test_training_grid_uses_table_unresized(pair):
    """At 518 x 518 (the 37 x 37 training grid) the position table is used as stored."""
    net, ours = pair
    if ours.variant != "da3-small":
        pytest.skip("one variant suffices (cost)")
    imgs = _images(1, 1, 518, 518, seed=2)
    x = ours.normalize_images(imgs)
    with torch.no_grad():
        ref_levels, _ = net.backbone(x, cam_token=None, export_feat_layers=[])
    levels = ours.encode(imgs)
    assert all(torch.equal(a.features, b[0]) for a, b in zip(levels, ref_levels))


def test_bf16_autocast_matches_official(pair):
    """Same bf16 autocast recipe as the official API (backbone bf16, heads fp32).

    Close, not equal: CPU autocast leaves LayerNorm in bf16, so on the CPU the official code
    rotates q and k (RoPE) in bf16 after qk-norm, while we always rotate in fp32 (what the
    official code does on CUDA, where LayerNorm autocasts to fp32). So each RoPE block (blocks
    alt_start.. of the level) rounds q and k to bf16 at a different point: a relative change of
    at most U_BF16 in that block's attention output, and independent changes of successive
    blocks add like a random walk, giving U_BF16 * sqrt(RoPE blocks so far) of the level's
    largest feature (about 2.5x what is seen). The fp32 head gets all four levels: its depth is
    bounded by the sum of their bounds, relative to the largest depth.
    """
    net, ours = pair
    if ours.variant != "da3-small":
        pytest.skip("one variant suffices (cost)")
    imgs = _images(1, 2, 42, 56, seed=9)
    x = ours.normalize_images(imgs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_levels, _ = net.backbone(x, cam_token=None, export_feat_layers=[])
        ref = net(x)
    levels = ours.encode(imgs, amp=torch.bfloat16)
    geo = ours.geometry(levels, (42, 56))
    cfg = ours.config
    bounds = [U_BF16 * (block + 1 - cfg.alt_start) ** 0.5 for block in cfg.out_layers]
    for lv, (ref_feat, _), bound in zip(levels, ref_levels, bounds):
        assert lv.features.dtype == ref_feat.dtype == torch.float32
        assert _maxdiff(lv.features, ref_feat) <= bound * ref_feat.abs().max().item()
    assert geo["depth"].dtype == torch.float32
    assert _maxdiff(geo["depth"], ref["depth"]) <= sum(bounds) * ref["depth"].abs().max().item()
