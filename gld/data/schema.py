"""The multi-view sample schema shared by converters, shard writers and streaming readers.

A stored record is a `Sequence`: consecutive posed frames of one scene (a whole capture, or a
chunk of a long one). Training samples (V views drawn from a window of a sequence) are made from
it by the streaming reader. Conventions, fixed for every stored dataset:
- images: encoded bytes (JPEG, PNG or WebP), RGB, decoded to (H, W, 3) uint8;
- intrinsics `K`: (3, 3) float64 in pixels of that frame's image, pixel centres at +0.5;
- extrinsics `c2w`: (4, 4) float64, OpenCV camera-to-world (x right, y down, z forward);
- depth (optional): (H, W) float32 planar z along the optical axis in the dataset's units,
  0 where unknown.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["Frame", "Sequence", "DatasetMeta", "SCHEMA_VERSION", "CONVENTIONS"]

SCHEMA_VERSION = 1
CONVENTIONS = {
    "extrinsics": "c2w, OpenCV axes (x right, y down, z forward)",
    "intrinsics": "pixels, pixel centres at +0.5",
    "depth": "planar z, 0 = unknown",
}


@dataclass
class Frame:
    image: bytes  # encoded RGB (JPEG / PNG / WebP)
    K: np.ndarray  # (3, 3) float64, pixels
    c2w: np.ndarray  # (4, 4) float64, OpenCV camera-to-world
    index: int  # frame index within the original sequence
    depth: Optional[np.ndarray] = None  # (H, W) float32 planar z, 0 = unknown
    timestamp: Optional[int] = None  # microseconds, where the source has it


@dataclass
class Sequence:
    scene_id: str
    frames: list[Frame]
    source: str = ""  # dataset name, e.g. "re10k"


@dataclass
class DatasetMeta:
    """Written beside the shards (`gld_meta.json`) once everything else is complete."""

    source: str
    num_sequences: int = 0
    num_frames: int = 0
    image_format: str = "jpeg"
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # distinct (H, W)
    has_depth: bool = False
    writer: str = "mds"  # "mds" | "wds"
    schema_version: int = SCHEMA_VERSION
    conventions: dict = field(default_factory=lambda: dict(CONVENTIONS))
    extra: dict = field(default_factory=dict)
