"""How one `Sequence` is stored as a record in MDS and WebDataset shards (lossless).

Record fields (both writers):
- `meta` (JSON): scene_id, source, frame_indices [N], timestamps [N] or null, image_format,
  image_sizes [[H, W]] * N, image_crc32 [N] (checked on read: corrupt bytes never decode
  silently), has_depth, schema_version; MDS adds image_offsets [N + 1].
- `K` (N, 3, 3) float64 pixels and `c2w` (N, 4, 4) float64 OpenCV camera-to-world, stored as
  exact float64 (MDS `ndarray:float64`, WDS `.npy`).
- images: the encoded bytes exactly as given (MDS: one `images` blob cut by image_offsets;
  WDS: one member per frame, `frame0000.png`, ...; K is `intrinsics.npy` there because
  webdataset lowercases member suffixes).
- depth: raw little-endian float32 of every frame, concatenated (empty without depth).
"""
from __future__ import annotations

import io
import json
import zlib
from typing import Optional

import numpy as np

from gld.data.schema import SCHEMA_VERSION, DataError, Frame, Sequence, image_format_of

__all__ = ["MDS_COLUMNS", "sequence_fields", "to_mds", "from_mds", "to_wds", "from_wds",
           "image_size"]

MDS_COLUMNS = {"meta": "json", "K": "ndarray:float64", "c2w": "ndarray:float64",
               "images": "bytes", "depth": "bytes"}


def image_size(data: bytes) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def sequence_fields(seq: Sequence) -> tuple[dict, np.ndarray, np.ndarray, bytes]:
    """Sequence -> (meta, K (N,3,3) f64, c2w (N,4,4) f64, depth bytes); checks consistency."""
    frames = seq.frames
    if not frames:
        raise DataError(f"scene {seq.scene_id!r}: a sequence needs at least one frame")
    sizes = [image_size(f.image) for f in frames]
    fmts = {image_format_of(f.image) for f in frames}
    has_depth = any(f.depth is not None for f in frames)
    depth = b""
    if has_depth:
        parts = []
        for i, (f, (h, w)) in enumerate(zip(frames, sizes)):
            d = np.zeros((h, w), np.float32) if f.depth is None else np.asarray(f.depth)
            if d.shape != (h, w):
                raise DataError(f"scene {seq.scene_id!r} frame {i}: depth {d.shape} does not "
                                f"match the image size {(h, w)}")
            parts.append(np.ascontiguousarray(d, dtype="<f4").tobytes())
        depth = b"".join(parts)
    ts = [f.timestamp for f in frames]
    meta = {
        "scene_id": str(seq.scene_id), "source": seq.source,
        "frame_indices": [int(f.index) for f in frames],
        "timestamps": None if all(t is None for t in ts) else [-1 if t is None else int(t)
                                                                 for t in ts],
        "image_format": fmts.pop() if len(fmts) == 1 else "mixed",
        "image_sizes": [list(s) for s in sizes], "has_depth": has_depth,
        "image_crc32": [zlib.crc32(f.image) for f in frames],
        "schema_version": SCHEMA_VERSION,
    }
    K = np.stack([np.asarray(f.K, np.float64) for f in frames])
    c2w = np.stack([np.asarray(f.c2w, np.float64) for f in frames])
    return meta, K, c2w, depth


def _build(meta: dict, K: np.ndarray, c2w: np.ndarray, images: list[bytes], depth: bytes,
           where: str) -> Sequence:
    n = len(meta["frame_indices"])
    if len(images) != n or K.shape[0] != n or c2w.shape[0] != n:
        raise DataError(f"{where}: inconsistent record: {n} frame indices, {len(images)} images, "
                        f"K {K.shape}, c2w {c2w.shape}")
    crcs = meta.get("image_crc32")
    if crcs is not None:
        for i, (img, crc) in enumerate(zip(images, crcs)):
            if zlib.crc32(img) != crc:
                raise DataError(f"{where} (scene {meta['scene_id']!r}, frame "
                                f"{meta['frame_indices'][i]}): corrupt image bytes (crc32 "
                                f"{zlib.crc32(img):08x}, written as {crc:08x})")
    depths: list[Optional[np.ndarray]] = [None] * n
    if meta["has_depth"]:
        sizes = meta["image_sizes"]
        need = sum(h * w for h, w in sizes) * 4
        if len(depth) != need:
            raise DataError(f"{where}: depth blob has {len(depth)} bytes, expected {need}")
        flat = np.frombuffer(depth, dtype="<f4")
        o = 0
        for i, (h, w) in enumerate(sizes):
            depths[i] = flat[o:o + h * w].reshape(h, w)
            o += h * w
    ts = meta.get("timestamps")
    frames = [Frame(image=images[i], K=K[i], c2w=c2w[i], index=meta["frame_indices"][i],
                    depth=depths[i], timestamp=None if ts is None or ts[i] < 0 else ts[i])
              for i in range(n)]
    seq = Sequence(scene_id=meta["scene_id"], frames=frames, source=meta.get("source", ""))
    seq.image_sizes = [tuple(s) for s in meta["image_sizes"]]  # header sizes, for checks
    return seq


def to_mds(seq: Sequence, fields=None) -> dict:
    meta, K, c2w, depth = fields or sequence_fields(seq)
    meta = dict(meta)
    offsets = np.cumsum([0] + [len(f.image) for f in seq.frames]).tolist()
    meta["image_offsets"] = offsets
    return {"meta": meta, "K": K, "c2w": c2w, "images": b"".join(f.image for f in seq.frames),
            "depth": depth}


def from_mds(sample: dict, where: str = "") -> Sequence:
    meta = sample["meta"]
    off = meta["image_offsets"]
    blob = sample["images"]
    if len(blob) != off[-1]:
        raise DataError(f"{where}: image blob has {len(blob)} bytes, index says {off[-1]}")
    images = [blob[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    return _build(meta, np.asarray(sample["K"]), np.asarray(sample["c2w"]), images,
                  sample["depth"], where)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "unknown": "bin"}


def to_wds(seq: Sequence, key: str, fields=None) -> dict:
    meta, K, c2w, depth = fields or sequence_fields(seq)
    out = {"__key__": key, "meta.json": json.dumps(meta).encode(), "intrinsics.npy": _npy(K),
           "c2w.npy": _npy(c2w)}
    for i, f in enumerate(seq.frames):
        out[f"frame{i:04d}.{_EXT[image_format_of(f.image)]}"] = f.image
    if depth:
        out["depth.bin"] = depth
    return out


def from_wds(sample: dict, where: str = "") -> Sequence:
    """`sample`: member suffix -> bytes for one key (as grouped by webdataset)."""
    try:
        meta = json.loads(sample["meta.json"])
        K = np.load(io.BytesIO(sample["intrinsics.npy"]), allow_pickle=False)
        c2w = np.load(io.BytesIO(sample["c2w.npy"]), allow_pickle=False)
    except KeyError as e:
        raise DataError(f"{where}: record lacks member {e.args[0]!r} "
                        f"(has {sorted(k for k in sample if not k.startswith('__'))})") from None
    except Exception as e:
        raise DataError(f"{where}: unreadable record header: {e}") from None
    frames = sorted(k for k in sample if k.startswith("frame"))
    images = [sample[k] for k in frames]
    return _build(meta, K, c2w, images, sample.get("depth.bin", b""), where)
