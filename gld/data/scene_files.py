"""One scene folder's frames and camera files, for sampling and evaluation (not training).

A scene folder is in the `npz_folder` format (gld/data/formats/npz_folder.py): `<name>.png|jpg|
jpeg|webp` beside `<name>.npz` with `intrinsic` (3, 3) pixels and `pose` (4, 4) or (3, 4)
OpenCV camera-to-world, optionally `depth`. Frames are named by their file stem.

A target-camera file lists cameras without images: `.npz` with `intrinsic` (T, 3, 3), `pose`
(T, 4, 4) and optionally `names` (T,) and `size` (2,) = (H, W) the intrinsics are for; or
`.json` {"size": [H, W], "cameras": [{"name", "intrinsic": 3x3, "pose": 4x4}, ...]}.

Every error is a `SceneError` naming the file and what is wrong with it: a missing frame (with
the frames that exist), an unreadable image or npz, a pose that is not a rigid transform,
intrinsics that do not fit the image, sizes that differ between frames or do not fit the
encoder's patch grid.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gld.data.formats.common import IMAGE_EXTS, BadSample, check_camera, decode_rgb, natural_key
from gld.data.schema import DataError

__all__ = ["SceneError", "SceneViews", "scene_frames", "read_scene_views",
           "read_target_cameras"]


class SceneError(DataError):
    """A scene folder or camera file that cannot be used; the message names the file."""


@dataclass
class SceneViews:
    """names (n,); images (n, 3, H, W) float32 in [0, 1] (None for a camera file); K (n, 3, 3)
    pixel intrinsics at (H, W); c2w (n, 4, 4) OpenCV; depth (n, H, W) or None; size (H, W)."""

    names: list[str]
    images: Optional[np.ndarray]
    K: np.ndarray
    c2w: np.ndarray
    depth: Optional[np.ndarray]
    size: tuple[int, int]


def scene_frames(scene: Path) -> dict[str, tuple[Path, Path]]:
    """{stem: (image, npz)} of the frames that have both, natural name order."""
    scene = Path(scene)
    if not scene.is_dir():
        raise SceneError(f"{scene}: scene folder not found")
    images = {p.stem: p for p in scene.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    npzs = {p.stem: p for p in scene.glob("*.npz")}
    both = sorted(set(images) & set(npzs), key=natural_key)
    return {s: (images[s], npzs[s]) for s in both}


def _check_patch(size: tuple[int, int], patch: int, where: str) -> None:
    if size[0] % patch or size[1] % patch:
        raise SceneError(f"{where}: image size {size[0]}x{size[1]} (HxW) does not fit the "
                         f"patch grid: both sides must be multiples of {patch} (resize or crop "
                         "the frames first)")


def read_scene_views(scene: Path, names: Sequence[str], patch: int = 14) -> SceneViews:
    """The frames `names` of a scene folder, checked (see the module doc)."""
    scene = Path(scene)
    frames = scene_frames(scene)
    imgs, Ks, poses, depths, size = [], [], [], [], None
    for name in names:
        if name not in frames:
            have = ", ".join(list(frames)[:20]) or "none"
            raise SceneError(f"{scene}: no frame {name!r} (an image and {name}.npz); frames "
                             f"there: {have}")
        image_path, npz_path = frames[name]
        try:
            rgb = decode_rgb(image_path.read_bytes())
        except Exception as e:  # PIL raises many types for corrupt data
            raise SceneError(f"{image_path}: image does not decode ({type(e).__name__}: "
                             f"{e})") from None
        hw = rgb.shape[:2]
        if size is None:
            size = hw
            _check_patch(size, patch, str(image_path))
        elif hw != size:
            raise SceneError(f"{image_path}: size {hw[0]}x{hw[1]} differs from the first frame's "
                             f"{size[0]}x{size[1]} (HxW); all views must have one size")
        try:
            with np.load(npz_path, allow_pickle=False) as z:
                if "intrinsic" not in z or "pose" not in z:
                    raise SceneError(f"{npz_path}: needs 'intrinsic' and 'pose', has "
                                     f"{sorted(z.files)}")
                K, pose = z["intrinsic"], z["pose"]
                depth = z["depth"] if "depth" in z else None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise SceneError(f"{npz_path}: unreadable npz ({e})") from None
        try:
            K, pose = check_camera(K, pose, size, str(npz_path))
        except BadSample as e:
            raise SceneError(str(e)) from None
        imgs.append(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)
        Ks.append(K)
        poses.append(pose)
        depths.append(depth)
    has_depth = all(d is not None for d in depths) and bool(depths)
    return SceneViews(list(names), np.stack(imgs), np.stack(Ks), np.stack(poses),
                      np.stack(depths).astype(np.float32) if has_depth else None, size)


def _from_json(path: Path) -> tuple[list, list, list, Optional[list]]:
    try:
        data = json.loads(path.read_text())
        cams = data["cameras"]
        names = [str(c.get("name", i)) for i, c in enumerate(cams)]
        return names, [c["intrinsic"] for c in cams], [c["pose"] for c in cams], data.get("size")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SceneError(f"{path}: not a camera file ({type(e).__name__}: {e}); expected "
                         '{"size": [H, W], "cameras": [{"name", "intrinsic", "pose"}, ...]}') \
            from None


def _from_npz(path: Path) -> tuple[list, np.ndarray, np.ndarray, Optional[list]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "intrinsic" not in z or "pose" not in z:
                raise SceneError(f"{path}: needs 'intrinsic' (T, 3, 3) and 'pose' (T, 4, 4), "
                                 f"has {sorted(z.files)}")
            K, pose = np.asarray(z["intrinsic"]), np.asarray(z["pose"])
            names = [str(n) for n in z["names"]] if "names" in z else None
            size = z["size"].tolist() if "size" in z else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SceneError(f"{path}: unreadable npz ({e})") from None
    if K.ndim == 2:
        K, pose = K[None], pose[None]
    return names or [f"cam{i}" for i in range(len(K))], K, pose, size


def read_target_cameras(path: Path, size: tuple[int, int], patch: int = 14) -> SceneViews:
    """Target cameras from a file (see the module doc), checked at image size `size` (H, W);
    a file that states another size is an error."""
    path = Path(path)
    if not path.is_file():
        raise SceneError(f"{path}: camera file not found")
    if path.suffix == ".json":
        names, K, pose, stated = _from_json(path)
    elif path.suffix == ".npz":
        names, K, pose, stated = _from_npz(path)
    else:
        raise SceneError(f"{path}: unknown camera file type {path.suffix!r}; use .npz or .json")
    if stated is not None and tuple(int(s) for s in stated) != tuple(size):
        raise SceneError(f"{path}: cameras are for size {tuple(stated)} (HxW), the source "
                         f"images are {tuple(size)}")
    _check_patch(tuple(size), patch, str(path))
    if len(names) != len(K) or len(K) != len(pose) or len(K) == 0:
        raise SceneError(f"{path}: {len(K)} intrinsics, {len(pose)} poses and {len(names)} "
                         "names; expected the same positive number")
    Ks, poses = [], []
    for i, (k, p) in enumerate(zip(K, pose)):
        try:
            k, p = check_camera(np.asarray(k, np.float64), np.asarray(p, np.float64), size,
                                f"{path} camera {i} ({names[i]})")
        except BadSample as e:
            raise SceneError(str(e)) from None
        except ValueError as e:      # wrong shapes
            raise SceneError(f"{path} camera {i} ({names[i]}): {e}") from None
        Ks.append(k)
        poses.append(p)
    return SceneViews(names, None, np.stack(Ks), np.stack(poses), None, tuple(size))
