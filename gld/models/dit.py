"""DiT-DH: the multi-view diffusion transformer of GLD (docs/reference.md section 2,
docs/release-facts.md "DiT-DH input").

A DiT backbone (width w0, adaLN-Zero conditioned on time) reads every view's tokens
`[source latent | x_t]` through separate source / target embedders, plus the 7-channel camera
map patch-embedded at image resolution. Its output s is combined with time (silu(t + s)) and
projected to the head width w1; the wide, shallow DDT head re-embeds the same input and runs
blocks with per-token adaLN from s, then a per-token adaLN final layer returns the velocity of
every view. Every attention layer is PRoPE over all views' tokens. A plain nn.Module: it only
predicts; activation checkpointing, compile and sharding are applied from outside.

Shapes: B batch, V views, N = (H/14)(W/14) tokens per view (row-major), C latent channels,
L = V N tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gld.configtypes import ConfigError
from gld.encoders.da3.config import PATCH_SIZE
from gld.models.cameras import (Convention, camera_map, check_camera_inputs, normalize_cameras,
                                prope_cameras)
from gld.models.layers import AdaLNBlock, FinalLayer, TimestepEmbedder
from kernels.attention import BACKENDS
from kernels.prope.configs import PRoPEKernels

__all__ = ["DiTConfig", "DiTDH", "DIT_PRESETS", "dit_preset"]


@dataclass
class DiTConfig:
    """Sizes of a DiT-DH; (backbone, head) pairs for widths, depths and heads."""

    widths: tuple[int, int] = (768, 2048)
    depths: tuple[int, int] = (28, 6)
    heads: tuple[int, int] = (16, 16)
    latent_channels: int = 1536          # 2 x the DA3 width: one level [local | current]
    mlp_ratio: float = 4.0
    time_freqs: int = 256
    camera_channels: int = 7             # [target mask, Plücker d, o x d]
    convention: Convention = "release"   # camera conventions: see gld/models/cameras.py
    camera_dropout: float = 0.1          # training: per sample, the CFG unconditional branch

    def narrow_head(self) -> Optional[str]:
        """Why this model cannot learn velocity prediction well, or None: a DDT head narrower
        than the latent cannot carry the noise of x_t (most of the velocity eps - x) to its
        output (RAE: the head width must be at least the latent's; the release: 2048 >= 1536)."""
        if self.widths[1] < self.latent_channels:
            return (f"the DDT head width {self.widths[1]} is below the latent's "
                    f"{self.latent_channels} channels: the velocity it predicts is mostly noise "
                    f"it cannot carry, so samples will be poor; use widths[1] >= "
                    f"{self.latent_channels}")
        return None

    def validate(self, key: str = "model.dit") -> None:
        for name in ("widths", "depths", "heads"):
            for i, v in enumerate(getattr(self, name)):
                if v < 1:
                    raise ConfigError(f"{key}.{name}[{i}]: must be >= 1, got {v}")
        for i, (w, h) in enumerate(zip(self.widths, self.heads)):
            if w % h or (w // h) % 8:
                raise ConfigError(f"{key}.heads[{i}]: width {w} / heads {h} must be a whole head "
                                  f"dim divisible by 8 (PRoPE), got {w / h:g}")
        if self.latent_channels < 1:
            raise ConfigError(f"{key}.latent_channels: must be >= 1, got {self.latent_channels}")
        if not 0.0 <= self.camera_dropout <= 1.0:
            raise ConfigError(f"{key}.camera_dropout: must be in [0, 1], got {self.camera_dropout}")


DIT_PRESETS = {
    "tiny": DiTConfig(widths=(64, 128), depths=(2, 1), heads=(4, 4)),
    "small": DiTConfig(widths=(384, 768), depths=(12, 2), heads=(6, 6)),
    "level1": DiTConfig(),                              # the release's level-1 model, 783M
    # the cascade's depths (481M here; the release's cascade file has one source and one target
    # embedder pair less, 473M: loading it belongs with the cascade)
    "cascade": DiTConfig(depths=(28, 2)),
}


def dit_preset(name: str, **overrides) -> DiTConfig:
    """A preset by name, with fields replaced by `overrides` (e.g. latent_channels=768)."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
    return replace(DIT_PRESETS[name], **overrides)


class TokenEmbed(nn.Module):
    """A 1x1 convolution over a view's token grid (the release's key layout `proj.weight`
    (out, in, 1, 1)), applied to tokens (..., in) as a linear map."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class CameraEmbed(nn.Module):
    """Patch embedding (kernel = stride = patch) of the camera map (B V, 7, H, W)."""

    def __init__(self, cin: int, cout: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)     # (B V, N, cout)


class DiTDH(nn.Module):
    """Predicts the flow velocity of all views. See `forward`."""

    def __init__(self, cfg: DiTConfig, patch_size: int = PATCH_SIZE):
        super().__init__()
        cfg.validate()
        self.cfg, self.patch_size = cfg, patch_size
        (w0, w1), (d0, d1), (h0, h1) = cfg.widths, cfg.depths, cfg.heads
        cin = 2 * cfg.latent_channels
        self.s_embedder_ref, self.s_embedder_tgt = TokenEmbed(cin, w0), TokenEmbed(cin, w0)
        self.x_embedder_ref, self.x_embedder_tgt = TokenEmbed(cin, w1), TokenEmbed(cin, w1)
        self.camera_embedder = CameraEmbed(cfg.camera_channels, w0, patch_size)
        self.t_embedder = TimestepEmbedder(w0, cfg.time_freqs)
        self.blocks = nn.ModuleList([AdaLNBlock(w0, h0, cfg.mlp_ratio) for _ in range(d0)]
                                    + [AdaLNBlock(w1, h1, cfg.mlp_ratio) for _ in range(d1)])
        self.s_projector = nn.Linear(w0, w1)
        self.final_layer = FinalLayer(w1, cfg.latent_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linear and embedding weights, zero biases; every adaLN modulation and
        the final linear start at zero (adaLN-Zero: each block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for mlp in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(mlp.weight, std=0.02)
        for blk in list(self.blocks) + [self.final_layer]:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)

    def set_attention_backend(self, backend: str = "auto",
                              prope_kernels: Optional[PRoPEKernels] = None) -> "DiTDH":
        """Which `kernels.attention` backend (and which fused PRoPE kernels) every block uses;
        "auto" and None follow the kernels' own policy."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}; choose one of {BACKENDS}")
        for blk in self.blocks:
            blk.attention_backend, blk.prope_kernels = backend, prope_kernels
        return self

    def forward(self, x_t: Tensor, t: Tensor, *, source: Tensor, is_src: Tensor, c2w: Tensor,
                K: Tensor, image_size: tuple[int, int],
                drop_camera: Optional[Tensor] = None) -> Tensor:
        """Velocity (B, V, N, C) of every view.

        x_t, source: (B, V, N, C) normalised latent tokens (source zero where not a source);
        t: (B,) time after the shift; is_src: (B, V) bool, any views but the last;
        c2w: (B, V, 4, 4) OpenCV camera-to-world in any frame and scale; K: (B, V, 3, 3) pixel
        intrinsics for image_size (H, W); drop_camera: None or (B,) bool, the samples whose
        cameras are dropped (CFG's unconditional branch). In training mode with drop_camera
        None, each sample is dropped with probability cfg.camera_dropout.
        """
        B, V, N, C = x_t.shape
        H, W = image_size
        p = self.patch_size
        if H % p or W % p or N != (H // p) * (W // p):
            raise ValueError(f"image_size {image_size} must be multiples of {p} with "
                             f"(H/{p})(W/{p}) = N = {N} tokens per view")
        if source.shape != x_t.shape or C != self.cfg.latent_channels:
            raise ValueError(f"x_t and source must both be (B, V, N, {self.cfg.latent_channels}),"
                             f" got {tuple(x_t.shape)} and {tuple(source.shape)}")
        if t.shape != (B,):
            raise ValueError(f"t must be (B,) = ({B},), got {tuple(t.shape)}")
        check_camera_inputs(c2w, K, is_src)
        if drop_camera is None and self.training and self.cfg.camera_dropout > 0:
            drop_camera = torch.rand(B, device=x_t.device) < self.cfg.camera_dropout
        conv = self.cfg.convention
        # camera geometry in fp32 also under autocast (matmuls would otherwise run in bf16)
        with torch.autocast(x_t.device.type, enabled=False):
            c2w_n = normalize_cameras(c2w.float(), conv)
            cams = prope_cameras(c2w_n, K.float(), (H // p, W // p), image_size, conv,
                                 drop_camera)
            cam_map = camera_map(c2w_n, K.float(), is_src, image_size, conv, drop_camera)

        inp = torch.cat([source, x_t], dim=-1)
        src = is_src[:, :, None, None]
        w_dtype = self.s_embedder_ref.proj.weight.dtype
        # Both embedders run on every view and `where` picks per view: static shapes for compile
        # and any is_src pattern, at the cost of two 1x1 embeddings (< 1% of the model's FLOPs).
        s = torch.where(src, self.s_embedder_ref(inp), self.s_embedder_tgt(inp))
        s = s + self.camera_embedder(cam_map.flatten(0, 1).to(w_dtype)).view(B, V, N, -1)
        s = s.flatten(1, 2)
        temb = self.t_embedder(t)
        c = F.silu(temb)
        d0 = self.cfg.depths[0]
        for blk in self.blocks[:d0]:
            s = blk(s, c, cams)
        s = self.s_projector(F.silu(temb[:, None] + s))
        x = torch.where(src, self.x_embedder_ref(inp), self.x_embedder_tgt(inp)).flatten(1, 2)
        for blk in self.blocks[d0:]:
            x = blk(x, s, cams)
        return self.final_layer(x, s).view(B, V, N, C)
