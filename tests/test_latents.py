"""The latent space over DA3: the raw and decoder forms of a level, propagation from the raw
boundary level, normalisation, `LatentSpace` end to end, and the `latent` config section.

Exactness. Propagation and the decoder form are compared bit for bit: on the CPU in fp32 they
run the same operations on tensors of the same shapes as `encode` does (a level's tokens are
rebuilt, not approximated), so no summation order changes (docs/da3.md: "Propagation
(bit-exact)"). Normalisation round trips are bounded from fp32 rounding (see the test).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gld.config import ConfigError, load_config
from gld.encoders import DA3
from gld.encoders.da3.measure import randomize_
from gld.latents import (
    EPS, Latent, LatentConfig, LatentSpace, LatentStats, Moments, build_latent_space, save_stats,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
F32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def small():
    return randomize_(DA3("da3-small"), seed=3)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 3, 42, 56, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def both_forms(small, images):
    return small.encode(images), small.encode(images, form="raw")


def _random_stats(C: int, levels=(0, 1, 2, 3), seed: int = 0) -> LatentStats:
    g = torch.Generator().manual_seed(seed)
    n = len(levels)
    mean = torch.randn(n, C, generator=g, dtype=torch.float64) * 3
    var = 10 ** (torch.rand(n, C, generator=g, dtype=torch.float64) * 5 - 3)  # 1e-3 .. 1e2
    return LatentStats(levels, mean, var, [1000] * n, encoder="da3-small")


# -- the two forms ---------------------------------------------------------------------------------

def test_raw_form_is_the_two_block_outputs(small, images, both_forms):
    """Raw level l = [output of block L-1 | output of block L] (L = out_layers[l]) on the
    patch tokens, read independently through forward hooks; the decoder form applies the final
    LayerNorm (eps 1e-5) to the second half only."""
    outputs = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o))
             for k, blk in enumerate(small.backbone.blocks)]
    try:
        raw = small.encode(images, form="raw")
    finally:
        for h in hooks:
            h.remove()
    decoder, _ = both_forms
    B, V = images.shape[:2]
    C = small.config.dim
    norm = small.backbone.norm
    assert norm.eps == 1e-5 and norm.normalized_shape == (C,)
    for lv, L in enumerate(small.config.out_layers):
        local = outputs[L - 1].reshape(B, V, -1, C)      # block L-1 is local: (B V, T, C)
        glob = outputs[L].reshape(B, V, -1, C)           # block L is global: (B, V T, C)
        assert torch.equal(raw[lv].features, torch.cat([local[:, :, 1:], glob[:, :, 1:]], -1))
        assert torch.equal(raw[lv].cam_token, torch.cat([local[:, :, 0], glob[:, :, 0]], -1))
        ln = F.layer_norm(glob[:, :, 1:], (C,), norm.weight, norm.bias, eps=1e-5)
        assert torch.equal(decoder[lv].features, torch.cat([local[:, :, 1:], ln], -1))
        assert torch.equal(decoder[lv].cam_token, raw[lv].cam_token)
        assert decoder[lv].grid == raw[lv].grid == (3, 4)
        # The halves differ where they should: LN makes the global half per-token standardised.
        assert not torch.allclose(raw[lv].features[..., C:], decoder[lv].features[..., C:])


def test_decoder_form_of_raw_is_encode_default(small, both_forms):
    decoder, raw = both_forms
    for a, b in zip(decoder, raw):
        converted = small.decoder_form(b)
        assert torch.equal(converted.features, a.features)
        assert converted.cam_token is b.cam_token and converted.grid == b.grid


def test_form_errors(small, images, both_forms):
    with pytest.raises(ValueError, match=r"unknown level form 'ln'; choose from decoder, raw"):
        small.encode(images, form="ln")
    with pytest.raises(ValueError, match=r"via must be 'local' or 'current', got 'global'"):
        small.propagate(both_forms[1][1], 1, via="global")


# -- propagation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["local", "current"])
@pytest.mark.parametrize("form", ["raw", "decoder"])
def test_propagate_from_raw_level_equals_encoding(small, both_forms, via, form):
    decoder, raw = both_forms
    want = raw if form == "raw" else decoder
    for lv in range(4):
        deeper = small.propagate(raw[lv], lv, via=via, form=form)
        assert len(deeper) == 3 - lv
        for got, ref in zip(deeper, want[lv + 1:]):
            assert torch.equal(got.features, ref.features)
            assert torch.equal(got.cam_token, ref.cam_token)


def test_what_each_route_reads(small, both_forms):
    """via "local" reads the local half (a generated global half is ignored, recomputed);
    via "current" continues from the global half."""
    _, raw = both_forms
    lv, C = raw[1], small.config.dim
    ref_local = small.propagate(lv, 1, form="raw", via="local")
    ref_current = small.propagate(lv, 1, form="raw", via="current")
    bump = torch.zeros_like(lv.features)
    bump[..., C:] = 0.5
    glob_changed = lv._replace(features=lv.features + bump)
    assert torch.equal(small.propagate(glob_changed, 1, form="raw", via="local")[0].features,
                       ref_local[0].features)
    moved = small.propagate(glob_changed, 1, form="raw", via="current")[0].features
    assert (moved - ref_current[0].features).abs().max() > 1e-2
    local_changed = lv._replace(features=lv.features + bump.roll(C, -1))
    moved = small.propagate(local_changed, 1, form="raw", via="local")[0].features
    assert (moved - ref_local[0].features).abs().max() > 1e-2


# -- normalisation ---------------------------------------------------------------------------------

def test_normalize_matches_formula_and_round_trips():
    C = 64
    stats = _random_stats(C)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 12, C, generator=g) * 5 + 2
    for lv in stats.levels:
        mean32, var32 = stats.mean[lv].float(), stats.var[lv].float()
        z = stats.normalize(x, lv)
        # The release's arithmetic: stats cast to the features' dtype, then sqrt(var + eps).
        assert torch.equal(z, (x - mean32) / torch.sqrt(var32 + 1e-5))
        back = stats.denormalize(z, lv)
        assert back.dtype == x.dtype == z.dtype
        # (x - m) and / s round once each, * s once, + m once: |back - x| <= 3 eps |x - m|
        # + eps |x| to first order; 4 and 2 leave room for the second-order terms.
        bound = 4 * F32 * (x - mean32).abs() + 2 * F32 * x.abs()
        assert ((back - x).abs() <= bound).all()
        # float64 stays float64 (no fp32 detour).
        assert stats.normalize(x.double(), lv).dtype == torch.float64


def test_normalised_data_has_zero_mean_and_unit_variance():
    """With its own statistics, data normalises to mean 0 and variance var / (var + eps)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4000, 8, generator=g, dtype=torch.float64)
         * torch.tensor([1e-3, 1e-2, 0.1, 1, 3, 10, 30, 100], dtype=torch.float64) + 7)
    m = Moments.of(x)
    stats = LatentStats.from_moments({1: m})
    z = Moments.of(stats.normalize(x, 1))
    torch.testing.assert_close(z.mean, torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.var, m.var / (m.var + EPS), rtol=1e-12, atol=0)


def test_normalize_errors():
    stats = _random_stats(16, levels=(1,))
    with pytest.raises(ValueError, match=r"no statistics for level 0; they hold levels \[1\]"):
        stats.normalize(torch.zeros(3, 16), 0)
    with pytest.raises(ValueError, match=r"features have 8 channels on the last axis, the "
                                         r"statistics 16"):
        stats.denormalize(torch.zeros(3, 8), 1)


# -- LatentSpace -----------------------------------------------------------------------------------

def test_space_encode_decode_geometry_without_stats(small, images, both_forms):
    decoder, raw = both_forms
    space = LatentSpace(small, boundary_level=1)
    assert space.channels == 768
    lat = space.encode(images)
    assert isinstance(lat, Latent) and lat.level == 1 and lat.grid == (3, 4)
    assert lat.z.shape == (2, 3, 12, 768) and lat.cam_token.shape == (2, 3, 768)
    assert torch.equal(lat.z, raw[1].features) and torch.equal(lat.cam_token, raw[1].cam_token)
    with pytest.raises(ValueError, match=r"levels \[0\] are missing"):
        space.decode([lat])
    lat0 = space.encode(images, level=0)
    for via in ("local", "current"):
        levels = space.decode([lat0, lat], via=via)
        for got, ref in zip(levels, decoder):
            assert torch.equal(got.features, ref.features)
            assert torch.equal(got.cam_token, ref.cam_token)
    geo, ref = space.geometry([lat0, lat]), small.geometry(decoder, images.shape[-2:])
    assert set(geo) == set(ref) and all(torch.equal(geo[k], ref[k]) for k in ref)


def test_space_with_stats_normalises_and_inverts(small, images, both_forms):
    decoder, raw = both_forms
    stats = _random_stats(768)
    space = LatentSpace(small, boundary_level=2, stats=stats)
    lat = space.encode(images)
    assert lat.level == 2 and torch.equal(lat.z, stats.normalize(raw[2].features, 2))
    lats = [space.to_latent(raw[lv], lv) for lv in range(3)]
    levels = space.decode(lats)
    for lv in range(3):
        x = raw[lv].features
        back = space.raw_level(lats[lv]).features
        bound = 4 * F32 * (x - stats.mean[lv].float()).abs() + 2 * F32 * x.abs()
        assert ((back - x).abs() <= bound).all()
        assert torch.equal(levels[lv].features, small.decoder_form(space.raw_level(lats[lv])).features)
    # The deepest given level is propagated from its denormalised raw form.
    prop = small.propagate(space.raw_level(lats[2]), 2)
    assert torch.equal(levels[3].features, prop[0].features)
    with pytest.raises(ValueError, match=r"level 1 given twice"):
        space.decode([lats[1], lats[1]])


def test_space_checks_its_stats(small):
    with pytest.raises(ValueError, match=r"no statistics for level 1; they hold levels \[0, 2\]"):
        LatentSpace(small, 1, _random_stats(768, levels=(0, 2)))
    with pytest.raises(ValueError, match=r"have 1536 channels, da3-small levels 768"):
        LatentSpace(small, 1, _random_stats(1536))
    with pytest.raises(ValueError, match=r"boundary_level must be in \[0, 3\], got 4"):
        LatentSpace(small, 4)


# -- config ----------------------------------------------------------------------------------------

def test_presets_latent_sections():
    tiny = load_config(CONFIGS / "tiny.yaml").latent
    assert (tiny.encoder, tiny.weights, tiny.boundary_level, tiny.normalize) == (
        "da3-small", None, 1, False)
    base = load_config(CONFIGS / "gld_da3_base.yaml").latent
    assert (base.encoder, base.boundary_level, base.normalize) == ("da3-base", 1, True)
    assert base.stats and base.stats[0].endswith("normalization_stats_level1.pt")


@pytest.mark.parametrize("overrides, pattern", [
    (["--latent.encoder=da3-huge"], r"latent.encoder: unknown DA3 variant 'da3-huge'; expected "
                                    r"one of da3-base, da3-large, da3-small"),
    (["--latent.boundary_level=4"], r"latent.boundary_level: must be in \[0, 3\] .*got 4"),
    (["--latent.normalize=true"], r"latent.stats: latent.normalize is true but no statistics"),
    (["--latent.stats=[a.npz]"], r"latent.stats\[0\]: expected a .safetensors file"),
    (["--latent.weights="], r"latent.weights: must be a path or null"),
    (["--latent.levels=1"], r"unknown key 'latent.levels'"),
])
def test_latent_config_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "tiny.yaml", overrides)


@pytest.mark.slow
def test_build_latent_space_from_config(tmp_path, images, small):
    cfg = load_config(CONFIGS / "tiny.yaml").latent
    space = build_latent_space(cfg)
    assert space.encoder.variant == "da3-small" and space.stats is None
    path = save_stats(_random_stats(768, levels=(1,)), tmp_path / "stats.safetensors")
    # The release's dpt_decoder.pt format: {"model": {"decoder.<head key>": ...}}.
    head = {"decoder." + k: v for k, v in small.head.state_dict().items()}
    torch.save({"model": head}, tmp_path / "dpt_decoder.pt")
    normed = build_latent_space(LatentConfig(encoder="da3-small", stats=[str(path)],
                                             normalize=True,
                                             dpt_head=str(tmp_path / "dpt_decoder.pt")))
    assert normed.stats.levels == (1,) and normed.stats.encoder == "da3-small"
    # Random weights are reproducible: the same backbone in both; the head is the file's.
    assert all(torch.equal(a, b) for a, b in zip(space.encoder.backbone.state_dict().values(),
                                                  normed.encoder.backbone.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(small.head.state_dict().values(),
                                                  normed.encoder.head.state_dict().values()))
    assert not torch.equal(space.encoder.head.norm.weight, normed.encoder.head.norm.weight)
    raw = space.encode(images)
    assert torch.equal(normed.encode(images).z, normed.stats.normalize(raw.z, 1))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.safetensors"))):
        build_latent_space(LatentConfig(encoder="da3-small", normalize=True,
                                        stats=[str(tmp_path / "none.safetensors")]))
