"""A tiny training stage for the trainer tests: regress each view's mean colour from its
pixels, pooled to 7x7.

Model: (B*V, 3*7*7) -> Linear(147, 32) x scale -> 2 x TinyBlock -> Linear(32, 3). TinyBlock holds a
parameter of its own (`gain`) besides its sub-layers, so activation checkpointing under ZeRO-3
must gather a block's direct parameters too. `nan_step` / `nan_rank`: the loss is NaN at that
optimizer step (on that rank only, or every rank when nan_rank is None). `seen` records
(step, sample ids) of every micro-batch (the data-position checks). `sample_grid` writes
<out_dir>/samples/step_<k>.json (the trainer's sample hook).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gain = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        return x + self.gain * self.fc2(F.gelu(self.fc1(x)))


class TinyNet(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        # one element, registered first: without ZeRO's per-parameter alignment every later
        # parameter of its optimizer group (no weight decay) would sit 4 bytes off 16
        self.scale = nn.Parameter(torch.ones(1))
        self.inp = nn.Linear(3 * 7 * 7, dim)
        self.blocks = nn.ModuleList([TinyBlock(dim), TinyBlock(dim)])
        self.out = nn.Linear(dim, 3)

    def forward(self, x):  # x (N, 147) -> (N, 3)
        h = self.inp(x) * self.scale
        for blk in self.blocks:
            h = blk(h)
        return self.out(h)


def _inputs(batch) -> tuple[torch.Tensor, torch.Tensor]:
    images = batch["images"].float() / 255  # (B, V, 3, H, W)
    B, V = images.shape[:2]
    x = images.flatten(0, 1)
    target = x.mean(dim=(2, 3))  # (B*V, 3)
    pooled = F.adaptive_avg_pool2d(x, 7).flatten(1)  # (B*V, 147)
    return pooled, target


class TinyStage:
    name = "tiny"
    checkpoint_modules = [TinyBlock]

    def __init__(self, nan_step: Optional[int] = None, nan_rank: Optional[int] = None):
        self.model = TinyNet()
        self.nan_step, self.nan_rank = nan_step, nan_rank
        self.seen: list = []

    def to(self, device):
        return self

    def loss(self, model, batch, step):
        x, target = _inputs(batch)
        pred = model(x.to(next(model.parameters()).dtype)).float()
        loss = F.mse_loss(pred, target)
        self.seen.append((step, batch["sample_id"].tolist()))
        rank = int(os.environ.get("RANK", 0))
        if step == self.nan_step and (self.nan_rank is None or rank == self.nan_rank):
            loss = loss * float("nan")
        return loss, {"pred_mean": pred.detach().mean()}

    def sample_grid(self, model, batch, step, out_dir):
        """The optional hook (train.sample_every): a forward on every rank (ZeRO-3 gathers),
        a file from rank 0."""
        x, _ = _inputs(batch)
        with torch.no_grad():
            pred = model(x.to(next(model.parameters()).dtype)).float()
        if int(os.environ.get("RANK", 0)) == 0:
            folder = Path(out_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"step_{step}.json").write_text(json.dumps(pred.mean().item()))

    def samples_in(self, batch):
        return batch["images"].shape[0]

    def tokens_in(self, batch):
        return batch["images"].shape[0] * batch["images"].shape[1]

    def flops_per_sample(self, batch):
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        return 6.0 * n * batch["images"].shape[1]
