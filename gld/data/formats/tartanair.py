"""TartanAir (v1) trajectories (`tartanair`).

Input: a trajectory folder, or a folder searched recursively for them (`<env>/<Easy|Hard>/Pxxx`).
A trajectory holds `pose_left.txt` (line i = frame i: `tx ty tz qx qy qz qw`, camera-to-world
in NED: camera body x forward, y right, z down, world NED), `image_left/{i:06d}_left.png` and,
when present, `depth_left/{i:06d}_left_depth.npy` ((H, W) float32 planar depth in metres).

Conversion: R_ned = quat(qx, qy, qz, qw) (scalar last); OpenCV camera axes (x right = body y,
y down = body z, z forward = body x): R_cv = R_ned @ [[0,0,1],[1,0,0],[0,1,0]]; the centre and
the (NED) world frame are kept. Intrinsics: fx = fy = 320, cx = 320, cy = 240 at 640 x 480
(TartanAir's pinhole camera), scaled to the image size actually read. Depth is already planar z.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gld.data.formats.common import (
    BadSample, Problems, Reader, check_image, finish_sequence, intrinsics, make_frame, read_bytes,
    scale_intrinsics,
)
from gld.data.schema import Sequence
from gld.geometry.rotations import quat_to_rotmat

__all__ = ["TartanAirReader", "NED_TO_OPENCV", "TARTANAIR_K", "TARTANAIR_SIZE"]

NED_TO_OPENCV = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])  # R_cv = R_ned @ this
TARTANAIR_K = intrinsics(320.0, 320.0, 320.0, 240.0)
TARTANAIR_SIZE = (480, 640)  # (H, W)


def read_poses(path: Path) -> np.ndarray:
    """pose_left.txt -> (N, 7) float64, a clear error on a malformed line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise BadSample(str(path), f"unreadable: {e}") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 7:
            raise BadSample(f"{path} line {n}", f"expected 7 numbers tx ty tz qx qy qz qw, got "
                            f"{len(parts)}")
        try:
            rows.append([float(p) for p in parts])
        except ValueError as e:
            raise BadSample(f"{path} line {n}", f"not a number: {e}") from None
    return np.asarray(rows, dtype=np.float64).reshape(-1, 7)


class TartanAirReader(Reader):
    name = "tartanair"

    def __init__(self, root, depth: bool = True):
        super().__init__(root)
        self.depth = depth

    def units(self) -> list[Path]:
        return self.scene_folders("pose_left.txt", "pose_left.txt")

    def read(self, traj: Path, problems: Problems) -> Iterator[Sequence]:
        scene_id = self.scene_id(traj)
        pose_path = traj / "pose_left.txt"
        try:
            poses = read_poses(pose_path)
            if len(poses) == 0:
                raise BadSample(str(pose_path), "no poses")
        except BadSample as e:
            problems.sequence(e)
            return
        use_depth = self.depth and (traj / "depth_left").is_dir()
        frames = []
        for i, row in enumerate(poses):
            fwhere = f"{pose_path} (scene {scene_id!r}) frame {i}"
            try:
                frames.append(self._frame(traj, i, row, use_depth, fwhere))
            except BadSample as e:
                problems.frame(e)
        seq = finish_sequence(scene_id, frames, self.name, problems, str(pose_path))
        if seq is not None:
            yield seq

    def _frame(self, traj: Path, i: int, row: np.ndarray, use_depth: bool, where: str):
        if not np.isfinite(row).all():
            raise BadSample(where, f"non-finite pose {row.tolist()}")
        q = row[3:]
        qn = float(np.linalg.norm(q))
        if abs(qn - 1) > 1e-3:
            raise BadSample(where, f"quaternion {q.tolist()} is not unit (|q|={qn:.6g})")
        c2w = np.eye(4)
        c2w[:3, :3] = quat_to_rotmat(torch.from_numpy(q), order="xyzw").numpy() @ NED_TO_OPENCV
        c2w[:3, 3] = row[:3]
        path = traj / "image_left" / f"{i:06d}_left.png"
        data, size, _ = check_image(read_bytes(path, where), f"{where} {path}")
        K = scale_intrinsics(TARTANAIR_K, TARTANAIR_SIZE, size)
        depth = None
        if use_depth:
            dpath = traj / "depth_left" / f"{i:06d}_left_depth.npy"
            try:
                depth = np.load(dpath, allow_pickle=False)
            except FileNotFoundError:
                raise BadSample(where, f"missing depth {dpath}") from None
            except (OSError, ValueError) as e:
                raise BadSample(where, f"unreadable depth {dpath}: {e}") from None
        return make_frame(data, K, c2w, i, where, depth=depth, size=size)
