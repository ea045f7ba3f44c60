"""A procedural, textured 3D world ray-cast in torch: the built-in default dataset.

A scene is a closed room (floor, ceiling, four walls) holding axis-aligned boxes and spheres,
each surface with a procedural solid texture (checker, stripes or a sum of sinusoids mixing two
colours), lit by a point light plus ambient light. Rendering is exact ray casting (no meshes):
colours come from 3D positions, so every view of a scene is consistent, and depth is the exact
planar z of the first hit.

Trajectories imitate the real datasets: "walk" (forward motion through the room at eye height,
RealEstate10K-like), "orbit" (around the central object, looking at it: Mip-NeRF 360 / DL3DV),
"random" (smoothly interpolated random positions and gaze: TartanAir / HyperSim-like).
Everything is a pure function of (seed, scene index).

World frame: y up, the floor at y = 0. Cameras: OpenCV camera-to-world float64 (x right,
y down, z forward); intrinsics in pixels, square pixels, principal point at the image centre.

API:
- `make_scene(seed, index) -> Scene`, `make_trajectory(scene, kind, num_frames, rng)`
- `render(scene, c2w (V,4,4), K (V,3,3), height, width) -> (rgb (V,H,W,3) float32 in [0,1],
  depth (V,H,W) float32)`
- `synthetic_sequence(seed, index, num_frames, size, ...) -> Sequence` (encoded frames)
- `synthetic_sequences(num_scenes, ...)` iterates those (input of the shard writers);
  `SyntheticSequences(num_scenes, ...)` is the same as a map-style torch Dataset.
- Training batches straight from the world (no shards): `data.source: synthetic` in the config
  (gld/data/streaming.py renders only the chosen views, at the batch's resolution).
- `scene_cameras(seed, index, num_frames, size) -> (scene, K, c2w)` for direct rendering.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.utils.data

from gld.data.schema import Frame, Sequence

__all__ = ["Scene", "SyntheticSequences", "make_scene", "make_trajectory", "render", "intrinsics_for",
           "scene_cameras", "synthetic_sequence", "synthetic_sequences", "TRAJECTORIES"]

TRAJECTORIES = ("walk", "orbit", "random")
_EPS = 1e-4


@dataclass
class Scene:
    """Room half extents / height, primitives and materials (all float32 tensors).

    room_lo, room_hi: (3,) room corners. boxes: (nb, 2, 3) lo/hi corners. spheres: (ns, 4)
    centre + radius. Materials: one row per surface id (6 room faces, then boxes, then spheres):
    color_a, color_b (M, 3), kind (M,) 0 checker / 1 stripes / 2 waves, freq (M,),
    axis (M, 3) stripe/wave direction, phase (M,). light: (3,) point light position.
    """

    room_lo: torch.Tensor
    room_hi: torch.Tensor
    boxes: torch.Tensor
    spheres: torch.Tensor
    color_a: torch.Tensor
    color_b: torch.Tensor
    kind: torch.Tensor
    freq: torch.Tensor
    axis: torch.Tensor
    phase: torch.Tensor
    light: torch.Tensor
    trajectory: str = "walk"
    fov_deg: float = 60.0


def _materials(rng: np.random.Generator, m: int):
    hue = rng.uniform(0, 1, (m, 1))
    base = 0.5 + 0.45 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    color_a = np.clip(base * rng.uniform(0.6, 1.0, (m, 1)), 0, 1)
    color_b = np.clip(color_a * rng.uniform(0.2, 0.6, (m, 1)) + rng.uniform(0, 0.25, (m, 3)), 0, 1)
    axis = rng.normal(size=(m, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return dict(color_a=color_a, color_b=color_b, kind=rng.integers(0, 3, m),
                freq=rng.uniform(1.0, 4.0, m), axis=axis, phase=rng.uniform(0, 2 * np.pi, m))


def make_scene(seed: int, index: int, trajectory: Optional[str] = None) -> Scene:
    """Scene `index` of the world `seed` (deterministic). The trajectory kind cycles through
    TRAJECTORIES with the index unless given. The camera path (made by `make_trajectory`) is
    kept free of objects: boxes and spheres sit inside the room, away from the walk line and
    the orbit ring."""
    rng = np.random.default_rng([int(seed), int(index), 7])
    kind = trajectory or TRAJECTORIES[index % len(TRAJECTORIES)]
    hx, hz, height = rng.uniform(4.0, 6.5), rng.uniform(4.0, 6.5), rng.uniform(2.6, 3.4)
    boxes, spheres = [], []
    # Central object: the orbit target, also visible from the walks.
    if rng.uniform() < 0.5:
        r = rng.uniform(0.4, 0.7)
        spheres.append([0.0, r + rng.uniform(0.0, 0.5), 0.0, r])
    else:
        s = rng.uniform(0.35, 0.6, 3)
        s[1] = rng.uniform(0.4, 0.9)
        boxes.append([[-s[0], 0.0, -s[2]], [s[0], 2 * s[1], s[2]]])
    # Clutter in the outer ring (radius > 3.2 from the centre, away from the walk line z ~ 1.6).
    for _ in range(int(rng.integers(3, 7))):
        for _try in range(20):
            x, z = rng.uniform(-hx + 0.5, hx - 0.5), rng.uniform(-hz + 0.5, hz - 0.5)
            if math.hypot(x, z) > 3.3 and abs(z - 1.6) > 1.2:
                break
        if rng.uniform() < 0.5:
            r = rng.uniform(0.25, 0.5)
            spheres.append([x, r if rng.uniform() < 0.6 else rng.uniform(r, height - r), z, r])
        else:
            sx, sy, sz = rng.uniform(0.2, 0.5), rng.uniform(0.2, 1.2), rng.uniform(0.2, 0.5)
            boxes.append([[x - sx, 0.0, z - sz], [x + sx, sy * 2, z + sz]])
    m = 6 + len(boxes) + len(spheres)
    mat = _materials(rng, m)
    f32 = lambda a, shape: torch.tensor(np.asarray(a, np.float64).reshape(shape), dtype=torch.float32)
    return Scene(
        room_lo=f32([-hx, 0.0, -hz], (3,)), room_hi=f32([hx, height, hz], (3,)),
        boxes=f32(boxes, (-1, 2, 3)), spheres=f32(spheres, (-1, 4)),
        color_a=f32(mat["color_a"], (m, 3)), color_b=f32(mat["color_b"], (m, 3)),
        kind=torch.tensor(mat["kind"]), freq=f32(mat["freq"], (m,)), axis=f32(mat["axis"], (m, 3)),
        phase=f32(mat["phase"], (m,)), light=f32([rng.uniform(-1, 1), height - 0.2,
                                                   rng.uniform(-1, 1)], (3,)),
        trajectory=kind, fov_deg=float(rng.uniform(50, 75)),
    )


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """(N, 3) eyes, (N, 3) targets -> (N, 4, 4) float64 OpenCV camera-to-world."""
    eye, target = np.atleast_2d(eye).astype(np.float64), np.atleast_2d(target).astype(np.float64)
    z = target - eye
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    x = np.cross(z, np.asarray(up, np.float64))  # right = forward x up (y is down)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.cross(z, x)
    T = np.tile(np.eye(4), (len(eye), 1, 1))
    T[:, :3, 0], T[:, :3, 1], T[:, :3, 2], T[:, :3, 3] = x, y, z, eye
    return T


def make_trajectory(scene: Scene, kind: str, num_frames: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(num_frames, 4, 4) float64 OpenCV camera-to-world along a smooth path of `kind`."""
    n = num_frames
    s = np.linspace(0.0, 1.0, n)[:, None]
    hx, height, hz = float(scene.room_hi[0]), float(scene.room_hi[1]), float(scene.room_hi[2])
    eye_h = rng.uniform(1.2, 1.7)
    if kind == "walk":
        span = rng.uniform(0.5, 0.8) * (hx - 0.8)
        direction = rng.choice([-1.0, 1.0])
        x = direction * (-span + 2 * span * s[:, 0])
        z = 1.6 + 0.15 * np.sin(2 * np.pi * s[:, 0] * rng.uniform(0.5, 1.5))
        eye = np.stack([x, eye_h + 0.03 * np.sin(9 * s[:, 0]), z], -1)
        yaw = rng.uniform(-0.5, 0.5) + 0.25 * np.sin(2 * np.pi * s[:, 0] + rng.uniform(0, 6.3))
        fwd = np.stack([direction * np.cos(yaw), -0.1 + 0 * yaw, -np.sin(yaw) - 0.3], -1)
        target = eye + fwd
    elif kind == "orbit":
        r = rng.uniform(2.0, 2.8)
        a0, arc = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.0) * 2 * np.pi * rng.choice([-1, 1])
        a = a0 + arc * s[:, 0]
        h = eye_h + 0.3 * np.sin(2 * np.pi * s[:, 0])
        eye = np.stack([r * np.cos(a), h, r * np.sin(a)], -1)
        target = np.tile([0.0, 0.5, 0.0], (n, 1)) + rng.normal(0, 0.05, (n, 3))
    elif kind == "random":
        # Knots in (angle, radius, height) around the centre: the eye stays in the annulus
        # between the central object and the clutter; gaze targets wander independently.
        k = 5
        ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.uniform(0.2, 0.6, k)) * rng.choice([-1, 1])
        rad, hgt = rng.uniform(1.6, 2.8, k), rng.uniform(0.9, height - 0.6, k)
        looks = np.stack([rng.uniform(-hx, hx, k), rng.uniform(0.2, height - 0.2, k),
                          rng.uniform(-hz, hz, k)], -1)
        t = np.linspace(0, k - 1, n)
        a, r, h = (np.interp(t, np.arange(k), v) for v in (ang, rad, hgt))
        eye = np.stack([r * np.cos(a), h, r * np.sin(a)], -1)
        target = np.stack([np.interp(t, np.arange(k), looks[:, j]) for j in range(3)], -1)
        near = np.linalg.norm(target - eye, axis=-1) < 0.5
        target[near] = eye[near] + [1.0, 0.0, 0.0]
    else:
        raise ValueError(f"trajectory kind must be one of {TRAJECTORIES}, got {kind!r}")
    return look_at(eye, target)


def intrinsics_for(fov_deg: float, height: int, width: int) -> np.ndarray:
    """(3, 3) float64 pixel intrinsics: horizontal field of view, square pixels, centred."""
    f = width / (2.0 * math.tan(math.radians(fov_deg) / 2))
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def _pattern(p: torch.Tensor, kind: torch.Tensor, freq: torch.Tensor, axis: torch.Tensor,
             phase: torch.Tensor) -> torch.Tensor:
    """Texture weight in [0, 1] at hit points p (..., 3) with per-point material rows."""
    fp = p * freq[..., None]
    checker = (torch.floor(fp).sum(-1).remainder(2.0))
    proj = (fp * axis).sum(-1)
    stripes = 0.5 + 0.5 * torch.sin(3.0 * proj + phase)
    waves = 0.5 + 0.25 * torch.sin(2.0 * proj + phase) + 0.25 * torch.sin(5.0 * fp[..., 0] + 3.0 * fp[..., 2] - 2.0 * fp[..., 1])
    out = torch.where(kind == 0, checker, torch.where(kind == 1, stripes, waves))
    return out.clamp(0, 1)


@torch.no_grad()
def render(scene: Scene, c2w, K, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-cast V views. c2w (V, 4, 4), K (V, 3, 3) (numpy or torch, pixels at this size)
    -> rgb (V, H, W, 3) float32 in [0, 1], depth (V, H, W) float32 planar z (exact hits)."""
    c2w = torch.as_tensor(np.asarray(c2w), dtype=torch.float64)
    K = torch.as_tensor(np.asarray(K), dtype=torch.float64)
    v = torch.arange(height, dtype=torch.float64) + 0.5
    u = torch.arange(width, dtype=torch.float64) + 0.5
    pix = torch.stack([u[None, :].expand(height, width), v[:, None].expand(height, width),
                       torch.ones(height, width, dtype=torch.float64)], -1)  # (H, W, 3)
    # Unnormalised directions with camera z = 1: the hit distance t is the planar depth.
    cam = pix @ torch.linalg.inv(K).transpose(-1, -2)[:, None]  # (V, H, W, 3)
    d = (cam @ c2w[:, None, :3, :3].transpose(-1, -2)).float()
    o = c2w[:, :3, 3].float()[:, None, None, :].expand_as(d)
    d_safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    inv = 1.0 / d_safe
    # Room, seen from inside: nearest exit plane.
    t_hi, t_lo = (scene.room_hi - o) * inv, (scene.room_lo - o) * inv
    t_axis = torch.where(d_safe > 0, t_hi, t_lo)
    t, ax = t_axis.min(-1)
    surf = ax * 2 + (d_safe.gather(-1, ax[..., None])[..., 0] > 0).long()  # 0..5
    normal = torch.zeros_like(d)
    normal.scatter_(-1, ax[..., None], -torch.sign(d_safe.gather(-1, ax[..., None])))
    sid = 6
    for b in range(scene.boxes.shape[0]):
        t1, t2 = (scene.boxes[b, 0] - o) * inv, (scene.boxes[b, 1] - o) * inv
        tmin_ax, tmax = torch.minimum(t1, t2), torch.maximum(t1, t2).min(-1).values
        tmin, axb = tmin_ax.max(-1)
        hit = (tmin <= tmax) & (tmin > _EPS) & (tmin < t)
        t = torch.where(hit, tmin, t)
        surf = torch.where(hit, torch.full_like(surf, sid + b), surf)
        nb = torch.zeros_like(d).scatter_(-1, axb[..., None],
                                          -torch.sign(d_safe.gather(-1, axb[..., None])))
        normal = torch.where(hit[..., None], nb, normal)
    sid += scene.boxes.shape[0]
    for s in range(scene.spheres.shape[0]):
        c, r = scene.spheres[s, :3], scene.spheres[s, 3]
        oc = o - c
        a = (d * d).sum(-1)
        bq = (d * oc).sum(-1)
        disc = bq * bq - a * ((oc * oc).sum(-1) - r * r)
        ts = (-bq - disc.clamp_min(0).sqrt()) / a
        hit = (disc > 0) & (ts > _EPS) & (ts < t)
        t = torch.where(hit, ts, t)
        surf = torch.where(hit, torch.full_like(surf, sid + s), surf)
        ns = (o + ts[..., None] * d - c) / r
        normal = torch.where(hit[..., None], ns, normal)
    p = o + t[..., None] * d
    w = _pattern(p, scene.kind[surf], scene.freq[surf], scene.axis[surf], scene.phase[surf])
    albedo = scene.color_a[surf] * w[..., None] + scene.color_b[surf] * (1 - w[..., None])
    to_light = scene.light - p
    dist = to_light.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    lambert = ((normal * to_light).sum(-1, keepdim=True) / dist).clamp_min(0)
    shade = 0.45 + 0.75 * lambert / (1 + 0.05 * dist * dist)
    rgb = (albedo * shade).clamp(0, 1)
    return rgb, t


def scene_cameras(seed: int, index: int, num_frames: int, size: tuple[int, int],
                  trajectory: Optional[str] = None) -> tuple[Scene, np.ndarray, np.ndarray]:
    """(scene, K (N, 3, 3) float64, c2w (N, 4, 4) float64) for scene `index` at (H, W)."""
    scene = make_scene(seed, index, trajectory)
    rng = np.random.default_rng([int(seed), int(index), 11])
    c2w = make_trajectory(scene, scene.trajectory, num_frames, rng)
    K = np.tile(intrinsics_for(scene.fov_deg, *size), (num_frames, 1, 1))
    return scene, K, c2w


def encode_image(rgb: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes."""
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    elif image_format == "jpeg":
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    return buf.getvalue()


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def synthetic_sequence(seed: int, index: int, num_frames: int = 32,
                       size: tuple[int, int] = (256, 256), image_format: str = "png",
                       with_depth: bool = True, trajectory: Optional[str] = None,
                       chunk: int = 8) -> Sequence:
    """Scene `index` rendered along its trajectory as a stored-format Sequence
    (frames with encoded images, float64 K / c2w, float32 depth)."""
    scene, K, c2w = scene_cameras(seed, index, num_frames, size, trajectory)
    frames = []
    for a in range(0, num_frames, chunk):
        rgb, depth = render(scene, c2w[a:a + chunk], K[a:a + chunk], *size)
        rgb8 = to_uint8(rgb)
        for j in range(rgb8.shape[0]):
            i = a + j
            frames.append(Frame(image=encode_image(rgb8[j], image_format), K=K[i], c2w=c2w[i],
                                index=i, depth=depth[j].numpy() if with_depth else None,
                                timestamp=i * 33_333))
    return Sequence(scene_id=f"synthetic-{seed}-{index:06d}", frames=frames, source="synthetic")


def synthetic_sequences(num_scenes: int, seed: int = 0, num_frames: int = 32,
                        size: tuple[int, int] = (256, 256), image_format: str = "png",
                        with_depth: bool = True, start: int = 0) -> Iterator[Sequence]:
    """Scenes start .. start + num_scenes - 1 of world `seed`, as Sequences (writer input)."""
    for i in range(start, start + num_scenes):
        yield synthetic_sequence(seed, i, num_frames, size, image_format, with_depth)


class SyntheticSequences(torch.utils.data.Dataset):
    """Map-style dataset: item i = `synthetic_sequence(seed, i, ...)` (a stored-format
    Sequence with encoded frames)."""

    def __init__(self, num_scenes: int, seed: int = 0, num_frames: int = 32,
                 size: tuple[int, int] = (256, 256), image_format: str = "png",
                 with_depth: bool = True):
        self.num_scenes, self.seed, self.num_frames = num_scenes, seed, num_frames
        self.size, self.image_format, self.with_depth = size, image_format, with_depth

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> Sequence:
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene {index} out of range [0, {self.num_scenes})")
        return synthetic_sequence(self.seed, index, self.num_frames, self.size,
                                  self.image_format, self.with_depth)
