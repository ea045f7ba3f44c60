"""Measuring DA3: FLOP counts, reproducible random weights, the entry points a benchmark times.

    calls = encoder_calls(model, (H, W), amp=torch.bfloat16)   # name -> fn(*tensors)
    calls["encode"](images); calls["propagate 1->3"](features, cam_token)
    flop = backbone_flops(model.config, views=8, height=504, width=504)

`launch/bench_encoder.py` and the tests use these; nothing here touches files or devices beyond
the model's own.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from gld.encoders.da3.backbone import Level
from gld.encoders.da3.config import PATCH_SIZE, DA3Config
from gld.encoders.da3.cuda_graph import GraphedCall
from gld.encoders.da3.model import DA3

__all__ = ["backbone_flops", "head_flops", "randomize_", "encoder_calls", "compile_blocks"]


def backbone_flops(cfg: DA3Config, views: int, height: int, width: int, batch: int = 1) -> float:
    """Floating-point operations of one backbone call (a multiply-add counts 2).

    Per block over the T = batch * views * (1 + N) tokens (N = (H/14) (W/14)): 24 T C^2 for
    qkv (6), proj (2) and the 4C MLP (16); attention 4 n^2 C per sequence of n tokens (q k^T and
    p v), n = 1 + N per view in local blocks, V (1 + N) in global ones; plus the patch embedding,
    2 N C 3 14^2 per image.
    """
    n = 1 + (height // PATCH_SIZE) * (width // PATCH_SIZE)
    C = cfg.dim
    linear = 24 * batch * views * n * C * C * cfg.depth
    attn = sum(4 * batch * (views * n) ** 2 * C if cfg.is_global(i) else 4 * batch * views * n * n * C
               for i in range(cfg.depth))
    patch = 2 * batch * views * (n - 1) * C * 3 * PATCH_SIZE ** 2
    return float(linear + attn + patch)


def head_flops(model: DA3, levels: Sequence[Level], image_size: Sequence[int]) -> float:
    """Floating-point operations of `model.geometry(levels, image_size)` (DualDPT and camera
    decoder), counted by running it under torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.geometry(levels, image_size)
    return float(counter.get_total_flops())


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random and reproducible, in place; returns the module.

    Scales keep activations of order one so that a test or benchmark on random weights sees
    realistic numerics, and no tensor is left at a value (0, 1) that would hide a swapped or
    ignored weight: norm and LayerScale weights 1 + 0.2 r, other vectors (biases) 0.05 r,
    position table and learned tokens 0.5 r, matrices r / sqrt(fan_in). Works on the official
    network too (same parameter names), so both can be given the same rule.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g).to(p.device)
            if p.dim() == 1 and name.endswith(("weight", "gamma")) and (
                    "norm" in name or "ls" in name or "gamma" in name):
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.05 * r)
            elif name.endswith(("pos_embed", "cls_token", "camera_token")):
                p.copy_(0.5 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    return module


def encoder_calls(model: DA3, image_size: Sequence[int], amp=torch.bfloat16,
                  graph_examples: Optional[dict[str, tuple[Tensor, ...]]] = None
                  ) -> dict[str, Callable[..., object]]:
    """The three timed entry points, each fn(*tensors):

    "encode": images (B, V, 3, H, W) -> levels; "encode+heads": images -> geometry dict;
    "propagate 1->3": level-1 (features, cam_token) -> levels 2, 3.
    With `graph_examples` (name -> example inputs on CUDA) each call named there is replaced by
    its `GraphedCall` (outputs overwritten by the next replay).
    """
    H, W = int(image_size[0]), int(image_size[1])
    grid = (H // PATCH_SIZE, W // PATCH_SIZE)
    calls = {
        "encode": lambda x: model.encode(x, amp=amp),
        "encode+heads": lambda x: model.geometry(model.encode(x, amp=amp), (H, W)),
        "propagate 1->3": lambda f, c: model.propagate(Level(f, c, grid), 1, amp=amp),
    }
    for name, example in (graph_examples or {}).items():
        calls[name] = GraphedCall(calls[name], *example)
    return calls


def compile_blocks(model: DA3, enabled: bool) -> None:
    """torch.compile each backbone block in place (the model stays a plain module), or undo it.

    `nn.Module.compile` keeps the compiled callable in `_compiled_call_impl` and offers no
    public undo; clearing it restores the eager call.
    """
    for blk in model.backbone.blocks:
        if enabled:
            blk.compile()
        else:
            blk._compiled_call_impl = None
