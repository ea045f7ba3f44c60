"""Building blocks of the diffusion transformer (DiT-DH, docs/release-facts.md "DiT-DH input").

Parameter names follow the release's so its state dicts load without renaming: `norm1`,
`norm2`, `attn.qkv`, `attn.proj`, `mlp.w12`, `mlp.w3`, `adaLN_modulation.1`, `t_embedder.W`,
`t_embedder.mlp.{0,2}`. Tokens are (B, L, width) with L = V x N ordered view, row, column.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.attention import PRoPECameras, attention
from kernels.prope.configs import PRoPEKernels

__all__ = ["RMSNorm", "SwiGLU", "TimestepEmbedder", "SelfAttention", "AdaLNBlock", "FinalLayer",
           "modulate", "swiglu_hidden"]


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
    """The release's SwiGLU hidden size: int(2/3 * int(width * mlp_ratio)) (2048 for 768).

    Rounded in the release's order: for some ratios int(2/3 * mlp_ratio * width) is one less
    (width 48, ratio 3.5: 111 instead of 112) and such a release file would not load.
    """
    return int(2 / 3 * int(width * mlp_ratio))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, L, W) * (1 + scale) + shift; shift/scale (B, W) per sample or (B, L, W) per token."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (eps 1e-6), weighted, cast back to the input dtype."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """w3(silu(x1) * x2) with [x1 | x2] = w12(x)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class TimestepEmbedder(nn.Module):
    """Gaussian Fourier features [sin(2 pi t W), cos(2 pi t W)] of t (B,), then an MLP.

    W (freqs,) ~ N(0, 1) is fixed at init and saved with the weights (a persistent buffer), so a
    loaded model embeds time exactly as it was trained.
    """

    def __init__(self, width: int, freqs: int = 256):
        super().__init__()
        self.register_buffer("W", torch.randn(freqs))
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        proj = 2 * math.pi * t.float()[:, None] * self.W.float()[None, :]
        emb = torch.cat([proj.sin(), proj.cos()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


@torch.compiler.disable
def _attention(q, k, v, cameras, backend, prope_kernels):
    """kernels.attention, left out of torch.compile graphs: its Triton kernels sit inside
    autograd Functions that dynamo cannot trace; a compiled block fuses everything around it."""
    return attention(q, k, v, cameras, backend=backend, prope_kernels=prope_kernels)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all views' tokens through `kernels.attention` (PRoPE when
    cameras are given). No qk-norm, as in the release."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, cameras: Optional[PRoPECameras], backend: str = "auto",
                prope_kernels: Optional[PRoPEKernels] = None) -> Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        o = _attention(q, k, v, cameras, backend, prope_kernels)      # (B, h, L, d)
        return self.proj(o.transpose(1, 2).reshape(B, L, W))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: `c` gives shift, scale and gate for the
    attention and the MLP (in that order), per sample (B, W) or per token (B, L, W)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.attention_backend = "auto"
        self.prope_kernels: Optional[PRoPEKernels] = None

    def forward(self, x: Tensor, c: Tensor, cameras: Optional[PRoPECameras]) -> Tensor:
        sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=-1)
        if gm.dim() == 2:
            gm, gf = gm.unsqueeze(1), gf.unsqueeze(1)
        h = self.attn(modulate(self.norm1(x), sm, cm), cameras, self.attention_backend,
                      self.prope_kernels)
        x = x + gm * h
        return x + gf * self.mlp(modulate(self.norm2(x), sf, cf))


class FinalLayer(nn.Module):
    """RMSNorm, per-token adaLN (shift, scale), linear to the latent channels."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
