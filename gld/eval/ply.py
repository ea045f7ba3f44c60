"""Coloured point clouds: depth maps to world points, and PLY files.

`write_ply` writes the form every viewer reads (MeshLab, CloudCompare, Open3D, Blender):
one `vertex` element with `float x, y, z` and `uchar red, green, blue`, binary little-endian
(or ASCII). `read_ply` reads back such files, and more generally any PLY whose first element is
`vertex` with scalar properties among them (other properties and later elements are ignored).

Cameras follow the project's conventions (OpenCV axes: x right, y down, z forward; pixel
intrinsics K with pixel centres at +0.5; camera-to-world c2w). Depth is planar z, not ray length.
"""
from __future__ import annotations

import os

import numpy as np

from gld.eval.images import to_uint8, write_atomic

__all__ = ["write_ply", "read_ply", "depth_to_points"]

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
              "float64": "f8"}


def _colors_uint8(colors: np.ndarray, n: int) -> np.ndarray:
    c = np.asarray(colors)
    if c.shape != (n, 3):
        raise ValueError(f"write_ply: colors must be ({n}, 3) to match the points, got {c.shape}")
    if c.dtype == np.uint8:
        return c
    if not np.issubdtype(c.dtype, np.floating):
        raise ValueError(f"write_ply: colors must be uint8 or float in [0, 1], got {c.dtype}")
    return np.round(np.clip(c, 0, 1) * 255).astype(np.uint8)


def write_ply(path: str | os.PathLike, points, colors, binary: bool = True) -> str:
    """Write points (N, 3) float (stored as float32) with colors (N, 3) uint8 or float in [0, 1]
    as a PLY (binary_little_endian 1.0, or ascii 1.0), atomically; returns the path."""
    p = np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"write_ply: points must be (N, 3), got {p.shape}")
    c = _colors_uint8(colors, p.shape[0])
    rec = np.empty(p.shape[0], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                      ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, k in enumerate("xyz"):
        rec[k] = p[:, i]
    for i, k in enumerate(("red", "green", "blue")):
        rec[k] = c[:, i]
    header = ("ply\nformat {} 1.0\ncomment written by gld.eval.ply\nelement vertex {}\n"
              "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
              "property uchar green\nproperty uchar blue\nend_header\n").format(
        "binary_little_endian" if binary else "ascii", p.shape[0])

    def write(f):
        f.write(header.encode("ascii"))
        if binary:
            f.write(rec.tobytes())
        else:  # repr of float32 round-trips exactly through float()
            f.write("".join(f"{repr(float(r['x']))} {repr(float(r['y']))} "
                            f"{repr(float(r['z']))} {r['red']} {r['green']} {r['blue']}\n"
                            for r in rec).encode("ascii"))
    return write_atomic(path, write)


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PLY's vertices: -> (points (N, 3) float32, colors (N, 3) uint8 or None when the
    file has no red/green/blue). ASCII and binary (little or big endian)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"read_ply: {path} is not a PLY file (no 'ply' magic line)")
        fmt, elements = None, []                     # elements: [name, count, [(prop, type)]]
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"read_ply: {path}: header has no end_header")
            words = line.decode("ascii", "replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append([words[1], int(words[2]), []])
            elif words[0] == "property":
                if words[1] == "list" or words[1] not in _PLY_TYPES:
                    raise ValueError(f"read_ply: {path}: unsupported property {' '.join(words)!r}")
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
        if not elements or elements[0][0] != "vertex":
            raise ValueError(f"read_ply: {path}: the first element must be 'vertex', got "
                             f"{[e[0] for e in elements]}")
        _, n, props = elements[0]
        names = [p for p, _ in props]
        if fmt == "ascii":
            rows = [f.readline().split() for _ in range(n)]
            if any(len(r) < len(props) for r in rows):
                raise ValueError(f"read_ply: {path}: fewer than {n} complete vertex lines")
            data = {k: np.array([r[i] for r in rows], dtype=t)
                    for i, (k, t) in enumerate(props)}
        elif fmt in ("binary_little_endian", "binary_big_endian"):
            end = "<" if fmt == "binary_little_endian" else ">"
            dt = np.dtype([(k, end + t) for k, t in props])
            buf = f.read(dt.itemsize * n)
            if len(buf) != dt.itemsize * n:
                raise ValueError(f"read_ply: {path}: truncated, {len(buf)} bytes of vertex data "
                                 f"for {n} vertices of {dt.itemsize} bytes")
            data = np.frombuffer(buf, dtype=dt)
        else:
            raise ValueError(f"read_ply: {path}: unknown format {fmt!r}")
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"read_ply: {path}: vertex has no x, y, z (properties {names})")
    points = np.stack([np.asarray(data[k], np.float32) for k in "xyz"], axis=1)
    colors = None
    if {"red", "green", "blue"} <= set(names):
        colors = np.stack([np.asarray(data[k]).astype(np.uint8)
                           for k in ("red", "green", "blue")], axis=1)
    return points, colors


def depth_to_points(depth, K, c2w, image, mask=None, stride: int = 1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Unproject a depth map to coloured world points.

    Args:
        depth: (H, W) planar z depth; pixels that are not finite or <= 0 are skipped.
        K: (3, 3) pixel intrinsics.  c2w: (4, 4) OpenCV camera-to-world.
        image: (3, H, W) float in [0, 1] (or (H, W, 3)), the colours.
        mask: (H, W) bool, pixels to keep.  stride: keep every stride-th row and column.
    Returns:
        points (M, 3) float32 in world coordinates, colors (M, 3) uint8, for the kept pixels
        in row-major order: pixel (i, j) at (u, v) = (j + 0.5, i + 0.5) maps to
        c2w @ [z K^-1 [u, v, 1], 1]. Computed in float64.
    """
    d = _np64(depth)
    if d.ndim != 2:
        raise ValueError(f"depth_to_points: depth must be (H, W), got {d.shape}")
    H, W = d.shape
    K, c2w = _np64(K), _np64(c2w)
    if K.shape != (3, 3) or c2w.shape != (4, 4):
        raise ValueError(f"depth_to_points: expected K (3, 3) and c2w (4, 4), got {K.shape} and "
                         f"{c2w.shape}")
    rgb = to_uint8(image)
    if rgb.shape[:2] != (H, W):
        raise ValueError(f"depth_to_points: image is {rgb.shape[:2]}, depth is {(H, W)}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"depth_to_points: stride must be an int >= 1, got {stride!r}")
    keep = np.isfinite(d) & (d > 0)
    if mask is not None:
        m = _np64(mask)
        if m.shape != (H, W):
            raise ValueError(f"depth_to_points: mask shape {m.shape} differs from depth {(H, W)}")
        keep &= m.astype(bool)
    v, u = np.mgrid[0:H:stride, 0:W:stride]
    keep = keep[v, u]
    v, u = v[keep], u[keep]
    z = d[v, u]
    pix = np.stack([u + 0.5, v + 0.5, np.ones_like(z)], axis=1)       # (M, 3)
    cam = (pix @ np.linalg.inv(K).T) * z[:, None]
    world = cam @ c2w[:3, :3].T + c2w[:3, 3]
    return world.astype(np.float32), rgb[v, u]


def _np64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
