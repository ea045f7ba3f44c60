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

import json

import numpy as np

__all__ = [
    "Frame", "Sequence", "DatasetMeta", "SCHEMA_VERSION", "CONVENTIONS", "META_FILE",
    "DataError", "check_cameras", "image_format_of",
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


def check_cameras(K: np.ndarray, c2w: np.ndarray, sizes: list, where: str = "",
                  atol: float = 1e-3) -> None:
    """Raise DataError unless every frame has sane pixel intrinsics and a finite rigid pose.

    K (N, 3, 3), c2w (N, 4, 4), sizes [(H, W)] * N. Intrinsics must be finite, zero-skew,
    bottom row [0, 0, 1], fx, fy >= 0.05 W (a field of view below ~169 degrees: smaller values
    usually mean intrinsics normalised by the image size) and the principal point inside the
    image. `where` prefixes the message (e.g. "shard-000003.tar sample 7 (scene abc)").
    """
    pre = f"{where}: " if where else ""
    n = len(sizes)
    if K.shape != (n, 3, 3) or c2w.shape != (n, 4, 4):
        raise DataError(f"{pre}expected K (N, 3, 3) and c2w (N, 4, 4) for N={n} frames, got "
                        f"K {K.shape}, c2w {c2w.shape}")
    hw = np.asarray(sizes, np.float64).reshape(n, 2)
    h, w = hw[:, 0], hw[:, 1]
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    with np.errstate(invalid="ignore"):
        k_finite = np.isfinite(K).all((1, 2))
        k_form = (K[:, 2] == (0, 0, 1)).all(1) & (K[:, 0, 1] == 0) & (K[:, 1, 0] == 0)
        k_focal = (fx >= 0.05 * w) & (fy >= 0.05 * h)
        k_pp = (cx >= 0) & (cx <= w) & (cy >= 0) & (cy <= h)
        t_finite = np.isfinite(c2w).all((1, 2))
        R = np.where(t_finite[:, None, None], c2w[:, :3, :3], 0.0)
        orth = np.abs(R.transpose(0, 2, 1) @ R - np.eye(3)).max((1, 2))
        det = np.linalg.det(R)
        bottom = np.abs(c2w[:, 3] - (0, 0, 0, 1)).max(1)
        rigid = (orth <= atol) & (np.abs(det - 1) <= atol) & (bottom <= atol)
    ok = k_finite & k_form & k_focal & k_pp & t_finite & rigid
    if ok.all():
        return
    i = int(np.flatnonzero(~ok)[0])
    k, T = K[i], c2w[i]
    if not k_finite[i]:
        raise DataError(f"{pre}frame {i}: non-finite intrinsics {k.tolist()}")
    if not k_form[i]:
        raise DataError(f"{pre}frame {i}: intrinsics must be [[fx,0,cx],[0,fy,cy],[0,0,1]], "
                        f"got {k.tolist()}")
    if not k_focal[i]:
        raise DataError(f"{pre}frame {i}: focal lengths fx={fx[i]:.4g}, fy={fy[i]:.4g} are not "
                        f"pixels of a {w[i]:.0f}x{h[i]:.0f} image (expected >= 0.05 x size; "
                        f"normalised intrinsics?)")
    if not k_pp[i]:
        raise DataError(f"{pre}frame {i}: principal point ({cx[i]:.4g}, {cy[i]:.4g}) lies "
                        f"outside the {w[i]:.0f}x{h[i]:.0f} image")
    if not t_finite[i]:
        raise DataError(f"{pre}frame {i}: non-finite camera-to-world pose {T.tolist()}")
    raise DataError(f"{pre}frame {i}: camera-to-world pose is not rigid "
                    f"(|R^T R - I|max={orth[i]:.3g}, det R={det[i]:.4f}, last row "
                    f"{T[3].tolist()})")


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
