"""Stage 1: the RGB decoder from the frozen DA3's four levels (docs/release-facts.md "RGB
decoder"). A batch's views are encoded all together (DA3's global attention sees the view set,
as at sampling time) into the four levels in DA3's own form `[local | LN(global)]`, the form the
pipeline feeds; the decoder (level dropout in training mode) reconstructs every view; the loss
is `DecoderLoss` (L1 + LPIPS) against the input images.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from gld.encoders.da3 import PATCH_SIZE
from gld.models import DecoderLoss, RGBDecoder
from gld.models.decoder import DecoderLayer
from gld.train.stages.common import (Stopwatch, autocast_for, batch_images, frozen_space,
                                     param_count)

__all__ = ["DecoderStage"]


class DecoderStage:
    """`gld.train.trainer.Stage` of the RGB decoder. cfg: the resolved `gld.config.Config`."""

    name = "decoder"
    checkpoint_modules = [DecoderLayer]

    def __init__(self, cfg, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.space = frozen_space(cfg, self.device, normalize=False)
        self.model: nn.Module = RGBDecoder(cfg.model.decoder_config(cfg.level_channels))
        self.loss_fn = DecoderLoss(cfg.loss.decoder)

    def to(self, device) -> "DecoderStage":
        self.device = torch.device(device)
        self.space.to(self.device)
        return self

    def levels(self, images: Tensor) -> list[Tensor]:
        """(B, V, 3, H, W) in [0, 1] -> the 4 levels (B, V, N, 2C), decoder form, no grad."""
        return [lv.features for lv in self.space.encoder.encode(images, form="decoder")]

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[Tensor, dict]:
        images = batch_images(batch)
        H, W = images.shape[-2:]
        with Stopwatch(images.device) as sw:
            levels = self.levels(images)
        with autocast_for(self.cfg.train.precision, images.device):
            pred = model(levels, (H, W))
        total, parts = self.loss_fn(pred, images)
        return total, {**{k: v for k, v in parts.items() if k != "total"}, "encode_ms": sw.ms}

    def samples_in(self, batch: dict) -> int:
        return int(batch["images"].shape[0])

    def tokens_in(self, batch: dict) -> int:
        B, V, _, H, W = batch["images"].shape
        return B * V * (H // PATCH_SIZE) * (W // PATCH_SIZE)

    def flops_per_sample(self, batch: dict) -> Optional[float]:
        """6 x parameters x tokens + attention (forward + backward), per view set."""
        _, V, _, H, W = batch["images"].shape
        n = (H // PATCH_SIZE) * (W // PATCH_SIZE) + 1
        c = self.model.cfg
        params = param_count(self.model)
        return V * (6.0 * params * n + 3.0 * c.depth * 4 * n * n * c.width)

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, batch: dict, step: int, out_dir) -> Optional[str]:
        """Rows: input views | reconstructions of the first sample (rank 0 writes)."""
        import torch.distributed as dist

        from gld.eval.images import make_grid, save_png, to_uint8

        images = batch_images(batch)[:1]
        was = model.training
        model.eval()
        with autocast_for(self.cfg.train.precision, images.device):
            pred = model(self.levels(images), tuple(images.shape[-2:])).float().clamp(0, 1)
        model.train(was)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        rows = [[to_uint8(x) for x in images[0].cpu()], [to_uint8(x) for x in pred[0].cpu()]]
        from pathlib import Path
        path = Path(out_dir) / "samples" / f"decoder_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_png(make_grid(rows, labels=["input", "decoded"]), path)
