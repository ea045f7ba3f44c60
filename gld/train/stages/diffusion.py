"""The diffusion stage: DiT-DH on the boundary level (any of 0..3) by flow matching.

Per batch, as the release trains (docs/release-facts.md "DiT-DH input", "Flow matching"):
1. views are reordered sources first (stable), so the last view, the DiT's pose reference, is
   a target;
2. the frozen encoder (one copy per rank, bf16 on GPU) encodes ALL views together -> x (the
   clean latent of every view, normalised with the statistics of `latent.stats`), and the
   SOURCES alone (one pass per source count present in the batch) -> the `source` half of the
   input, zeros for targets;
3. t ~ `diffusion.time_dist` then shifted by the run's time shift (resolved once, stored in
   every checkpoint and export), one t per sample; x_t = (1 - t) x + t eps;
4. loss: MSE between the predicted and the true velocity eps - x over all views
   (`diffusion.loss_views: all`, the release) or the targets only.
Camera dropout (CFG's unconditional branch) is the DiT's own training-mode behaviour.

A batch of a latent cache (gld/train/latent_cache.py, `train.latent_cache`) already carries the
result of steps 1-2 (x, source, is_src, c2w, K, image_size; no images): `inputs` passes it
through (x and source as float32), encode_ms 0.
"""
from __future__ import annotations

from typing import Optional

import logging

import torch
from torch import Tensor, nn

from gld.diffusion import flow_loss, interpolate, resolve_time_shift, sample_times
from gld.encoders.da3 import PATCH_SIZE
from gld.models import DiTDH
from gld.models.layers import AdaLNBlock
from gld.models.measure import train_flops_per_sample
from gld.train.stages.common import (Stopwatch, autocast_for, batch_images, frozen_space,
                                     param_count, sources_first)

__all__ = ["DiffusionStage"]

log = logging.getLogger(__name__)


def _gather_views(x: Tensor, order: Tensor) -> Tensor:
    """x (B, V, ...) reordered per sample by order (B, V)."""
    idx = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    return x.gather(1, idx)


class DiffusionStage:
    """`gld.train.trainer.Stage` of the DiT-DH. cfg: the resolved `gld.config.Config`;
    decoder: an optional trained RGB decoder used only for the sample grids."""

    name = "diffusion"
    checkpoint_modules = [AdaLNBlock]

    def __init__(self, cfg, device="cpu", decoder: Optional[nn.Module] = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.space = frozen_space(cfg, self.device, normalize=cfg.latent.normalize)
        dit_cfg = cfg.model.dit_config(cfg.level_channels)
        why = dit_cfg.narrow_head()
        if why:
            log.warning("model.dit: %s", why)
        self.model: nn.Module = DiTDH(dit_cfg)
        H, W = cfg.data.resolutions[0]
        tokens = (H // PATCH_SIZE) * (W // PATCH_SIZE)
        self.time_shift = resolve_time_shift(cfg.diffusion,
                                             cfg.level_channels * tokens * cfg.data.num_views)
        self.decoder = decoder

    def to(self, device) -> "DiffusionStage":
        self.device = torch.device(device)
        self.space.to(self.device)
        if self.decoder is not None:
            self.decoder.to(self.device)
        return self

    def state(self) -> dict:
        """What a checkpoint and an export must carry besides the weights."""
        return {"time_shift": self.time_shift}

    # -- inputs ------------------------------------------------------------------------------
    @torch.no_grad()
    def inputs(self, batch: dict) -> dict:
        """Batch -> the DiT's inputs and the clean latents: x (B, V, N, C), source, is_src
        (B, V), c2w, K, image_size, all views ordered sources first. A cached batch (it carries
        x) is returned as it is, its latents as float32."""
        if "x" in batch:
            return dict(x=batch["x"].float(), source=batch["source"].float(),
                        is_src=batch["is_src"].bool(), c2w=batch["c2w"].float(),
                        K=batch["K"].float(), image_size=tuple(int(s) for s in
                                                               batch["image_size"]),
                        encode_ms=0.0)
        order, _ = sources_first(batch)
        images = _gather_views(batch_images(batch), order)
        is_src = _gather_views(batch["source_mask"], order)
        c2w = _gather_views(batch["c2w"].float(), order)
        K = _gather_views(batch["K"].float(), order)
        with Stopwatch(images.device) as sw:
            x = self.space.encode(images).z.float()
            source = torch.zeros_like(x)
            counts = is_src.sum(1)
            for s in counts.unique().tolist():
                rows = (counts == s).nonzero().flatten()
                source[rows, :s] = self.space.encode(images[rows, :s]).z.float()
        return dict(x=x, source=source, is_src=is_src, c2w=c2w, K=K,
                    image_size=tuple(images.shape[-2:]), encode_ms=sw.ms)

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[Tensor, dict]:
        inp = self.inputs(batch)
        x = inp["x"]
        B = x.shape[0]
        t = sample_times(B, self.cfg.diffusion, self.time_shift, device=x.device)
        eps = torch.randn_like(x)
        x_t = interpolate(x, eps, t)
        with autocast_for(self.cfg.train.precision, x.device):
            pred = model(x_t, t, source=inp["source"], is_src=inp["is_src"], c2w=inp["c2w"],
                         K=inp["K"], image_size=inp["image_size"])
        mask = None if self.cfg.diffusion.loss_views == "all" else ~inp["is_src"]
        loss = flow_loss(pred, x, eps, mask)
        return loss, {"t_mean": t.mean().detach(), "encode_ms": inp["encode_ms"]}

    @staticmethod
    def _shape(batch: dict) -> tuple[int, int, int]:
        """(B, V, tokens per view) of an image batch or a cached one (x: (B, V, N, C))."""
        if "x" in batch:
            B, V, N = batch["x"].shape[:3]
            return int(B), int(V), int(N)
        B, V, _, H, W = batch["images"].shape
        return int(B), int(V), (H // PATCH_SIZE) * (W // PATCH_SIZE)

    def samples_in(self, batch: dict) -> int:
        return self._shape(batch)[0]

    def tokens_in(self, batch: dict) -> int:
        B, V, N = self._shape(batch)
        return B * V * N

    def flops_per_sample(self, batch: dict) -> Optional[float]:
        _, V, N = self._shape(batch)
        return train_flops_per_sample(self.model, V, N, params=param_count(self.model))

    # -- sample grids --------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, model: nn.Module, batch: dict, step: int, out_dir) -> Optional[str]:
        """Rows: sources | generated | ground truth (decoded when a decoder is given) | DA3 depth
        of the generated views, for the first sample of the batch (all ranks run the model,
        rank 0 writes). None for a cached batch (no images to show)."""
        if "images" not in batch:
            if not getattr(self, "_warned_grid", False):
                log.warning("train.sample_every: no sample grids from a latent cache (its "
                            "batches carry no images)")
                self._warned_grid = True
            return None
        import torch.distributed as dist

        from gld.diffusion.sampler import initial_noise, sample
        from gld.encoders.da3 import Level
        from gld.eval.images import depth_to_color, make_grid, save_png, to_uint8

        one = {k: (v[:1] if isinstance(v, Tensor) else v) for k, v in batch.items()}
        inp = self.inputs(one)
        S = int(inp["is_src"][0].sum())
        H, W = inp["image_size"]
        prec = self.cfg.train.precision

        def denoiser(x, t, drop):
            rep = x.shape[0]
            kw = {k: inp[k].expand(rep, *inp[k].shape[1:]) for k in ("source", "is_src", "c2w",
                                                                       "K")}
            with autocast_for(prec, x.device):
                return model(x, t, image_size=(H, W), drop_camera=drop, **kw).float()

        was = model.training
        model.eval()
        z = sample(denoiser, initial_noise(tuple(inp["x"].shape), seed=step,
                                        device=inp["x"].device),
                   self.time_shift, self.cfg.diffusion.sampler)
        model.train(was)
        z[:, :S] = inp["source"][:, :S]
        order, _ = sources_first(one)
        lat = self.space.encode(_gather_views(batch_images(one), order))
        gen = lat._replace(z=z, cam_token=lat.cam_token[:, :1].expand_as(lat.cam_token))
        raw = self.space.raw_level(gen)
        levels = ([Level(torch.zeros_like(raw.features), raw.cam_token, raw.grid)] * gen.level
                  + [self.space.encoder.decoder_form(raw)]
                  + [self.space.encoder.decoder_form(lv)
                     for lv in self.space.propagate(gen, via="current")])
        depth = self.space.encoder.geometry(levels, (H, W))["depth"][0]
        images = _gather_views(batch_images(one), order)[0]
        rows = [[to_uint8(x) for x in images[:S].cpu()]]
        labels = ["sources"]
        if self.decoder is not None:
            self.decoder.eval()
            rgb = self.decoder([lv.features[:, S:].float() for lv in levels], (H, W))
            rows.append([to_uint8(x) for x in rgb[0].clamp(0, 1).cpu()])
            labels.append("generated")
        rows.append([to_uint8(x) for x in images[S:].cpu()])
        labels.append("ground truth")
        rows.append([depth_to_color(d) for d in depth[S:].cpu().numpy()])
        labels.append("DA3 depth of generated")
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        from pathlib import Path
        path = Path(out_dir) / "samples" / f"diffusion_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_png(make_grid(rows, labels=labels), path)

