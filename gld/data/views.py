"""Stored records -> training samples: view selection, decode, resize / crop with exact intrinsics.

`select_views` picks V frames from a window of the sequence and marks the source views;
`make_sample` decodes only those frames, resizes each so that it covers the output (H, W) and
centre-crops, updating K exactly (continuous coordinates, pixel centres at +0.5).

A sample (one dict, before batching):
    images        (V, 3, H, W) uint8 RGB
    K             (V, 3, 3) float32 pixel intrinsics at (H, W)
    c2w           (V, 4, 4) float32 OpenCV camera-to-world, as stored (no normalisation)
    source_mask   (V,) bool, True for the source (conditioning) views
    frame_indices (V,) int64 indices in the original sequence
    depth         (V, H, W) float32 planar z, 0 = unknown (only when depth is requested)
    scene_mean    (3, H, W) float32 in [0, 1], the mean of all the sequence's frames resized and
                  cropped alike (only when requested: data.eval.scene_mean, eval split)
    has_depth     bool
    scene_id      str
    sample_id     int (global record index within the epoch's dataset)
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from gld.data.config import DataConfig
from gld.data.schema import DataError, Sequence, check_cameras
from gld.geometry.cameras import crop_intrinsics, resize_intrinsics

__all__ = ["ViewSpec", "select_views", "make_sample", "resize_crop_size", "view_rng", "collate",
           "scene_mean_image"]


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn. mode "train": V random frames of a random window, 1..4 random
    sources; mode "eval": V evenly spaced frames of the centred window, `eval_sources` sources
    evenly spaced ("interpolate"), the first ones ("first") or a fixed random choice per
    sample ("fixed")."""

    num_views: int = 8
    window: int = 32
    min_sources: int = 1
    max_sources: int = 4
    mode: str = "train"
    eval_sources: int = 4
    eval_selection: str = "interpolate"
    seed: int = 0
    load_depth: bool = False
    scene_mean: bool = False

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str = "train") -> "ViewSpec":
        """The views of `split` ("train" or "eval") of a data config section."""
        views, sources = cfg.eval_views()
        return cls(num_views=cfg.num_views if split == "train" else views,
                   window=cfg.view_window, min_sources=cfg.min_sources,
                   max_sources=cfg.max_sources, mode=split, eval_sources=sources,
                   eval_selection=cfg.eval.source_selection, seed=cfg.seed,
                   load_depth=cfg.load_depth,
                   scene_mean=split == "eval" and cfg.eval.scene_mean)


def view_rng(spec: ViewSpec, epoch: int, sample_id: int) -> np.random.Generator:
    """Deterministic per (seed, epoch, sample); eval ignores the epoch."""
    if spec.mode == "eval":
        return np.random.default_rng([spec.seed, int(sample_id), 23])
    return np.random.default_rng([spec.seed, int(epoch), int(sample_id), 23])


def select_views(num_frames: int, spec: ViewSpec,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """-> (positions (V,) int64 into the sequence, increasing; source_mask (V,) bool)."""
    V = spec.num_views
    if num_frames < V:
        raise DataError(f"sequence has {num_frames} frames, fewer than num_views={V}")
    L = min(spec.window, num_frames)
    if spec.mode == "eval":
        start = (num_frames - L) // 2
        pos = np.round(np.linspace(start, start + L - 1, V)).astype(np.int64)
        ns = spec.eval_sources
        if spec.eval_selection == "interpolate":
            src = np.round(np.linspace(0, V - 1, ns)).astype(np.int64)
        elif spec.eval_selection == "first":
            src = np.arange(ns)
        else:
            src = rng.choice(V, ns, replace=False)
    else:
        start = int(rng.integers(0, num_frames - L + 1))
        pos = start + np.sort(rng.choice(L, V, replace=False)).astype(np.int64)
        ns = int(rng.integers(spec.min_sources, spec.max_sources + 1))
        src = rng.choice(V, ns, replace=False)
    mask = np.zeros(V, bool)
    mask[src] = True
    return pos, mask


def resize_crop_size(size: tuple[int, int], out: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
    """Resize (h, w) to cover (H, W) keeping the aspect, then centre crop:
    -> ((h', w') after resize, top, left)."""
    (h, w), (H, W) = size, out
    s = max(H / h, W / w)
    nh, nw = max(H, round(h * s)), max(W, round(w * s))
    return (nh, nw), (nh - H) // 2, (nw - W) // 2


def _decode(data: bytes, where: str):
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im = im.convert("RGB")  # forces the full decode: corrupt data fails here
    except Exception as e:
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    return im


def _fit(im, out: tuple[int, int]):
    """PIL image -> (image resized to cover `out` and centre-cropped, (nh, nw), top, left)."""
    from PIL import Image

    H, W = out
    (nh, nw), top, left = resize_crop_size((im.height, im.width), out)
    if (nh, nw) != (im.height, im.width):
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    return im.crop((left, top, left + W, top + H)), (nh, nw), top, left


def scene_mean_image(seq: Sequence, out: tuple[int, int], where: str) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: the mean of every frame of `seq`, each resized and cropped
    to `out` as the sample's views are."""
    acc = torch.zeros(3, *out, dtype=torch.float64)
    for f in seq.frames:
        im, _, _, _ = _fit(_decode(f.image, f"{where} (scene {seq.scene_id!r}, frame {f.index})"),
                           out)
        acc += torch.from_numpy(np.array(im)).permute(2, 0, 1)
    return (acc / (255.0 * len(seq.frames))).float()


def make_sample(seq: Sequence, positions: np.ndarray, source_mask: np.ndarray,
                out: tuple[int, int], spec: ViewSpec, where: str, sample_id: int = -1) -> dict:
    """Decode, check and resize the chosen frames of `seq` to `out` = (H, W); see the module
    docstring for the keys. Raises DataError naming `where` (shard and record) and the frame."""
    from PIL import Image

    H, W = out
    frames = [seq.frames[int(p)] for p in positions]
    sizes = getattr(seq, "image_sizes", None)
    K = np.stack([np.asarray(f.K, np.float64) for f in frames])
    c2w = np.stack([np.asarray(f.c2w, np.float64) for f in frames])
    images, Ks, depths = [], [], []
    for j, f in enumerate(frames):
        fwhere = f"{where} (scene {seq.scene_id!r}, frame {f.index})"
        im = _decode(f.image, fwhere)
        h, w = im.height, im.width
        if sizes is not None and tuple(sizes[int(positions[j])]) != (h, w):
            raise DataError(f"{fwhere}: decoded image is {h}x{w}, the record says "
                            f"{sizes[int(positions[j])]}")
        check_cameras(K[j:j + 1], c2w[j:j + 1], [(h, w)], fwhere)
        im, (nh, nw), top, left = _fit(im, out)
        images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        k = resize_intrinsics(torch.from_numpy(K[j]), (h, w), (nh, nw))
        Ks.append(crop_intrinsics(k, top, left))
        if spec.load_depth:
            if f.depth is None:
                depths.append(torch.zeros(H, W))
            else:
                d = np.asarray(f.depth, np.float32)
                if not np.isfinite(d).all():
                    raise DataError(f"{fwhere}: non-finite depth values")
                dim = Image.fromarray(d).resize((nw, nh), Image.NEAREST)
                depths.append(torch.from_numpy(np.asarray(dim)[top:top + H, left:left + W].copy()))
    sample = {
        "images": torch.stack(images),
        "K": torch.stack(Ks).float(),
        "c2w": torch.from_numpy(c2w).float(),
        "source_mask": torch.from_numpy(source_mask),
        "frame_indices": torch.tensor([f.index for f in frames], dtype=torch.int64),
        "has_depth": any(f.depth is not None for f in frames),
        "scene_id": seq.scene_id,
        "sample_id": int(sample_id),
    }
    if spec.load_depth:
        sample["depth"] = torch.stack(depths)
    if spec.scene_mean:
        sample["scene_mean"] = scene_mean_image(seq, out, where)
    return sample


def collate(samples: list[dict]) -> dict:
    """Stack samples of one resolution: tensors gain a leading B, strings become lists."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (bool, int)):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out
