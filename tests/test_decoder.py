"""RGBDecoder (gld/models/decoder.py) on the CPU: shapes at the release's sizes, level dropout,
input errors, and a tiny decoder that learns. Parity with the release is in
tests/test_release_decoder.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gld.configtypes import ConfigError
from gld.models import DecoderConfig, RGBDecoder, decoder_preset

TINY = decoder_preset("tiny")
C2 = TINY.in_channels // 4


def levels_for(B, V, H, W, c=C2, g=None):
    N = (H // 14) * (W // 14)
    return [torch.randn(B, V, N, c, generator=g) for _ in range(4)]


@pytest.mark.parametrize("size", [(504, 504), (504, 336), (504, 280)])
def test_shapes_at_release_sizes(size):
    torch.manual_seed(0)
    dec = RGBDecoder(TINY).eval()
    with torch.no_grad():
        out = dec(levels_for(1, 2, *size), image_size=size)
    assert out.shape == (1, 2, 3, *size)
    assert torch.isfinite(out).all()


def test_position_table_exact_at_base_grid():
    dec = RGBDecoder(TINY)
    assert torch.equal(dec.position_table(TINY.base_grid), dec.decoder_pos_embed)
    assert dec.position_table((3, 7)).shape == (1, 1 + 21, TINY.width)


def embed_inputs(dec, levels, size):
    """What decoder_embed sees, as (B, V, N, 4, 2C)."""
    seen = []
    hook = dec.decoder_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            dec(levels, image_size=size)
    finally:
        hook.remove()
    B, V, N, c = levels[0].shape
    return seen[0].reshape(B, V, N, 4, c)


def test_level_dropout_masks_whole_levels_in_training_only():
    torch.manual_seed(1)
    dec = RGBDecoder(decoder_preset("tiny", level_dropout=0.5))
    B, V, size = 64, 2, (28, 42)
    levels = [lv + 3.0 for lv in levels_for(B, V, *size)]        # no zero entries
    ref = torch.stack(levels, dim=3)
    seen = embed_inputs(dec.train(), levels, size)
    zero = (seen == 0).flatten(1, 2).all(-1).all(1)              # (B, 4): level dropped for all
    kept = (seen == ref).flatten(1, 2).all(-1).all(1)            # views, tokens and channels
    assert (zero ^ kept).all(), "a level was partly dropped"
    assert zero.any() and kept.any()
    assert 0.3 < zero.float().mean() < 0.7                       # 256 draws at p = 0.5
    assert len({tuple(r) for r in zero.tolist()}) > 4            # independent per sample/level
    assert torch.equal(embed_inputs(dec.eval(), levels, size), ref)
    no_drop = RGBDecoder(TINY).train()
    assert torch.equal(embed_inputs(no_drop, levels, size), ref)


def test_per_level_dropout_probabilities():
    torch.manual_seed(2)
    dec = RGBDecoder(decoder_preset("tiny", level_dropout=(1.0, 0.0, 0.5, 0.0))).train()
    B, V, size = 64, 2, (28, 42)
    levels = [lv + 3.0 for lv in levels_for(B, V, *size)]
    ref = torch.stack(levels, dim=3)
    seen = embed_inputs(dec, levels, size)
    zero = (seen == 0).flatten(1, 2).all(-1).all(1)              # (B, 4)
    kept = (seen == ref).flatten(1, 2).all(-1).all(1)
    assert (zero ^ kept).all()
    assert zero[:, 0].all() and kept[:, 1].all() and kept[:, 3].all()
    assert 0.25 < zero[:, 2].float().mean() < 0.75               # 64 draws at p = 0.5
    assert torch.equal(embed_inputs(dec.eval(), levels, size), ref)


@pytest.mark.parametrize("value, match", [((0.5, 0.5, 0.5), "4 numbers"),
                                          ((0.0, 1.5, 0.0, 0.0), "4 numbers"),
                                          ((1.0, 1.0, 1.0, 1.0), "drops every level")])
def test_per_level_dropout_errors(value, match):
    with pytest.raises(ConfigError, match=rf"model\.decoder\.level_dropout: .*{match}"):
        RGBDecoder(decoder_preset("tiny", level_dropout=value))


def test_noise_augmentation_scales_with_each_channel_in_training_only():
    torch.manual_seed(3)
    dec = RGBDecoder(decoder_preset("tiny", noise_tau=0.8, level_dropout=(1.0, 0.0, 0.0, 0.0)))
    B, V, size = 256, 2, (28, 42)
    levels = levels_for(B, V, *size)
    levels[2] = levels[2] * 10.0                                 # a level with 10x the spread
    ref = torch.stack(levels, dim=3)                             # (B, V, N, 4, c)
    seen = embed_inputs(dec.train(), levels, size)
    noise = seen - ref
    assert (seen[..., 0, :] == 0).all()                          # the dropped level stays zero
    rms = noise.pow(2).mean(dim=(0, 1, 2, 4)).sqrt()             # per level
    # E[sigma^2] = tau^2 for sigma ~ |N(0, tau^2)|; the noise follows each channel's spread
    assert 0.6 < (rms[2] / rms[1]).item() / 10.0 < 1.6
    per_sample = noise[..., 1, :].pow(2).mean(dim=(1, 2, 3)).sqrt() / ref[..., 1, :].std()
    assert 0.6 < per_sample.pow(2).mean().sqrt().item() / 0.8 < 1.4
    assert per_sample.std() > 0.2                                 # sigma drawn per sample
    assert torch.equal(embed_inputs(dec.eval(), levels, size), ref)


def test_input_errors():
    dec = RGBDecoder(TINY).eval()
    lv = levels_for(1, 2, 28, 42)
    with pytest.raises(ValueError, match="expected 4 tensors L0..L3, got 3"):
        dec(lv[:3], image_size=(28, 42))
    with pytest.raises(ValueError, match=r"7 channels per level, the decoder expects 16"):
        dec(levels_for(1, 2, 28, 42, c=7), image_size=(28, 42))
    with pytest.raises(ValueError, match=r"levels\[2\]: shape"):
        dec(lv[:2] + [lv[2][:, :1]] + lv[3:], image_size=(28, 42))
    with pytest.raises(ValueError, match=r"image_size \(28, 40\): both sides must be positive "
                                         r"multiples of the patch size 14"):
        dec(lv, image_size=(28, 40))
    with pytest.raises(ValueError, match=r"6 tokens per view, image_size \(42, 42\) needs"):
        dec(lv, image_size=(42, 42))


@pytest.mark.parametrize("field,value", [("heads", 5), ("width", 0), ("in_channels", 30),
                                          ("level_dropout", 1.0), ("base_grid", (0, 3)),
                                          ("noise_tau", -0.1)])
def test_config_errors_name_the_key(field, value):
    cfg = decoder_preset("tiny", **{field: value})
    with pytest.raises(ConfigError, match=rf"model\.decoder\.{field}"):
        RGBDecoder(cfg)


def test_presets():
    xl = decoder_preset("xl")
    assert (xl.width, xl.depth, xl.heads, xl.mlp_dim, xl.patch_size, xl.in_channels) == \
        (1152, 28, 16, 4096, 14, 6144)
    assert xl == DecoderConfig()
    with pytest.raises(ValueError, match="unknown decoder preset 'huge'"):
        decoder_preset("huge")


def smooth_images(n, H, W, g):
    """Images in [0, 1] with low-frequency content (bilinear from 4 x 6 random colours)."""
    coarse = torch.rand(n, 3, 4, 6, generator=g)
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)


def test_tiny_decoder_overfits_a_few_samples():
    """4 samples of random levels -> smooth images at 28 x 42 (6 tokens each): after 300 Adam
    steps the tiny decoder reproduces them past 40 dB PSNR (from ~12 dB at the start). The
    samples differ only through their levels, so the levels must be used."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    H, W = 28, 42
    dec = RGBDecoder(decoder_preset("tiny", level_dropout=0.0)).train()
    levels = levels_for(4, 1, H, W, g=g)
    target = smooth_images(4, H, W, g)[:, None]
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.mse_loss(dec(levels, image_size=(H, W)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = F.mse_loss(dec.eval()(levels, image_size=(H, W)).clamp(0, 1), target).item()
    psnr = 10 * math.log10(1 / mse)
    assert psnr > 40, psnr
