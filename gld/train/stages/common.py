"""What the stages share: the frozen latent space per rank, images from a batch, autocast."""
from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor

from gld.latents.space import LatentSpace, build_latent_space

__all__ = ["frozen_space", "batch_images", "autocast_for", "sources_first", "Stopwatch",
           "param_count"]


def param_count(model) -> int:
    """Parameters of `model`, whole: a ZeRO-3 partitioned parameter's tensor is empty between
    forwards, its full size is `ds_numel`."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


class Stopwatch:
    """Wall time of a block in ms, `with sw: ...` then `sw.ms`. On CUDA it synchronises before
    and after (the encoder's share of a step is reported per step; the stall this adds is one
    queue drain, small against a training step)."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, 0.0

    def __enter__(self) -> "Stopwatch":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms = 1e3 * (time.perf_counter() - self.t0)


def frozen_space(cfg, device, normalize: bool) -> LatentSpace:
    """The frozen DA3 encoder (+ statistics when `normalize`) of `cfg.latent`, on `device`:
    one copy per rank, outside the DeepSpeed engine (never sharded, never optimised). Its
    backbone runs under bf16 autocast on CUDA (DA3's own API), fp32 on the CPU."""
    latent = cfg.latent
    if not normalize and latent.normalize:
        from dataclasses import replace
        latent = replace(latent, normalize=False, stats=[])
    return build_latent_space(latent, device).eval()


def batch_images(batch: dict) -> Tensor:
    """(B, V, 3, H, W) uint8 -> float32 in [0, 1]."""
    images = batch["images"]
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast for the trainable model when training in bf16 (DeepSpeed holds its weights
    in bf16; autocast keeps fp32 inputs and the norms' fp32 maths consistent with that)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sources_first(batch: dict) -> tuple[Tensor, int]:
    """A view order per sample with its sources first (stable), so that the last view, the
    pose reference of the DiT, is a target: (order (B, V) long, smallest source count).
    The release puts sources first too (docs/release-facts.md "DiT-DH input")."""
    mask = batch["source_mask"]
    V = mask.shape[1]
    key = (~mask).long() * V + torch.arange(V, device=mask.device)
    order = key.argsort(dim=1)
    counts = mask.sum(1)
    if bool((counts >= V).any()) or bool((counts < 1).any()):
        raise ValueError(f"every sample needs 1..V-1 sources, got counts {counts.tolist()} "
                         f"of V = {V}")
    return order, int(counts.min())
