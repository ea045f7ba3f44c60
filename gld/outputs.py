"""Writing one scene's novel-view results to a folder (launch/sample.py, the main job's report).

    <out>/
      generated/<target>.png        generated target views
      depth/<view>.png              DA3 depth, colour-mapped (turbo, 2-98th percentile)
      depth/<view>.npy              raw depth, float32 (H, W), DA3's scale
      grid.png                      rows: sources | generated | ground truth (when given) | depth
      points.ply                    coloured points of every view (DA3's frame)
      cameras.json                  the DA3-predicted w2c and K of every view, and the timings

Every file is written atomically (temporary name + rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gld.eval.images import depth_to_color, make_grid, save_depth_raw, save_png, to_uint8
from gld.eval.ply import write_ply

__all__ = ["write_nvs_outputs"]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_nvs_outputs(out, folder, source_names: Sequence[str], target_names: Sequence[str],
                      b: int = 0, ground_truth: Optional[np.ndarray] = None,
                      ply_stride: int = 1) -> dict[str, Path]:
    """Scene `b` of an `NVSOutput` -> files in `folder` (see the module doc); returns the paths.

    ground_truth: (T, 3, H, W) float in [0, 1], the real target images when known (a row of
    the grid)."""
    folder = Path(folder)
    (folder / "generated").mkdir(parents=True, exist_ok=True)
    (folder / "depth").mkdir(parents=True, exist_ok=True)
    names = list(source_names) + list(target_names)
    S = len(source_names)
    gen = out.images[b].float().cpu().numpy()
    src = out.sources[b].float().cpu().numpy()
    depth = out.depth[b].float().cpu().numpy()
    paths: dict[str, Path] = {}
    for i, name in enumerate(target_names):
        paths[f"generated/{name}"] = save_png(to_uint8(gen[i]), folder / "generated" / f"{name}.png")
    depth_tiles = []
    for v, name in enumerate(names):
        color = depth_to_color(depth[v])
        depth_tiles.append(color)
        save_png(color, folder / "depth" / f"{name}.png")
        save_depth_raw(depth[v], folder / "depth" / f"{name}.npy")
    rows = [[to_uint8(x) for x in src], [to_uint8(x) for x in gen]]
    labels = ["sources", "generated"]
    if ground_truth is not None:
        rows.append([to_uint8(x) for x in ground_truth])
        labels.append("ground truth")
    rows += [depth_tiles[:S], depth_tiles[S:]]
    labels += ["depth (sources)", "depth (generated)"]
    paths["grid"] = save_png(make_grid(rows, labels=labels), folder / "grid.png")
    pts, cols = out.point_cloud(b, stride=ply_stride)
    paths["ply"] = write_ply(folder / "points.ply", pts, cols)
    cams = {n: {"w2c": out.w2c[b, v].tolist(), "K": out.K[b, v].tolist()}
            for v, n in enumerate(names)}
    _write_json(folder / "cameras.json", {"views": names, "sources": list(source_names),
                                          "cameras": cams, "timings_s": out.timings})
    paths["cameras"] = folder / "cameras.json"
    return {k: Path(v) if v is not None else folder for k, v in paths.items()}
