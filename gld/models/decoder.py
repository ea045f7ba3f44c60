"""The RGB decoder: a ViT-MAE-style decoder from the four DA3 levels back to pixels
(docs/release-facts.md "RGB decoder (mae_decoder.pt)").

Each view's tokens carry the four levels L0..L3 concatenated on channels, each in DA3's own
form `[local | LN(global)]` (not latent-normalised). They are embedded (`decoder_embed`), a
learned CLS token is prepended, a fixed sin-cos position table (defined on `base_grid`, its
patch part resized by bicubic interpolation to the view's grid) is added, pre-LN ViT layers
run (exact GELU, LayerNorm eps 1e-12, softmax attention with scale 1/sqrt(d) over one view's
tokens), and `decoder_pred` gives every patch's 14 x 14 x 3 values, which are unpatchified and
de-normalised with the ImageNet std and mean. Parameter names are the release's, so its
`mae_decoder.pt` loads by name (gld/checkpoints/gld_release.py).

The output is NOT clamped to [0, 1], as in the release (which clips only when computing PSNR):
callers that need valid pixels clamp.

Level dropout (training only): for every sample and every level independently, with
probability `level_dropout` the whole level (all views, tokens and channels of that sample) is
set to zero, with no rescaling of the kept levels, so that at inference a level that is not
available is passed as zeros (the pipeline runs without level 0 that way). One number applies to
every level; four numbers (L0..L3) set each level's own probability, 1 = always dropped (a
decoder for a pipeline without level 0: `[1, p, p, p]` trains exactly the inference case). The
release reads this setting (one number) but never applies it.

Noise augmentation (training only; RAE's noise-augmented decoding): with `noise_tau` > 0 every
sample's levels get Gaussian noise of standard deviation sigma x (each channel's standard
deviation over the batch's tokens), sigma ~ |N(0, noise_tau^2)| per sample, before level
dropout. A decoder trained so reads generated latents, which carry the sampler's errors, without
breaking up; 0 (the release) turns it off.

Shapes: B batch, V views, N = (H/14)(W/14) tokens per view (row-major), 2C channels per level.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gld.configtypes import ConfigError
from gld.encoders.da3.config import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE
from kernels.attention import attention

__all__ = ["DecoderConfig", "RGBDecoder", "DECODER_PRESETS", "decoder_preset",
           "sincos_table", "NUM_LEVELS"]

NUM_LEVELS = 4


@dataclass
class DecoderConfig:
    """Sizes of an RGB decoder; in_channels = 4 levels x 2C (6144 for DA3-Giant's C = 768)."""

    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = PATCH_SIZE
    in_channels: int = NUM_LEVELS * 1536
    base_grid: tuple[int, int] = (36, 36)      # the position table's grid (504 / 14)
    level_dropout: Union[float, tuple[float, float, float, float]] = 0.0
    noise_tau: float = 0.0
    layer_norm_eps: float = 1e-12

    def validate(self, key: str = "model.decoder") -> None:
        for name in ("width", "depth", "heads", "mlp_dim", "patch_size", "in_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key}.{name}: must be a positive integer, got {v!r}")
        if self.width % self.heads:
            raise ConfigError(f"{key}.heads: width {self.width} is not divisible by "
                              f"{self.heads} heads")
        if self.width % 4:
            raise ConfigError(f"{key}.width: must be divisible by 4 (2D sin-cos table), got "
                              f"{self.width}")
        if self.in_channels % NUM_LEVELS:
            raise ConfigError(f"{key}.in_channels: must be {NUM_LEVELS} levels x 2C, got "
                              f"{self.in_channels}")
        if len(self.base_grid) != 2 or any(g < 1 for g in self.base_grid):
            raise ConfigError(f"{key}.base_grid: expected two positive sizes, got "
                              f"{self.base_grid!r}")
        p = self.level_dropout
        if isinstance(p, (list, tuple)):
            if len(p) != NUM_LEVELS or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0
                                               for v in p):
                raise ConfigError(f"{key}.level_dropout: per-level probabilities must be "
                                  f"{NUM_LEVELS} numbers in [0, 1] (L0..L3), got {p!r}")
            if all(v == 1.0 for v in p):
                raise ConfigError(f"{key}.level_dropout: {p!r} drops every level")
        elif not 0.0 <= p < 1.0:
            raise ConfigError(f"{key}.level_dropout: must be in [0, 1) (or {NUM_LEVELS} "
                              f"per-level probabilities), got {p}")
        if isinstance(self.noise_tau, bool) or not isinstance(self.noise_tau, (int, float)) \
                or not 0.0 <= self.noise_tau < float("inf"):
            raise ConfigError(f"{key}.noise_tau: must be a finite number >= 0, got "
                              f"{self.noise_tau!r}")

    def level_dropout_probs(self) -> tuple[float, ...]:
        """The dropout probability of each level L0..L3."""
        p = self.level_dropout
        if isinstance(p, (list, tuple)):
            return tuple(float(v) for v in p)
        return (float(p),) * NUM_LEVELS
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"{key}.layer_norm_eps: must be > 0, got {self.layer_norm_eps}")


DECODER_PRESETS = {
    "tiny": DecoderConfig(width=64, depth=2, heads=4, mlp_dim=128, in_channels=NUM_LEVELS * 16,
                          base_grid=(6, 6)),
    "small": DecoderConfig(width=384, depth=12, heads=6, mlp_dim=1536),
    "base": DecoderConfig(width=768, depth=12, heads=12, mlp_dim=3072),
    "large": DecoderConfig(width=1024, depth=24, heads=16, mlp_dim=4096),
    "xl": DecoderConfig(),                      # the release's mae_decoder.pt, 422.5M
}


def decoder_preset(name: str, **overrides) -> DecoderConfig:
    """A preset by name, with fields replaced by `overrides`."""
    if name not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset {name!r}; choose one of "
                         f"{sorted(DECODER_PRESETS)}")
    return replace(DECODER_PRESETS[name], **overrides)


def sincos_table(dim: int, grid: tuple[int, int]) -> Tensor:
    """(1 + h w, dim) fp32 table: a zero CLS row, then per token (row-major) the 1D sin-cos
    codes of its column index (first dim/2) and of its row index (second dim/2), each
    [sin(pos omega), cos(pos omega)] with omega_i = 10000^(-i / (dim/4)). Computed in fp64 as
    the release's numpy code is, then rounded once."""
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")

    def code(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([code(cols), code(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class _Dense(nn.Module):
    """A Linear under the name `dense` (the release's key layout)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.dense = nn.Linear(cin, cout)


class _QKV(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))


class _Attention(nn.Module):
    """Self-attention over one view's tokens; keys `attention.{query,key,value}`,
    `output.dense`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention = _QKV(width)
        self.output = _Dense(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        a = self.attention
        o = attention(split(a.query(x)), split(a.key(x)), split(a.value(x)))
        return self.output.dense(o.transpose(1, 2).reshape(B, L, D))


class DecoderLayer(nn.Module):
    """Pre-LN ViT layer: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.attention = _Attention(width, heads)
        self.intermediate = _Dense(width, mlp_dim)
        self.output = _Dense(mlp_dim, width)
        self.layernorm_before = nn.LayerNorm(width, eps=eps)
        self.layernorm_after = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        h = F.gelu(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.output.dense(h)


class RGBDecoder(nn.Module):
    """Four DA3 levels -> RGB of every view. See `forward`."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w, p = cfg.width, cfg.patch_size
        self.decoder_embed = nn.Linear(cfg.in_channels, w)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, w))
        # fixed, not trained; stored in checkpoints (the release's key)
        self.register_buffer("decoder_pos_embed", sincos_table(w, tuple(cfg.base_grid))[None])
        self.decoder_layers = nn.ModuleList(
            [DecoderLayer(w, cfg.heads, cfg.mlp_dim, cfg.layer_norm_eps)
             for _ in range(cfg.depth)])
        self.decoder_norm = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(w, p * p * 3)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linear weights, zero biases, CLS token N(0, 0.02^2)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.trainable_cls_token, std=0.02)

    def position_table(self, grid: tuple[int, int]) -> Tensor:
        """(1, 1 + h w, width) fp32: the CLS row and the patch table resized from base_grid to
        `grid` (bicubic, align_corners=False; at base_grid itself this is exact)."""
        table = self.decoder_pos_embed.float()
        h0, w0 = self.cfg.base_grid
        patches = table[:, 1:].reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def check_levels(self, levels: Sequence[Tensor], image_size: tuple[int, int]) -> None:
        if len(levels) != NUM_LEVELS:
            raise ValueError(f"levels: expected {NUM_LEVELS} tensors L0..L3, got {len(levels)}")
        shape = tuple(levels[0].shape)
        if len(shape) != 4:
            raise ValueError(f"levels[0]: expected (B, V, N, 2C), got shape {shape}")
        for i, lv in enumerate(levels):
            if tuple(lv.shape) != shape:
                raise ValueError(f"levels[{i}]: shape {tuple(lv.shape)} differs from levels[0] "
                                 f"{shape}")
        per_level = self.cfg.in_channels // NUM_LEVELS
        if shape[-1] != per_level:
            raise ValueError(f"levels: {shape[-1]} channels per level, the decoder expects "
                             f"{per_level} (in_channels {self.cfg.in_channels} / {NUM_LEVELS})")
        H, W = image_size
        p = self.cfg.patch_size
        if H % p or W % p or H < p or W < p:
            raise ValueError(f"image_size {tuple(image_size)}: both sides must be positive "
                             f"multiples of the patch size {p}")
        if shape[2] != (H // p) * (W // p):
            raise ValueError(f"levels: {shape[2]} tokens per view, image_size "
                             f"{tuple(image_size)} needs ({H}/{p})({W}/{p}) = "
                             f"{(H // p) * (W // p)}")

    def forward(self, levels: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
        """RGB (B, V, 3, H, W), not clamped.

        levels: 4 tensors (B, V, N, 2C), L0..L3 in DA3's form [local | LN(global)];
        image_size: (H, W), multiples of the patch size with N = (H/p)(W/p).
        """
        self.check_levels(levels, image_size)
        B, V, N, c = levels[0].shape
        H, W = image_size
        p = self.cfg.patch_size
        hp, wp = H // p, W // p
        x = torch.cat(list(levels), dim=-1)
        if self.training and self.cfg.noise_tau > 0:
            std = x.detach().float().flatten(0, 2).std(0)                    # (4 2C,)
            sigma = torch.randn(B, 1, 1, 1, device=x.device).abs() * self.cfg.noise_tau
            x = x + (sigma * std * torch.randn_like(x, dtype=torch.float32)).to(x.dtype)
        probs = self.cfg.level_dropout_probs()
        if self.training and any(probs):
            drop_p = torch.tensor(probs, device=x.device)
            keep = torch.rand(B, 1, 1, NUM_LEVELS, device=x.device) >= drop_p
            x = x * keep.to(x.dtype).repeat_interleave(c, dim=-1)
        x = self.decoder_embed(x.reshape(B * V, N, -1))
        # Under autocast, x is bf16 but the CLS token fp32: cat promotes, so the residual stream
        # is fp32 from here, as in the release (its eval decodes under bf16 autocast).
        x = torch.cat([self.trainable_cls_token.expand(B * V, -1, -1), x], dim=1)
        x = x + self.position_table((hp, wp)).to(x.dtype)
        for layer in self.decoder_layers:
            x = layer(x)
        logits = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        # unpatchify: token (i, j) holds its patch as (row q, column r, channel)
        img = logits.reshape(B * V, hp, wp, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        img = img.reshape(B, V, 3, H, W)
        # fp32 statistics: bf16 logits promote to fp32 here, as in the release
        return img * self.pixel_std + self.pixel_mean
