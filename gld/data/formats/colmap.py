"""COLMAP sparse models, e.g. Mip-NeRF 360 (`colmap`, alias `mipnerf360`).

Input: a scene folder with `sparse/0/` (or `sparse/`) holding `cameras.bin` + `images.bin`
(or `cameras.txt` + `images.txt`) and an `images/` folder, or a folder searched recursively for
such scenes. Binary layout (little-endian), as COLMAP writes it:
- cameras.bin: uint64 count; per camera int32 camera_id, int32 model_id, uint64 width,
  uint64 height, float64 params[n(model)];
- images.bin: uint64 count; per image int32 image_id, float64 qvec[4] (w, x, y, z),
  float64 tvec[3], int32 camera_id, NUL-terminated name, uint64 n_points2D, then
  n_points2D x (float64 x, float64 y, int64 point3D_id).
Text: `CAMERA_ID MODEL WIDTH HEIGHT PARAMS...`; images two lines each,
`IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME` then the (possibly empty) points line.

qvec / tvec are world-to-camera with OpenCV axes: R = quat(w, x, y, z), c2w = [R^T | -R^T t].
Models: SIMPLE_PINHOLE (f, cx, cy), PINHOLE (fx, fy, cx, cy) are stored as they are;
SIMPLE_RADIAL (f, cx, cy, k), RADIAL (f, cx, cy, k1, k2) and OPENCV (fx, fy, cx, cy, k1, k2,
p1, p2) are undistorted onto the same K (see `undistort`) and stored as PNG; fisheye / FOV /
thin-prism models are refused with an error. COLMAP pixel centres are at +0.5 like ours.

`images="images_4"` reads the downscaled copies (same file names); K is scaled by the actual
image size over the camera's width / height. Frames are ordered by image name; `split="test"`
keeps every 8th (index 0, 8, 16, ...: the Mip-NeRF 360 hold-out), `"train"` the rest.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from gld.data.formats.common import (
    BadSample, Problems, Reader, check_image, finish_sequence, fit_intrinsics, intrinsics,
    make_frame, natural_key, read_bytes, undistorted,
)
from gld.data.schema import Sequence
from gld.geometry.rotations import quat_to_rotmat

__all__ = ["ColmapReader", "CAMERA_MODELS", "read_cameras", "read_images"]

# model_id -> (name, number of params)
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5),
    4: ("OPENCV", 8), 5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4), 9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
_NPARAMS = {name: n for name, n in CAMERA_MODELS.values()}


class _Buf:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.data):
            raise BadSample(self.where, f"truncated file (needed {n} bytes at offset {self.pos})")
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return out

    def name(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise BadSample(self.where, "truncated file (unterminated image name)")
        s = self.data[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return s


def read_cameras(path: Path) -> dict[int, tuple[str, int, int, np.ndarray]]:
    """camera_id -> (model name, width, height, params float64)."""
    where = str(path)
    cams = {}
    if path.suffix == ".bin":
        buf = _Buf(read_bytes(path, where), where)
        (count,) = buf.take("<Q")
        for _ in range(count):
            cam_id, model_id, w, h = buf.take("<iiQQ")
            if model_id not in CAMERA_MODELS:
                raise BadSample(where, f"camera {cam_id}: unknown model id {model_id}")
            name, n = CAMERA_MODELS[model_id]
            cams[cam_id] = (name, int(w), int(h), np.array(buf.take(f"<{n}d"), dtype=np.float64))
        return cams
    try:
        text = path.read_text()
    except OSError as e:
        raise BadSample(where, f"unreadable: {e}") from None
    for n_line, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            name = parts[1]
            if name not in _NPARAMS or len(parts) != 4 + _NPARAMS[name]:
                raise BadSample(f"{where} line {n_line}", f"model {name!r} with "
                                f"{len(parts) - 4} params is not a COLMAP camera")
            cams[int(parts[0])] = (name, int(parts[2]), int(parts[3]),
                                   np.array([float(p) for p in parts[4:]], dtype=np.float64))
        except (ValueError, IndexError) as e:
            raise BadSample(f"{where} line {n_line}", f"bad camera line: {e}") from None
    return cams


def read_images(path: Path) -> list[tuple[int, np.ndarray, np.ndarray, int, str]]:
    """[(image_id, qvec wxyz, tvec, camera_id, name)] in file order."""
    where = str(path)
    out = []
    if path.suffix == ".bin":
        buf = _Buf(read_bytes(path, where), where)
        (count,) = buf.take("<Q")
        for _ in range(count):
            image_id, qw, qx, qy, qz, tx, ty, tz, cam_id = buf.take("<i7di")
            name = buf.name()
            (n_pts,) = buf.take("<Q")
            if buf.pos + 24 * n_pts > len(buf.data):
                raise BadSample(where, f"image {image_id} ({name}): truncated points2D")
            buf.pos += 24 * n_pts  # (x, y, point3D_id) per point, not needed here
            out.append((image_id, np.array([qw, qx, qy, qz]), np.array([tx, ty, tz]), cam_id, name))
        return out
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise BadSample(where, f"unreadable: {e}") from None
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=9)
        try:
            vals = [float(p) for p in parts[1:8]]
            out.append((int(parts[0]), np.array(vals[:4]), np.array(vals[4:]), int(parts[8]),
                        parts[9]))
        except (ValueError, IndexError) as e:
            raise BadSample(f"{where} line {i}", f"bad image line: {e}") from None
        i += 1  # the points2D line that follows every image line (may be empty)
    return out


def _pinhole(model: str, params: np.ndarray) -> tuple[np.ndarray, dict]:
    p = params
    if model == "SIMPLE_PINHOLE":
        return intrinsics(p[0], p[0], p[1], p[2]), {}
    if model == "PINHOLE":
        return intrinsics(p[0], p[1], p[2], p[3]), {}
    if model == "SIMPLE_RADIAL":
        return intrinsics(p[0], p[0], p[1], p[2]), {"k1": p[3]}
    if model == "RADIAL":
        return intrinsics(p[0], p[0], p[1], p[2]), {"k1": p[3], "k2": p[4]}
    if model == "OPENCV":
        return intrinsics(p[0], p[1], p[2], p[3]), {"k1": p[4], "k2": p[5], "p1": p[6], "p2": p[7]}
    raise ValueError(model)


_SUPPORTED = {"SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"}


class ColmapReader(Reader):
    name = "colmap"

    def __init__(self, root, images: str = "images", split: str = "all"):
        super().__init__(root)
        if split not in ("all", "train", "test"):
            raise ValueError(f"split must be all, train or test, got {split!r}")
        self.images, self.split = images, split

    @staticmethod
    def _model_dir(scene: Path) -> Optional[Path]:
        for d in (scene / "sparse" / "0", scene / "sparse"):
            if (d / "cameras.bin").exists() or (d / "cameras.txt").exists():
                return d
        return None

    def units(self) -> list[Path]:
        if self._model_dir(self.root):
            return [self.root]
        scenes = set()
        for p in self.root.rglob("cameras.*"):
            d = p.parent
            if p.suffix not in (".bin", ".txt"):
                continue
            if d.name == "sparse":
                scenes.add(d.parent)
            elif d.parent.name == "sparse" and d.name == "0":
                scenes.add(d.parent.parent)
        scenes = sorted((s for s in scenes if self._model_dir(s)), key=lambda p: natural_key(str(p)))
        if not scenes:
            raise BadSample(str(self.root), "no COLMAP model (sparse/0/cameras.bin or .txt) found")
        return scenes

    def read(self, scene: Path, problems: Problems) -> Iterator[Sequence]:
        scene_id = self.scene_id(scene)
        model_dir = self._model_dir(scene)
        ext = ".bin" if (model_dir / "cameras.bin").exists() else ".txt"
        images_path = model_dir / f"images{ext}"
        try:
            cams = read_cameras(model_dir / f"cameras{ext}")
            entries = sorted(read_images(images_path), key=lambda e: natural_key(e[4]))
            if not entries:
                raise BadSample(str(images_path), "no registered images")
        except BadSample as e:
            problems.sequence(e)
            return
        numbered = list(enumerate(entries))  # index = position among all images by name
        if self.split != "all":
            keep = (lambda i: i % 8 == 0) if self.split == "test" else (lambda i: i % 8 != 0)
            numbered = [(i, e) for i, e in numbered if keep(i)]
        frames = []
        for index, (image_id, qvec, tvec, cam_id, name) in numbered:
            fwhere = f"{images_path} (scene {scene_id!r}) image {image_id} ({name})"
            try:
                frames.append(self._frame(scene, cams, qvec, tvec, cam_id, name, index, fwhere))
            except BadSample as e:
                problems.frame(e)
        seq = finish_sequence(scene_id, frames, self.name, problems, str(images_path))
        if seq is not None:
            yield seq

    def _frame(self, scene, cams, qvec, tvec, cam_id, name, index, where):
        if cam_id not in cams:
            raise BadSample(where, f"camera_id {cam_id} is not in cameras")
        model, w0, h0, params = cams[cam_id]
        if model not in _SUPPORTED:
            raise BadSample(where, f"camera model {model} is not supported (supported: "
                            f"{sorted(_SUPPORTED)}); undistort the model with COLMAP first")
        K, dist = _pinhole(model, params)
        if not (np.isfinite(qvec).all() and np.isfinite(tvec).all()):
            raise BadSample(where, f"non-finite pose qvec={qvec.tolist()} tvec={tvec.tolist()}")
        qn = float(np.linalg.norm(qvec))
        if abs(qn - 1) > 1e-3:
            raise BadSample(where, f"qvec {qvec.tolist()} is not a unit quaternion (|q|={qn:.6g})")
        R = quat_to_rotmat(torch.from_numpy(qvec), order="wxyz").numpy()
        c2w = np.eye(4)
        c2w[:3, :3] = R.T
        c2w[:3, 3] = -R.T @ tvec
        path = scene / self.images / name
        data, size, rgb = check_image(read_bytes(path, where), f"{where} {path}")
        K = fit_intrinsics(K, (h0, w0), size, where, f"camera {cam_id}", path)
        data = undistorted(data, rgb, K, dist, where)
        return make_frame(data, K, c2w, index, where, size=size)
