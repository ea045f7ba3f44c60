"""DL3DV and other nerfstudio `transforms.json` scenes (`nerfstudio`, alias `dl3dv`).

Input: a scene folder holding `transforms.json`, or a folder searched recursively for them
(DL3DV: `<root>/<scene>/transforms.json` + `<scene>/images_4/frame_00001.png`).
`transforms.json`: `w, h, fl_x, fl_y, cx, cy` (pixels of the full-size `w x h` image, pixel
centres at +0.5 as COLMAP), distortion `k1, k2, (k3,) p1, p2` (OpenCV model, normalised
coordinates), `camera_model` (OPENCV / PINHOLE / SIMPLE_PINHOLE; fisheye and equirectangular
are refused), every key optionally overridden per frame; `frames[].file_path` (relative to the
scene) and `frames[].transform_matrix` = camera-to-world with OpenGL camera axes (x right,
y up, z back): columns 1 and 2 of the rotation are negated to get OpenCV axes. The world frame
(nerfstudio's, `applied_transform` already folded in) is kept as it is.

Images: `image_dir=None` reads `file_path` itself, or where that is missing the first of
`images_4`, `images_2`, `images_8` in place of its leading `images/` (DL3DV ships `images_4`
while `file_path` says `images/...`); `image_dir="images_4"` forces one. The intrinsics are
scaled to the size of the image actually read (W'/w, H'/h; the two ratios must agree to 2%).
Frames are ordered by `file_path` (natural sort); `index` is that order.

Distortion: when any of k1, k2, k3, p1, p2 is non-zero the image is undistorted onto a pinhole
camera with the SAME (scaled) K (`undistort.undistort_image`: exact forward map, bilinear,
out-of-image pixels black) and stored as PNG; with all zero the source bytes are stored as
they are, bit-exact. The stored K is therefore always the pinhole K of the stored pixels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from gld.data.formats.common import (
    BadSample, Problems, Reader, check_image, finish_sequence, fit_intrinsics, intrinsics,
    make_frame, natural_key, read_bytes, undistorted,
)
from gld.data.schema import Sequence

__all__ = ["NerfstudioReader", "OPENGL_TO_OPENCV"]

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])  # right-multiply c2w: flips camera y, z
_DIST_KEYS = ("k1", "k2", "k3", "p1", "p2")
_CAM_KEYS = ("w", "h", "fl_x", "fl_y", "cx", "cy", "camera_model") + _DIST_KEYS
_OK_MODELS = {"OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "PERSPECTIVE"}
_FALLBACK_DIRS = ("images_4", "images_2", "images_8")


class NerfstudioReader(Reader):
    name = "nerfstudio"

    def __init__(self, root, image_dir: Optional[str] = None):
        super().__init__(root)
        self.image_dir = image_dir

    def units(self) -> list[Path]:
        return self.scene_folders("transforms.json", "transforms.json")

    def _resolve(self, scene: Path, file_path: str, chosen: dict) -> Path:
        rel = Path(file_path)
        if self.image_dir:
            return scene / self.image_dir / Path(*rel.parts[1:]) if len(rel.parts) > 1 else \
                scene / self.image_dir / rel
        if "dir" not in chosen:  # decided once per scene, from its first frame
            chosen["dir"] = None
            if not (scene / rel).exists() and len(rel.parts) > 1:
                for d in _FALLBACK_DIRS:
                    if (scene / d / Path(*rel.parts[1:])).exists():
                        chosen["dir"] = d
                        break
        if chosen["dir"] is None:
            return scene / rel
        return scene / chosen["dir"] / Path(*rel.parts[1:])

    def read(self, scene: Path, problems: Problems) -> Iterator[Sequence]:
        tf_path = scene / "transforms.json"
        try:
            try:
                meta = json.loads(tf_path.read_text())
            except (OSError, ValueError) as e:
                raise BadSample(str(tf_path), f"unreadable transforms.json: {e}") from None
            frames_meta = meta.get("frames")
            if not isinstance(frames_meta, list) or not frames_meta:
                raise BadSample(str(tf_path), "no frames[] list")
        except BadSample as e:
            problems.sequence(e)
            return
        scene_id = self.scene_id(scene)
        order = sorted(range(len(frames_meta)),
                       key=lambda i: natural_key(str(frames_meta[i].get("file_path", ""))))
        chosen: dict = {}
        frames = []
        for index, i in enumerate(order):
            fm = frames_meta[i]
            fwhere = f"{tf_path} (scene {scene_id!r}) frame {i} ({fm.get('file_path')!r})"
            try:
                frames.append(self._frame(scene, meta, fm, index, fwhere, chosen))
            except BadSample as e:
                problems.frame(e)
        seq = finish_sequence(scene_id, frames, self.name, problems, str(tf_path))
        if seq is not None:
            yield seq

    def _frame(self, scene: Path, meta: dict, fm: dict, index: int, where: str, chosen: dict):
        cam = {k: fm.get(k, meta.get(k)) for k in _CAM_KEYS}
        model = str(cam["camera_model"] or "OPENCV").upper()
        if model not in _OK_MODELS:
            raise BadSample(where, f"camera_model {model!r} is not supported "
                            f"(supported: {sorted(_OK_MODELS)})")
        if fm.get("k4", meta.get("k4", 0)) not in (0, 0.0, None):
            raise BadSample(where, "k4 (fisheye / thin-prism term) is not supported")
        for k in ("fl_x", "fl_y", "cx", "cy"):
            if cam[k] is None:
                raise BadSample(where, f"missing intrinsic {k!r}")
        if "file_path" not in fm or "transform_matrix" not in fm:
            raise BadSample(where, "frame needs file_path and transform_matrix")
        try:
            c2w_gl = np.asarray(fm["transform_matrix"], dtype=np.float64)
            K = intrinsics(float(cam["fl_x"]), float(cam["fl_y"]), float(cam["cx"]),
                           float(cam["cy"]))
            dist = {k: float(cam[k] or 0.0) for k in _DIST_KEYS}
        except (TypeError, ValueError) as e:
            raise BadSample(where, f"non-numeric camera values: {e}") from None
        if c2w_gl.shape == (3, 4):
            c2w_gl = np.concatenate([c2w_gl, [[0, 0, 0, 1]]], axis=0)
        if c2w_gl.shape != (4, 4):
            raise BadSample(where, f"transform_matrix must be 4x4 or 3x4, got {c2w_gl.shape}")
        path = self._resolve(scene, str(fm["file_path"]), chosen)
        data, size, rgb = check_image(read_bytes(path, where), f"{where} {path}")
        if cam["w"] is not None and cam["h"] is not None:
            K = fit_intrinsics(K, (int(cam["h"]), int(cam["w"])), size, where,
                               "transforms.json", path)
        data = undistorted(data, rgb, K, dist, where)
        return make_frame(data, K, c2w_gl @ OPENGL_TO_OPENCV, index, where, size=size)
