"""Novel-view evaluation of a pipeline on held-out view sets (the eval split of the stream).

For every view set: its source views (the split's fixed choice) go through `NVSPipeline`, which
generates the other views; scores are averaged over all generated target images:
- `generated`: PSNR, SSIM, LPIPS (when its backbone is cached) against the real targets;
- `scene_mean`: the same scores for the scene's mean image (all frames of the held-out
  sequence; when the batches carry it, `data.eval.scene_mean`) standing in for every target: a
  prediction that knows the scene's colours but not the target camera, "better than nothing";
- `mean_image`: the same for the view set's mean image (its few views, the targets themselves
  weighing 1/V each: a stricter baseline than the scene's, and one that blur favours under PSNR);
- `nearest_source`: each target replaced by the source view whose camera centre is nearest
  (what a model that only copies its input would score);
- `reconstruction`: the targets' own encoded levels through the decoder (level 0 absent as in
  the pipeline): the decoder's ceiling for the generated views;
- `depth_generated` / `depth_encoded`: DA3's depth of the generated targets and of the real
  targets against the exact depth (scale-aligned per image, `align`), when the batch has depth.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor

from gld.encoders.da3 import Level
from gld.eval.images import depth_to_color, make_grid, to_uint8
from gld.eval.metrics import (LPIPSMetric, depth_metrics, lpips_unavailable_reason,
                              mean_image_baseline, psnr, ssim)

__all__ = ["evaluate_nvs"]


def _split(batch: dict) -> tuple[Tensor, Tensor]:
    mask = batch["source_mask"]
    counts = mask.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"eval batch: every view set needs the same number of sources, got "
                         f"{counts.tolist()} (set data.eval.num_sources)")
    order = ((~mask).long() * mask.shape[1] + torch.arange(mask.shape[1])).argsort(1)
    S = int(counts[0])
    return order[:, :S], order[:, S:]


def _take(x: Tensor, idx: Tensor) -> Tensor:
    return torch.stack([x[b, idx[b]] for b in range(x.shape[0])])


@torch.no_grad()
def _reconstruct(pipe, images: Tensor, S: int) -> Tensor:
    """The targets decoded from their own encoded levels (level < boundary absent)."""
    space = pipe.space
    levels = space.encoder.encode(images, form="decoder")
    b = space.boundary_level
    feats = [torch.zeros_like(lv.features) if i < b else lv.features
             for i, lv in enumerate(levels)]
    dev = images.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = pipe.decoder([f[:, S:] for f in feats], tuple(images.shape[-2:]))
    return out.float().clamp(0, 1)


@torch.no_grad()
def _encoded_depth(pipe, images: Tensor) -> Tensor:
    space = pipe.space
    levels = space.encoder.encode(images, form="decoder")
    b = space.boundary_level
    levels = [Level(torch.zeros_like(lv.features), lv.cam_token, lv.grid) if i < b else lv
              for i, lv in enumerate(levels)]
    return space.encoder.geometry(levels, tuple(images.shape[-2:]))["depth"]


def _nearest_source(images: Tensor, c2w: Tensor, S: int) -> Tensor:
    """(B, T, 3, H, W): for every target the source whose camera centre is nearest."""
    centres = c2w[..., :3, 3]
    d = torch.cdist(centres[:, S:], centres[:, :S])                 # (B, T, S)
    return _take(images[:, :S], d.argmin(-1))


def _scores(pred: Tensor, gt: Tensor, lpips: Optional[LPIPSMetric]) -> dict[str, list]:
    out = {"psnr": psnr(pred, gt).flatten().tolist(), "ssim": ssim(pred, gt).flatten().tolist()}
    if lpips is not None:
        out["lpips"] = lpips(pred, gt).flatten().tolist()
    return out


def evaluate_nvs(pipe, batches: Iterable[dict], max_batches: int, *, lpips_net: str = "alex",
                 depth_align: str = "median", seed: int = 0, device=None
                 ) -> tuple[dict, Optional[np.ndarray]]:
    """-> (metrics, grid): metrics {"generated"|"scene_mean"|"mean_image"|"nearest_source"|
    "reconstruction":
    {"psnr", "ssim", "lpips"} (scene_mean None without it in the batches),
    "depth_generated"|"depth_encoded": depth_metrics keys, "view_sets", "targets", "unavailable":
    {path: reason}}; grid (uint8) of the first view set: sources | generated |
    ground truth | mean image | DA3 depth of the generated views."""
    device = device or next(pipe.parameters()).device
    reason = lpips_unavailable_reason(lpips_net)
    lpips = LPIPSMetric(lpips_net) if reason is None else None
    acc: dict[str, dict[str, list]] = {"generated": {}, "scene_mean": {}, "mean_image": {},
                                       "nearest_source": {}, "reconstruction": {}}
    depth_rows: dict[str, list[dict]] = {"depth_generated": [], "depth_encoded": []}
    grid, sets = None, 0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        images = batch["images"].float().div(255).to(device)
        src, tgt = _split(batch)
        S = src.shape[1]
        order = torch.cat([src, tgt], 1)
        images, K, c2w = (_take(batch[k].float().to(device) if k != "images" else images, order)
                          for k in ("images", "K", "c2w"))
        out = pipe(images[:, :S], K[:, :S], c2w[:, :S], K[:, S:], c2w[:, S:], seed=seed + i)
        gt = images[:, S:]
        mean = mean_image_baseline(images)[:, None].expand_as(gt)
        recon = _reconstruct(pipe, images, S)
        preds = [("generated", out.images), ("mean_image", mean),
                 ("nearest_source", _nearest_source(images, c2w, S)), ("reconstruction", recon)]
        if "scene_mean" in batch:
            preds.append(("scene_mean", batch["scene_mean"].float().to(device)[:, None]
                          .expand_as(gt)))
        for name, pred in preds:
            for k, v in _scores(pred, gt, lpips).items():
                acc[name].setdefault(k, []).extend(v)
        if "depth" in batch and bool(batch["has_depth"].all()):
            true = _take(batch["depth"].float().to(device), order)[:, S:]
            depth_rows["depth_generated"].append(depth_metrics(out.depth[:, S:], true,
                                                               align=depth_align))
            depth_rows["depth_encoded"].append(depth_metrics(_encoded_depth(pipe, images)[:, S:],
                                                             true, align=depth_align))
        sets += images.shape[0]
        if grid is None:
            rows = [[to_uint8(x) for x in images[0, :S].cpu()],
                    [to_uint8(x) for x in out.images[0].cpu()],
                    [to_uint8(x) for x in gt[0].cpu()],
                    [to_uint8(mean[0, 0].cpu())],
                    [depth_to_color(d) for d in out.depth[0, S:].cpu().numpy()]]
            grid = make_grid(rows, labels=["sources", "generated", "ground truth", "mean image",
                                           "DA3 depth (generated)"])
    if not acc["scene_mean"]:
        del acc["scene_mean"]
    metrics: dict = {name: {k: float(np.mean(v)) for k, v in d.items()}
                     for name, d in acc.items()}
    unavailable = {}
    if "scene_mean" not in metrics:
        metrics["scene_mean"] = None
        unavailable["scene_mean"] = "the eval batches carry no scene mean (data.eval.scene_mean)"
    if lpips is None:
        for name in acc:
            metrics[name]["lpips"] = None
            unavailable[f"{name}.lpips"] = reason
    for name, rows in depth_rows.items():
        if rows:
            metrics[name] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        else:
            metrics[name] = None
            unavailable[name] = "the eval batches carry no depth (data.load_depth)"
    metrics.update(view_sets=sets, targets=len(acc["generated"].get("psnr", [])),
                   unavailable=unavailable)
    return metrics, grid
