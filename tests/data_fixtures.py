"""Writers of every supported on-disk format (the inverses of gld/data/formats readers), fed
from the procedural world (gld.data.synthetic), for round-trip and bad-data tests.

Each `write_<format>(seqs, root)` lays `Sequence`s (OpenCV c2w, pixel K, planar depth) out in
that format's exact conventions (OpenGL / NED axes, normalised intrinsics, w2c vs c2w, qvec
order, Euclidean depth, asset units ...). Test-only code.
"""
from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from gld.data.formats.tartanair import NED_TO_OPENCV, TARTANAIR_K, TARTANAIR_SIZE
from gld.data.formats.undistort import undistort_points
from gld.data.schema import Frame, Sequence
from gld.geometry.rotations import rotmat_to_quat

GL = np.diag([1.0, -1.0, -1.0, 1.0])


def encode(rgb: np.ndarray, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
        buf, format="PNG" if fmt == "png" else "JPEG", **({"quality": 90} if fmt != "png" else {}))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def world_sequences(n_scenes: int = 2, n_frames: int = 3, size=(48, 64), fmt: str = "png",
                    depth: bool = True, K: Optional[np.ndarray] = None, seed: int = 7,
                    trajectory: Optional[str] = None) -> list[Sequence]:
    """Scenes of the synthetic world rendered along their trajectories; `K` (3, 3) replaces
    the world's intrinsics (formats with fixed cameras: TartanAir, HyperSim)."""
    from gld.data.synthetic import render, scene_cameras, to_uint8

    out = []
    for s in range(n_scenes):
        scene, Ks, c2w = scene_cameras(seed, s, n_frames, size, trajectory)
        if K is not None:
            Ks = np.tile(np.asarray(K, np.float64), (n_frames, 1, 1))
        rgb, z = render(scene, c2w, Ks, *size)
        rgb8 = to_uint8(rgb)
        frames = [Frame(image=encode(rgb8[i], fmt), K=Ks[i].copy(), c2w=c2w[i].copy(), index=i,
                        depth=z[i].numpy().copy() if depth else None, timestamp=1000 + 33_333 * i)
                  for i in range(n_frames)]
        out.append(Sequence(scene_id=f"scene{s:03d}", frames=frames, source="synthetic"))
    return out


def _size(f: Frame) -> tuple[int, int]:
    h, w = decode(f.image).shape[:2]
    return h, w


def _w2c(c2w: np.ndarray) -> np.ndarray:
    return np.linalg.inv(c2w)


def _re10k_row(f: Frame) -> np.ndarray:
    h, w = _size(f)
    K = f.K
    return np.concatenate([[K[0, 0] / w, K[1, 1] / h, K[0, 2] / w, K[1, 2] / h, 0, 0],
                           _w2c(f.c2w)[:3].reshape(-1)])


# --- RealEstate10K -------------------------------------------------------------------------

def write_re10k_chunks(seqs, root: Path, per_chunk: int = 1) -> None:
    """pixelSplat chunks: float32 cameras, int64 timestamps, uint8 JPEG-byte tensors."""
    root.mkdir(parents=True, exist_ok=True)
    index = {}
    for c in range(0, len(seqs), per_chunk):
        name = f"{c // per_chunk:06d}.torch"
        chunk = []
        for seq in seqs[c:c + per_chunk]:
            chunk.append({
                "url": f"https://example.invalid/{seq.scene_id}",
                "timestamps": torch.tensor([f.timestamp for f in seq.frames], dtype=torch.int64),
                "cameras": torch.tensor(np.stack([_re10k_row(f) for f in seq.frames]),
                                        dtype=torch.float32),
                "key": seq.scene_id,
                "images": [torch.frombuffer(bytearray(f.image), dtype=torch.uint8)
                           for f in seq.frames],
            })
            index[seq.scene_id] = name
        torch.save(chunk, root / name)
    (root / "index.json").write_text(json.dumps(index))


def write_re10k_txt(seqs, root: Path, ext: str = "png") -> None:
    """<scene>.txt (URL line, then timestamp + 18 numbers) + frames/<scene>/<timestamp>.<ext>."""
    root.mkdir(parents=True, exist_ok=True)
    for seq in seqs:
        lines = [f"https://example.invalid/{seq.scene_id}"]
        for f in seq.frames:
            lines.append(" ".join([str(f.timestamp)] + [repr(float(x)) for x in _re10k_row(f)]))
            d = root / "frames" / seq.scene_id
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{f.timestamp}.{ext}").write_bytes(f.image)
        (root / f"{seq.scene_id}.txt").write_text("\n".join(lines) + "\n")


# --- nerfstudio / DL3DV --------------------------------------------------------------------

def write_nerfstudio(seqs, root: Path, factor: int = 4, dist: Optional[dict] = None,
                     image_dir: str = "images_4") -> None:
    """<scene>/transforms.json with intrinsics of a `factor` x larger full-size image,
    OpenGL c2w, file_path images/frame_XXXXX.png; the images themselves in `image_dir`."""
    for seq in seqs:
        scene = root / seq.scene_id
        (scene / image_dir).mkdir(parents=True, exist_ok=True)
        f0 = seq.frames[0]
        h, w = _size(f0)
        K = f0.K * np.array([[factor], [factor], [1]])
        meta = {"w": w * factor, "h": h * factor, "fl_x": K[0, 0], "fl_y": K[1, 1],
                "cx": K[0, 2], "cy": K[1, 2], "camera_model": "OPENCV",
                "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": []}
        meta.update(dist or {})
        for i, f in enumerate(seq.frames):
            name = f"frame_{i + 1:05d}.png"
            (scene / image_dir / name).write_bytes(f.image)
            meta["frames"].append({"file_path": f"images/{name}",
                                   "transform_matrix": (f.c2w @ GL).tolist()})
        meta["frames"].reverse()  # the reader must order by file_path, not list order
        (scene / "transforms.json").write_text(json.dumps(meta, indent=1))


def distort_image(rgb_fn, K: np.ndarray, size, dist: dict) -> np.ndarray:
    """Distorted image whose pixel (u, v) shows `rgb_fn(x, y)` at the undistorted normalised
    coordinates of its centre: (H, W, 3) uint8."""
    h, w = size
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xd, yd = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    x, y = undistort_points(xd, yd, dist)
    return np.clip(np.round(rgb_fn(x, y)), 0, 255).astype(np.uint8)


# --- COLMAP --------------------------------------------------------------------------------

def write_colmap(seqs, root: Path, binary: bool = True, image_dir: str = "images",
                 model: str = "PINHOLE", extra_params=(), ext: str = "png") -> None:
    """<scene>/sparse/0/cameras + images (.bin or .txt), images in <scene>/<image_dir>/.
    One camera per frame; `model` PINHOLE (fx fy cx cy) or OPENCV/SIMPLE_RADIAL with
    `extra_params` appended."""
    model_ids = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4}
    for seq in seqs:
        scene = root / seq.scene_id
        sparse = scene / "sparse" / "0"
        sparse.mkdir(parents=True, exist_ok=True)
        (scene / image_dir).mkdir(parents=True, exist_ok=True)
        cams, imgs = [], []
        for i, f in enumerate(seq.frames):
            h, w = _size(f)
            K = f.K
            if model in ("PINHOLE", "OPENCV"):
                params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2], *extra_params]
            else:
                params = [K[0, 0], K[0, 2], K[1, 2], *extra_params]
            cams.append((i + 1, model, w, h, params))
            w2c = _w2c(f.c2w)
            q = rotmat_to_quat(torch.from_numpy(w2c[:3, :3]), order="wxyz").numpy()
            name = f"IMG_{i:04d}.{ext}"
            (scene / image_dir / name).write_bytes(f.image)
            imgs.append((100 + i, q, w2c[:3, 3], i + 1, name))
        imgs.reverse()  # file order is not name order in real models
        if binary:
            with open(sparse / "cameras.bin", "wb") as fh:
                fh.write(struct.pack("<Q", len(cams)))
                for cid, m, w, h, params in cams:
                    fh.write(struct.pack("<iiQQ", cid, model_ids[m], w, h))
                    fh.write(struct.pack(f"<{len(params)}d", *params))
            with open(sparse / "images.bin", "wb") as fh:
                fh.write(struct.pack("<Q", len(imgs)))
                for iid, q, t, cid, name in imgs:
                    fh.write(struct.pack("<i7di", iid, *q, *t, cid))
                    fh.write(name.encode() + b"\0")
                    pts = [(1.5, 2.5, 7), (3.0, 4.0, -1)]
                    fh.write(struct.pack("<Q", len(pts)))
                    for x, y, pid in pts:
                        fh.write(struct.pack("<ddq", x, y, pid))
        else:
            lines = ["# Camera list with one line of data per camera:"]
            lines += [" ".join([str(cid), m, str(w), str(h)] + [repr(float(p)) for p in params])
                      for cid, m, w, h, params in cams]
            (sparse / "cameras.txt").write_text("\n".join(lines) + "\n")
            lines = ["# Image list with two lines of data per image:"]
            for k, (iid, q, t, cid, name) in enumerate(imgs):
                lines.append(" ".join([str(iid)] + [repr(float(x)) for x in (*q, *t)]
                                      + [str(cid), name]))
                lines.append("" if k % 2 else "1.5 2.5 7 3.0 4.0 -1")
            (sparse / "images.txt").write_text("\n".join(lines) + "\n")


# --- TartanAir -----------------------------------------------------------------------------

def tartanair_K(size) -> np.ndarray:
    h, w = size
    H0, W0 = TARTANAIR_SIZE
    return TARTANAIR_K * np.array([[w / W0], [h / H0], [1.0]])


def write_tartanair(seqs, root: Path) -> None:
    """<scene>/P000/pose_left.txt (NED, tx ty tz qx qy qz qw), image_left, depth_left."""
    for seq in seqs:
        traj = root / seq.scene_id / "Easy" / "P000"
        (traj / "image_left").mkdir(parents=True, exist_ok=True)
        (traj / "depth_left").mkdir(parents=True, exist_ok=True)
        lines = []
        for i, f in enumerate(seq.frames):
            R_ned = f.c2w[:3, :3] @ NED_TO_OPENCV.T
            q = rotmat_to_quat(torch.from_numpy(R_ned), order="xyzw").numpy()
            lines.append(" ".join(repr(float(x)) for x in (*f.c2w[:3, 3], *q)))
            (traj / "image_left" / f"{i:06d}_left.png").write_bytes(f.image)
            np.save(traj / "depth_left" / f"{i:06d}_left_depth.npy", f.depth.astype(np.float32))
        (traj / "pose_left.txt").write_text("\n".join(lines) + "\n")


# --- HyperSim ------------------------------------------------------------------------------

def hypersim_K(size, hfov_deg: float = 60.0) -> np.ndarray:
    h, w = size
    f = w / (2 * math.tan(math.radians(hfov_deg) / 2))
    return np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])


def write_hypersim(seqs, root: Path, meters_per_asset_unit: float = 0.0254) -> None:
    """<scene>/_detail/{metadata_scene.csv, cam_00/camera_keyframe_*.hdf5},
    images/scene_cam_00_final_preview/frame.IIII.tonemap.jpg and
    images/scene_cam_00_geometry_hdf5/frame.IIII.depth_meters.hdf5 (Euclidean distance)."""
    import h5py

    for seq in seqs:
        scene = root / f"ai_001_{seq.scene_id[-3:]}"
        detail = scene / "_detail"
        cam = detail / "cam_00"
        cam.mkdir(parents=True, exist_ok=True)
        (detail / "metadata_scene.csv").write_text(
            f"parameter_name,parameter_value\nmeters_per_asset_unit,{meters_per_asset_unit!r}\n")
        pos = np.stack([f.c2w[:3, 3] / meters_per_asset_unit for f in seq.frames])
        rot = np.stack([f.c2w[:3, :3] @ np.diag([1.0, -1.0, -1.0]) for f in seq.frames])
        with h5py.File(cam / "camera_keyframe_positions.hdf5", "w") as fh:
            fh["dataset"] = pos
        with h5py.File(cam / "camera_keyframe_orientations.hdf5", "w") as fh:
            fh["dataset"] = rot
        prev = scene / "images" / "scene_cam_00_final_preview"
        geo = scene / "images" / "scene_cam_00_geometry_hdf5"
        prev.mkdir(parents=True, exist_ok=True)
        geo.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(seq.frames):
            (prev / f"frame.{i:04d}.tonemap.jpg").write_bytes(f.image)
            h, w = f.depth.shape
            x = (np.arange(w) + 0.5 - f.K[0, 2]) / f.K[0, 0]
            y = (np.arange(h) + 0.5 - f.K[1, 2]) / f.K[1, 1]
            norm = np.sqrt(x[None] ** 2 + y[:, None] ** 2 + 1)
            with h5py.File(geo / f"frame.{i:04d}.depth_meters.hdf5", "w") as fh:
                fh["dataset"] = (f.depth.astype(np.float64) * norm).astype(np.float32)


# --- folder of images + npz ----------------------------------------------------------------

def write_npz_folder(seqs, root: Path, ext: str = "png") -> None:
    for seq in seqs:
        d = root / seq.scene_id
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(seq.frames):
            (d / f"frame_{i}.{ext}").write_bytes(f.image)
            extra = {"depth": f.depth} if f.depth is not None else {}
            np.savez(d / f"frame_{i}.npz", intrinsic=f.K, pose=f.c2w, **extra)
