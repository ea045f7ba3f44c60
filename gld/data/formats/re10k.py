"""RealEstate10K: pixelSplat `.torch` chunks (`re10k`) and the original camera txt files
(`re10k_txt`).

Cameras, both forms: per frame 18 numbers `fx fy cx cy 0 0` then the row-major 3x4
world-to-camera matrix (OpenCV axes); fx, cx are normalised by the image width and fy, cy by
the height, so pixels are `fx * W` etc. with W, H read from each decoded image. c2w is the
float64 inverse of the stored (float32 in chunks) w2c.

`re10k` input: a folder searched recursively for `*.torch` chunks (e.g. `train/000000.torch`).
Each chunk is a `torch.save`d list of dicts `{url: str, timestamps: int64[N],
cameras: float32[N, 18], key: str, images: [uint8 tensor of JPEG bytes] * N}`, loaded with
`weights_only=True`. Where a chunk's folder has `index.json` (key -> chunk file name), every
key must be listed there under the chunk that holds it. JPEG bytes are stored unchanged.

`re10k_txt` input: a folder searched recursively for `<scene>.txt` (line 0: the video URL; then
one line per frame: `timestamp_us fx fy cx cy 0 0 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2`)
plus the extracted frames, laid out as `<frames_dir>/<scene>/<timestamp_us>.png` (or `.jpg`,
`.jpeg`, `.webp`), `frames_dir` defaulting to `<input>/frames`. A missing frame image is a bad
frame (with `--skip-bad` it is left out and counted).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from gld.data.formats.common import (
    BadSample, Problems, Reader, check_image, finish_sequence, intrinsics, make_frame, natural_key,
    read_bytes,
)
from gld.data.schema import Sequence

__all__ = ["Re10kChunkReader", "Re10kTxtReader", "camera_from_row"]


def camera_from_row(row: np.ndarray, size: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """18 numbers (normalised fx fy cx cy, 0, 0, w2c 3x4) and (H, W) -> (K pixels, c2w)."""
    row = np.asarray(row, dtype=np.float64)
    if row.shape != (18,):
        raise BadSample(where, f"camera row must have 18 numbers, got {row.shape}")
    h, w = size
    K = intrinsics(row[0] * w, row[1] * h, row[2] * w, row[3] * h)
    w2c = np.eye(4)
    w2c[:3] = row[6:].reshape(3, 4)
    if not np.isfinite(w2c).all():
        raise BadSample(where, f"non-finite world-to-camera pose {w2c[:3].tolist()}")
    try:
        c2w = np.linalg.inv(w2c)
    except np.linalg.LinAlgError:
        raise BadSample(where, "singular world-to-camera pose") from None
    return K, c2w


class Re10kChunkReader(Reader):
    name = "re10k"

    def units(self) -> list[Path]:
        chunks = sorted(self.root.rglob("*.torch"), key=lambda p: natural_key(str(p)))
        if not chunks:
            raise BadSample(str(self.root), "no *.torch chunks found")
        self._index: dict[Path, dict] = {}
        for folder in sorted({c.parent for c in chunks}):
            index_path = folder / "index.json"
            if index_path.exists():
                try:
                    self._index[folder] = json.loads(index_path.read_text())
                except (OSError, ValueError) as e:
                    raise BadSample(str(index_path), f"unreadable index: {e}") from None
                for key, chunk in self._index[folder].items():
                    if not (folder / chunk).exists():
                        raise BadSample(str(index_path), f"key {key!r} names chunk {chunk!r}, "
                                        f"which does not exist")
        return chunks

    def read(self, chunk: Path, problems: Problems) -> Iterator[Sequence]:
        try:
            examples = torch.load(chunk, weights_only=True, map_location="cpu")
        except Exception as e:
            problems.sequence(BadSample(str(chunk), f"unreadable chunk ({type(e).__name__}: {e})"))
            return
        if not isinstance(examples, list):
            problems.sequence(BadSample(str(chunk), f"expected a list of dicts, got "
                                        f"{type(examples).__name__}"))
            return
        index = getattr(self, "_index", {}).get(chunk.parent)
        for n, ex in enumerate(examples):
            key = ex.get("key", f"#{n}") if isinstance(ex, dict) else f"#{n}"
            where = f"{chunk} example {n} (scene {key!r})"
            try:
                seq = self._example(ex, where, index, chunk, problems)
            except BadSample as e:
                problems.sequence(e)
                continue
            if seq is not None:
                yield seq

    def _example(self, ex, where: str, index: Optional[dict], chunk: Path,
                 problems: Problems) -> Optional[Sequence]:
        if not isinstance(ex, dict) or not {"key", "cameras", "images", "timestamps"} <= set(ex):
            raise BadSample(where, "expected a dict with key, url, timestamps, cameras, images")
        key = str(ex["key"])
        if index is not None and index.get(key) != chunk.name:
            raise BadSample(where, f"index.json maps this key to {index.get(key)!r}, "
                            f"not {chunk.name!r}")
        cams = ex["cameras"].double().numpy() if torch.is_tensor(ex["cameras"]) else np.asarray(ex["cameras"], np.float64)
        stamps = ex["timestamps"].numpy() if torch.is_tensor(ex["timestamps"]) else np.asarray(ex["timestamps"])
        images = ex["images"]
        if cams.ndim != 2 or cams.shape[1] != 18 or not (len(cams) == len(stamps) == len(images)):
            raise BadSample(where, f"cameras {tuple(cams.shape)} (want (N, 18)), "
                            f"{len(stamps)} timestamps and {len(images)} images disagree")
        frames = []
        for i in range(len(cams)):
            fwhere = f"{where} frame {i} (timestamp {int(stamps[i])})"
            try:
                img = images[i]
                data = img.numpy().tobytes() if torch.is_tensor(img) else bytes(img)
                data, size, _ = check_image(data, fwhere)
                K, c2w = camera_from_row(cams[i], size, fwhere)
                frames.append(make_frame(data, K, c2w, i, fwhere, timestamp=int(stamps[i]),
                                         size=size))
            except BadSample as e:
                problems.frame(e)
        return finish_sequence(key, frames, self.name, problems, where)


def parse_txt(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """-> (url, timestamps int64 (N,), cameras float64 (N, 18))."""
    where = str(path)
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise BadSample(where, f"unreadable camera file: {e}") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise BadSample(where, "empty camera file")
    url, stamps, rows = lines[0], [], []
    for n, ln in enumerate(lines[1:], start=2):
        parts = ln.split()
        if len(parts) != 19:
            raise BadSample(f"{where} line {n}", f"expected 19 numbers (timestamp + 18), got "
                            f"{len(parts)}")
        try:
            stamps.append(int(parts[0]))
            rows.append([float(p) for p in parts[1:]])
        except ValueError as e:
            raise BadSample(f"{where} line {n}", f"not a number: {e}") from None
    return url, np.asarray(stamps, dtype=np.int64), np.asarray(rows, dtype=np.float64).reshape(-1, 18)


class Re10kTxtReader(Reader):
    name = "re10k_txt"

    def __init__(self, root, frames_dir: Optional[str] = None):
        super().__init__(root)
        self.frames_dir = Path(frames_dir) if frames_dir else self.root / "frames"

    def units(self) -> list[Path]:
        txts = [p for p in self.root.rglob("*.txt") if self.frames_dir not in p.parents]
        if not txts:
            raise BadSample(str(self.root), "no <scene>.txt camera files found")
        return sorted(txts, key=lambda p: natural_key(str(p)))

    def _image_path(self, scene: str, stamp: int) -> Optional[Path]:
        for ext in (".png", ".jpg", ".jpeg", ".webp"):
            p = self.frames_dir / scene / f"{stamp}{ext}"
            if p.exists():
                return p
        return None

    def read(self, txt: Path, problems: Problems) -> Iterator[Sequence]:
        scene = txt.stem
        try:
            _, stamps, cams = parse_txt(txt)
        except BadSample as e:
            problems.sequence(e)
            return
        frames = []
        for i, (stamp, row) in enumerate(zip(stamps, cams)):
            fwhere = f"{txt} (scene {scene!r}) frame {i} (timestamp {int(stamp)})"
            try:
                path = self._image_path(scene, int(stamp))
                if path is None:
                    raise BadSample(fwhere, f"missing frame image "
                                    f"{self.frames_dir / scene / f'{int(stamp)}.png'} (or .jpg)")
                data, size, _ = check_image(read_bytes(path, fwhere), f"{fwhere} {path}")
                K, c2w = camera_from_row(row, size, fwhere)
                frames.append(make_frame(data, K, c2w, i, fwhere, timestamp=int(stamp), size=size))
            except BadSample as e:
                problems.frame(e)
        seq = finish_sequence(scene, frames, self.name, problems, str(txt))
        if seq is not None:
            yield seq
