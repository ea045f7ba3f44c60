"""What the training-step benchmark of DiT-DH measures with: model FLOPs counted as the release
anchor counts them (docs/gpu.md), and random inputs of a training batch.

FLOPs of one training sample: 6 x parameters x tokens (forward and backward of every weight)
+ 3 x sum over attention layers of 4 x heads x L^2 x head dim (forward QK^T and PV, backward
twice that), L = views x tokens per view. 92.3 TFLOP for the level-1 model at 8 x 504x504.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gld.models.dit import DiTDH

__all__ = ["train_flops_per_sample", "random_batch"]


def train_flops_per_sample(model: DiTDH, views: int, tokens_per_view: int,
                           params: int | None = None) -> float:
    """params: the model's parameter count when its tensors do not hold it (sharded)."""
    cfg = model.cfg
    L = views * tokens_per_view
    params = sum(p.numel() for p in model.parameters()) if params is None else params
    attn = sum(depth * 4 * heads * L * L * (width // heads)
               for width, depth, heads in zip(cfg.widths, cfg.depths, cfg.heads))
    return 6.0 * params * L + 3.0 * attn


def random_batch(model: DiTDH, batch: int, views: int, image_size: tuple[int, int],
                 sources: int = 4, device="cuda", seed: int = 0) -> dict[str, Tensor]:
    """Latents x (B, V, N, C), noise, t (B,), sources masked by is_src (the first `sources`
    views), plausible cameras: what a diffusion training step consumes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, W = image_size
    p = model.patch_size
    N, C = (H // p) * (W // p), model.cfg.latent_channels
    x = torch.randn(batch, views, N, C, generator=g)
    is_src = torch.zeros(batch, views, dtype=torch.bool)
    is_src[:, :sources] = True
    angle = torch.linspace(0, 1, views)
    c2w = torch.eye(4).repeat(batch, views, 1, 1)
    c2w[..., 0, 0], c2w[..., 0, 2] = angle.cos(), angle.sin()
    c2w[..., 2, 0], c2w[..., 2, 2] = -angle.sin(), angle.cos()
    c2w[..., :3, 3] = torch.randn(batch, views, 3, generator=g)
    K = torch.tensor([[0.9 * W, 0, W / 2], [0, 0.9 * W, H / 2], [0, 0, 1]]).repeat(batch, views,
                                                                                   1, 1)
    out = dict(x=x, eps=torch.randn(x.shape, generator=g), t=torch.rand(batch, generator=g),
               source=x * is_src[:, :, None, None], is_src=is_src, c2w=c2w, K=K)
    return {k: v.to(device) for k, v in out.items()}
