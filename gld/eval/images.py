"""Images for people: uint8 conversion, colour-mapped depth, tiled grids, atomic PNG / npy files.

Everything here is numpy (H, W, 3) uint8 on the way out; inputs may be torch tensors or numpy
arrays. No matplotlib: the turbo colour map is a 33-knot piecewise-linear table sampled every 8
entries from Google's Turbo (Apache-2.0; within 2.2 / 255 of the full 256-entry table).

Raw depth is saved as float32 `.npy` only: it is exact and unit-free, and DA3's depth of
generated views is up to scale, so fixed-point millimetres (16-bit PNG) would claim a unit the
numbers do not have and clip far or tiny depths.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["to_uint8", "depth_to_color", "turbo", "make_grid", "save_png", "save_depth_raw",
           "write_atomic"]

_TURBO_KNOTS = np.array([
    [48, 18, 59], [57, 42, 115], [64, 64, 162], [68, 86, 199], [70, 107, 227], [70, 128, 246],
    [66, 148, 255], [55, 168, 250], [40, 188, 235], [28, 205, 216], [24, 221, 194],
    [31, 233, 175], [50, 242, 152], [78, 249, 125], [109, 254, 98], [139, 255, 75],
    [164, 252, 60], [185, 246, 53], [205, 236, 52], [223, 223, 55], [238, 207, 58],
    [248, 190, 57], [253, 172, 52], [254, 150, 43], [251, 126, 33], [244, 102, 23],
    [235, 80, 14], [223, 63, 8], [208, 47, 5], [190, 33, 2], [169, 22, 1], [146, 11, 1],
    [122, 4, 3]], dtype=np.float64)
_TURBO_AT = np.r_[np.arange(0, 256, 8), 255] / 255.0   # where each knot sits in [0, 1]


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):                           # a torch tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def to_uint8(img, channels_first: bool | None = None) -> np.ndarray:
    """(3, H, W) or (H, W, 3) float in [0, 1] (clipped; uint8 passes through) -> (H, W, 3)
    uint8, rounded to nearest. channels_first=None infers the layout from where the 3 is and
    refuses a shape with 3 at both ends."""
    a = _numpy(img)
    if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
        raise ValueError(f"to_uint8: expected an RGB image (3, H, W) or (H, W, 3), got shape "
                         f"{a.shape}")
    if channels_first is None:
        if a.shape[0] == 3 and a.shape[-1] == 3:
            raise ValueError(f"to_uint8: shape {a.shape} is ambiguous; pass channels_first")
        channels_first = a.shape[0] == 3
    if channels_first:
        a = a.transpose(1, 2, 0)
    if a.shape[-1] != 3:
        raise ValueError(f"to_uint8: expected 3 channels, got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return np.round(np.clip(a.astype(np.float64), 0, 1) * 255).astype(np.uint8)


def turbo(x) -> np.ndarray:
    """Turbo colours of values x (any shape) in [0, 1] (clipped) -> (*x.shape, 3) uint8."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)
    rgb = [np.interp(x, _TURBO_AT, _TURBO_KNOTS[:, c]) for c in range(3)]
    return np.round(np.stack(rgb, axis=-1)).astype(np.uint8)


def depth_to_color(depth, mask=None, cmap: str = "turbo", vmin: float | None = None,
                   vmax: float | None = None, percentiles: tuple[float, float] = (2, 98),
                   invalid_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Colour-mapped depth: (H, W) -> (H, W, 3) uint8, near blue, far red.

    Valid pixels are finite, > 0 and in `mask` (H, W) bool when given; the others get
    `invalid_color`. vmin / vmax default to the given percentiles of the valid depths (robust to
    a few outliers); values outside are clipped. cmap: "turbo" or "gray".
    """
    d = _numpy(depth).astype(np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth_to_color: depth must be (H, W), got shape {d.shape}")
    valid = np.isfinite(d) & (d > 0)
    if mask is not None:
        m = _numpy(mask)
        if m.shape != d.shape:
            raise ValueError(f"depth_to_color: mask shape {m.shape} differs from depth shape "
                             f"{d.shape}")
        valid &= m.astype(bool)
    if cmap not in ("turbo", "gray"):
        raise ValueError(f"depth_to_color: cmap must be 'turbo' or 'gray', got {cmap!r}")
    out = np.empty(d.shape + (3,), np.uint8)
    out[:] = np.asarray(invalid_color, np.uint8)
    if not valid.any():
        return out
    v = d[valid]
    lo = float(np.percentile(v, percentiles[0])) if vmin is None else float(vmin)
    hi = float(np.percentile(v, percentiles[1])) if vmax is None else float(vmax)
    t = (v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)
    if cmap == "turbo":
        out[valid] = turbo(t)
    else:
        out[valid] = np.round(np.clip(t, 0, 1) * 255).astype(np.uint8)[:, None]
    return out


def make_grid(rows: list[list[np.ndarray]], pad: int = 2, labels: list[str] | None = None,
              background: int = 255) -> np.ndarray:
    """Tile rows of (h, w, 3) uint8 images into one (H, W, 3) uint8 image.

    Tiles in a row sit left to right, `pad` pixels apart and top-aligned; a row is as tall as
    its tallest tile, rows are `pad` apart, and shorter rows are filled with `background` on the
    right. labels (one per row) are written in PIL's default font in a column on the left.
    """
    if not rows or any(not r for r in rows):
        raise ValueError("make_grid: rows must be a non-empty list of non-empty lists of images")
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if not (isinstance(t, np.ndarray) and t.dtype == np.uint8 and t.ndim == 3
                    and t.shape[-1] == 3):
                raise ValueError(f"make_grid: tile ({i}, {j}) must be an (h, w, 3) uint8 array, "
                                 f"got {getattr(t, 'dtype', type(t))} {getattr(t, 'shape', '')}")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"make_grid: {len(labels)} labels for {len(rows)} rows")
    heights = [max(t.shape[0] for t in row) for row in rows]
    widths = [sum(t.shape[1] for t in row) + pad * (len(row) - 1) for row in rows]
    label_w = 0
    if labels:
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(int(np.ceil(draw.textlength(str(s)))) for s in labels) + 2 * pad
    H = sum(heights) + pad * (len(rows) + 1)
    W = label_w + max(widths) + 2 * pad
    grid = np.full((H, W, 3), background, np.uint8)
    y = pad
    for row, h in zip(rows, heights):
        x = label_w + pad
        for t in row:
            grid[y:y + t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + pad
        y += h + pad
    if labels:
        img = Image.fromarray(grid)
        draw, y = ImageDraw.Draw(img), pad
        for label, h in zip(labels, heights):
            top, bottom = draw.textbbox((0, 0), str(label))[1::2]
            draw.text((pad, y + (h - top - bottom) // 2), str(label), fill=(0, 0, 0))
            y += h + pad
        grid = np.asarray(img).copy()
    return grid


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> str:
    """Call write(f) on a temporary file beside `path`, then rename it onto `path`: a reader
    sees the old file or the complete new one, never a partial one. Creates parent folders."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_png(array: np.ndarray, path: str | os.PathLike) -> str:
    """Write (H, W, 3) or (H, W) uint8, or (H, W) uint16, as a PNG, atomically; returns path."""
    a = np.ascontiguousarray(array)
    ok = (a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3))) or \
         (a.dtype == np.uint16 and a.ndim == 2)
    if not ok:
        raise ValueError(f"save_png: expected (H, W, 3) / (H, W) uint8 or (H, W) uint16, got "
                         f"{a.dtype} {a.shape} for {os.fspath(path)}")
    img = Image.fromarray(a)
    return write_atomic(path, lambda f: img.save(f, format="PNG"))


def save_depth_raw(depth, path: str | os.PathLike) -> str:
    """Write depth (H, W) as float32 `.npy` (np.load reads it back exactly), atomically."""
    d = _numpy(depth)
    if d.ndim != 2:
        raise ValueError(f"save_depth_raw: depth must be (H, W), got shape {d.shape}")
    if not os.fspath(path).endswith(".npy"):
        raise ValueError(f"save_depth_raw: path must end in .npy, got {os.fspath(path)}")
    d = d.astype(np.float32)
    return write_atomic(path, lambda f: np.save(f, d, allow_pickle=False))
