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

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from gld.geometry.cameras import CameraError
from gld.geometry.cameras import check_cameras as geometry_check_cameras

__all__ = [
    "Frame", "Sequence", "DatasetMeta", "SCHEMA_VERSION", "CONVENTIONS", "META_FILE",
    "DataError", "check_cameras", "sequence_cameras", "image_format_of",
]

META_FILE = "gld_meta.json"  # written last: its presence means the dataset is complete

SCHEMA_VERSION = 1
CONVENTIONS = {
    "extrinsics": "c2w, OpenCV axes (x right, y down, z forward)",
    "intrinsics": "pixels, pixel centres at +0.5",
    "depth": "planar z, 0 = unknown",
}


class DataError(ValueError):
    """Bad stored data. The message names where: shard, sample (record) index, scene, frame."""


def image_format_of(data: bytes) -> str:
    """'jpeg' | 'png' | 'webp' from the magic bytes; 'unknown' otherwise."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def check_cameras(K: np.ndarray, c2w: np.ndarray, sizes: list, where: str = "") -> None:
    """`gld.geometry.check_cameras` for stored frames: K (N, 3, 3), c2w (N, 4, 4), sizes
    [(H, W)] * N; a DataError prefixed by `where` (e.g. "shard-000003.tar record 7 (scene abc)")
    names the first bad frame and what is wrong with it."""
    try:
        geometry_check_cameras(c2w, K, sizes)
    except CameraError as e:
        pre = f"{where}: " if where else ""
        frame = f"frame {e.index}: " if e.index is not None else ""
        raise DataError(f"{pre}{frame}{e.what}") from None


def sequence_cameras(seq: "Sequence") -> tuple[np.ndarray, np.ndarray]:
    """(K (N, 3, 3), c2w (N, 4, 4)) float64 of a sequence's frames."""
    return (np.stack([np.asarray(f.K, np.float64) for f in seq.frames]),
            np.stack([np.asarray(f.c2w, np.float64) for f in seq.frames]))


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
    num_records: int = 0  # stored records (a long sequence may be split into several)
    # One entry per shard, in order: {"name": file name, "num_records": int, "bytes": int}.
    shards: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["image_sizes"] = [list(s) for s in self.image_sizes]
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetMeta":
        d = json.loads(text)
        known = set(cls.__dataclass_fields__)
        meta = cls(**{k: v for k, v in d.items() if k in known})
        meta.image_sizes = [tuple(s) for s in meta.image_sizes]
        if meta.schema_version > SCHEMA_VERSION:
            raise DataError(f"{META_FILE}: schema_version {meta.schema_version} is newer than "
                            f"this reader ({SCHEMA_VERSION})")
        return meta
