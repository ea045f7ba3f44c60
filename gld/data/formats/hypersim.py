"""HyperSim (`hypersim`), one sequence per camera trajectory (`<scene>/cam_XX`). Needs `h5py`.

Files read, per scene `ai_VVV_NNN` (found recursively under the input):
- `_detail/metadata_scene.csv` (`parameter_name,parameter_value`): `meters_per_asset_unit`;
- `_detail/cam_XX/camera_keyframe_positions.hdf5` (dataset "dataset", (N, 3), asset units) and
  `camera_keyframe_orientations.hdf5` ((N, 3, 3) camera-to-world rotations, camera x right,
  y up, z back = OpenGL axes);
- `images/scene_cam_XX_final_preview/frame.IIII.tonemap.jpg` (the frames; IIII indexes the
  keyframe rows; JPEG bytes stored unchanged);
- `images/scene_cam_XX_geometry_hdf5/frame.IIII.depth_meters.hdf5` when that folder exists
  ((H, W) Euclidean distance to the optical centre in metres, NaN where there is no geometry).

Conversion: c2w = [R @ diag(1, -1, -1) | p * meters_per_asset_unit] (OpenCV axes, metres).
Intrinsics: 60 degree horizontal field of view, square pixels, centred: fx = fy = W / (2 tan 30
deg) (886.81 at 1024 x 768), cx = W / 2, cy = H / 2; where a `metadata_camera_parameters.csv`
(HyperSim's contrib file with per-scene `M_cam_from_uv_ij`; `camera_csv` or found at the
input root) lists the scene, K is derived from it exactly: a pixel (x, y) (centres at +0.5)
has u = 2x/W - 1, v = 1 - 2y/H and OpenGL ray M [u, v, 1], so K^-1 ~ diag(1, -1, -1) M A;
a matrix with skew (not a pinhole K) is refused. Depth: planar z = distance / |K^-1 [x, y, 1]|
(float64, stored float32), non-finite -> 0 (unknown).
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from gld.data.formats.common import (
    BadSample, Problems, Reader, check_image, finish_sequence, intrinsics, make_frame, natural_key,
    read_bytes,
)
from gld.data.schema import Sequence

__all__ = ["HypersimReader", "default_intrinsics", "intrinsics_from_cam_from_uv",
           "distance_to_planar"]

_FRAME_RE = re.compile(r"^frame\.(\d+)\.tonemap\.jpg$")


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("the hypersim reader needs h5py: pip install h5py") from None
    return h5py


def default_intrinsics(height: int, width: int, hfov_deg: float = 60.0) -> np.ndarray:
    f = width / (2.0 * math.tan(math.radians(hfov_deg) / 2.0))
    return intrinsics(f, f, width / 2.0, height / 2.0)


def intrinsics_from_cam_from_uv(M: np.ndarray, height: int, width: int, where: str) -> np.ndarray:
    A = np.array([[2.0 / width, 0, -1], [0, -2.0 / height, 1], [0, 0, 1]])
    K = np.linalg.inv(np.diag([1.0, -1.0, -1.0]) @ np.asarray(M, dtype=np.float64) @ A)
    K = K / K[2, 2]
    scale = max(abs(K[0, 0]), abs(K[1, 1]))
    off = [K[0, 1], K[1, 0], K[2, 0], K[2, 1]]
    if max(abs(x) for x in off) > 1e-9 * scale:
        raise BadSample(where, f"M_cam_from_uv {M.tolist()} gives a non-pinhole K {K.tolist()}")
    return intrinsics(K[0, 0], K[1, 1], K[0, 2], K[1, 2])


def distance_to_planar(dist: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H, W) Euclidean distance to the optical centre -> planar z, float32, non-finite -> 0."""
    h, w = dist.shape
    x = (np.arange(w) + 0.5 - K[0, 2]) / K[0, 0]
    y = (np.arange(h) + 0.5 - K[1, 2]) / K[1, 1]
    norm = np.sqrt(x[None, :] ** 2 + y[:, None] ** 2 + 1.0)
    z = dist.astype(np.float64) / norm
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


def _read_h5(path: Path, where: str) -> np.ndarray:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["dataset"][()])
    except FileNotFoundError:
        raise BadSample(where, f"missing file {path}") from None
    except (OSError, KeyError) as e:
        raise BadSample(where, f"unreadable HDF5 {path}: {e}") from None


def _meters_per_asset_unit(path: Path) -> float:
    try:
        with path.open(newline="") as f:
            rows = {r["parameter_name"]: r["parameter_value"] for r in csv.DictReader(f)}
        value = float(rows["meters_per_asset_unit"])
    except FileNotFoundError:
        raise BadSample(str(path), "missing metadata_scene.csv") from None
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise BadSample(str(path), f"no usable meters_per_asset_unit ({type(e).__name__}: {e})") from None
    if not (math.isfinite(value) and value > 0):
        raise BadSample(str(path), f"meters_per_asset_unit must be positive, got {value}")
    return value


class HypersimReader(Reader):
    name = "hypersim"

    def __init__(self, root, camera_csv: Optional[str] = None, depth: bool = True):
        super().__init__(root)
        _h5py()
        self.depth = depth
        csv_path = Path(camera_csv) if camera_csv else self.root / "metadata_camera_parameters.csv"
        self.cam_from_uv: dict[str, np.ndarray] = {}
        if csv_path.exists():
            with csv_path.open(newline="") as f:
                for r in csv.DictReader(f):
                    try:
                        M = [[float(r[f"M_cam_from_uv_{i}{j}"]) for j in range(3)] for i in range(3)]
                    except (KeyError, ValueError, TypeError) as e:
                        raise BadSample(str(csv_path), f"scene {r.get('scene_name')!r}: "
                                        f"bad M_cam_from_uv ({e})") from None
                    self.cam_from_uv[r["scene_name"]] = np.array(M)
        elif camera_csv:
            raise BadSample(str(csv_path), "camera parameter file does not exist")

    def units(self) -> list[tuple[Path, str]]:
        units = []
        for meta in self.root.rglob("metadata_scene.csv"):
            if meta.parent.name != "_detail":
                continue
            scene = meta.parent.parent
            for cam in meta.parent.glob("cam_*"):
                if cam.is_dir():
                    units.append((scene, cam.name))
        if not units:
            raise BadSample(str(self.root), "no HyperSim scene (_detail/metadata_scene.csv with "
                            "cam_XX folders) found")
        return sorted(units, key=lambda u: natural_key(f"{u[0]}/{u[1]}"))

    def read(self, unit: tuple[Path, str], problems: Problems) -> Iterator[Sequence]:
        scene, cam = unit
        scene_id = f"{scene.name}/{cam}"
        detail = scene / "_detail"
        where = f"{scene} ({cam})"
        preview = scene / "images" / f"scene_{cam}_final_preview"
        geometry = scene / "images" / f"scene_{cam}_geometry_hdf5"
        try:
            mpau = _meters_per_asset_unit(detail / "metadata_scene.csv")
            pos = _read_h5(detail / cam / "camera_keyframe_positions.hdf5", where)
            rot = _read_h5(detail / cam / "camera_keyframe_orientations.hdf5", where)
            if pos.ndim != 2 or pos.shape[1:] != (3,) or rot.shape != (len(pos), 3, 3):
                raise BadSample(where, f"keyframe positions {pos.shape} / orientations "
                                f"{rot.shape} are not (N, 3) / (N, 3, 3)")
            if not preview.is_dir():
                raise BadSample(where, f"missing image folder {preview}")
            names = sorted((p.name for p in preview.iterdir() if _FRAME_RE.match(p.name)),
                           key=natural_key)
            if not names:
                raise BadSample(where, f"no frame.IIII.tonemap.jpg in {preview}")
        except BadSample as e:
            problems.sequence(e)
            return
        use_depth = self.depth and geometry.is_dir()
        frames = []
        for name in names:
            i = int(_FRAME_RE.match(name).group(1))
            fwhere = f"{scene} (scene {scene_id!r}) frame {i} ({name})"
            try:
                frames.append(self._frame(scene.name, preview / name, i, pos, rot, mpau,
                                          geometry if use_depth else None, fwhere))
            except BadSample as e:
                problems.frame(e)
        seq = finish_sequence(scene_id, frames, self.name, problems, where)
        if seq is not None:
            yield seq

    def _frame(self, scene_name, path, i, pos, rot, mpau, geometry, where):
        if i >= len(pos):
            raise BadSample(where, f"frame {i} has no keyframe pose ({len(pos)} keyframes)")
        data, size, _ = check_image(read_bytes(path, where), f"{where} {path}")
        h, w = size
        if scene_name in self.cam_from_uv:
            K = intrinsics_from_cam_from_uv(self.cam_from_uv[scene_name], h, w, where)
        else:
            K = default_intrinsics(h, w)
        c2w = np.eye(4)
        c2w[:3, :3] = np.asarray(rot[i], dtype=np.float64) @ np.diag([1.0, -1.0, -1.0])
        c2w[:3, 3] = np.asarray(pos[i], dtype=np.float64) * mpau
        depth = None
        if geometry is not None:
            dist = _read_h5(geometry / f"frame.{i:04d}.depth_meters.hdf5", where)
            if dist.shape != size:
                raise BadSample(where, f"depth_meters shape {dist.shape} differs from the image "
                                f"(H, W)={size}")
            depth = distance_to_planar(dist, K)
        return make_frame(data, K, c2w, i, where, depth=depth, size=size)
