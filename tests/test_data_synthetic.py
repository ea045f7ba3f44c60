"""The synthetic world: determinism, valid cameras, exact multi-view-consistent depth. (Its
speed is part of launch/bench_streaming.py's record.)"""
import numpy as np
import torch

from gld.data.schema import check_cameras
from gld.data.synthetic import (TRAJECTORIES, SyntheticSequences, render, scene_cameras,
                                synthetic_sequence, synthetic_sequences)

# The renderer works in float32: a hit point is a few tens of roundings (each 2^-24 relative)
# of coordinates no larger than the depth; 2^-16 relative to the depth leaves room above that.
RENDER_RTOL = 2.0**-16


def test_deterministic_by_seed():
    a = synthetic_sequence(3, 5, num_frames=4, size=(24, 32))
    b = synthetic_sequence(3, 5, num_frames=4, size=(24, 32))
    c = synthetic_sequence(4, 5, num_frames=4, size=(24, 32))
    assert [f.image for f in a.frames] == [f.image for f in b.frames]
    assert all(np.array_equal(x.c2w, y.c2w) and np.array_equal(x.depth, y.depth)
               for x, y in zip(a.frames, b.frames))
    assert [f.image for f in a.frames] != [f.image for f in c.frames]
    assert a.scene_id != c.scene_id


def test_every_trajectory_kind_has_valid_moving_cameras():
    for i, kind in enumerate(TRAJECTORIES):
        scene, K, c2w = scene_cameras(0, i, 24, (32, 32))
        assert scene.trajectory == kind
        check_cameras(K, c2w, [(32, 32)] * 24)
        centres = c2w[:, :3, 3]
        steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        assert steps.min() > 1e-3 and steps.max() < 1.0, kind  # moves, smoothly
        lo, hi = scene.room_lo.numpy(), scene.room_hi.numpy()
        assert ((centres > lo) & (centres < hi)).all(), kind  # inside the room


def _surface_distance(scene, p):
    """Distance of points p (N, 3) to the nearest surface of the scene (room faces, boxes,
    spheres)."""
    lo, hi = scene.room_lo.double(), scene.room_hi.double()
    d = torch.minimum((p - lo).abs(), (p - hi).abs()).amin(-1)
    for b in scene.boxes.double():
        q = torch.maximum(b[0] - p, p - b[1])
        outside = q.clamp_min(0).norm(dim=-1)
        inside = q.amax(-1).clamp_max(0).abs()
        d = torch.minimum(d, outside + inside)
    for s in scene.spheres.double():
        d = torch.minimum(d, ((p - s[:3]).norm(dim=-1) - s[3]).abs())
    return d


def test_depth_is_exact_and_multiview_consistent():
    """Unprojecting each pixel's depth lands on a surface of the scene (to float32 rendering
    accuracy); view 2, cast exactly through where view 0's points project, sees them at their
    depth, or something nearer (occlusion), never anything farther (depth is the first hit)
    except where the point lies on view 2's contour: there a ray moved by 1e-4 pixel, a few
    float32 roundings of the ray, hits it or something nearer."""
    H, W = 48, 64
    scene, K, c2w = scene_cameras(1, 1, 32, (H, W))  # orbit
    rgb, depth = render(scene, c2w[[0, 2]], K[[0, 2]], H, W)
    assert rgb.shape == (2, H, W, 3) and depth.shape == (2, H, W)
    assert torch.isfinite(depth).all() and (depth > 0).all()
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).double()
    cam = (pix @ torch.linalg.inv(torch.from_numpy(K[0])).T) * depth[0, ..., None].double()
    world = cam @ torch.from_numpy(c2w[0, :3, :3]).T + torch.from_numpy(c2w[0, :3, 3])
    tol = RENDER_RTOL * float(depth.max())
    assert _surface_distance(scene, world.reshape(-1, 3)).max() < tol
    w2c = np.linalg.inv(c2w[2])
    cam1 = world @ torch.from_numpy(w2c[:3, :3]).T + torch.from_numpy(w2c[:3, 3])
    proj = cam1 @ torch.from_numpy(K[2]).T
    z = proj[..., 2]
    uu, vv = proj[..., 0] / z, proj[..., 1] / z
    inside = (z > 0.1) & (uu > 0) & (uu < W) & (vv > 0) & (vv < H)
    assert inside.sum() > 0.3 * H * W

    def cast(u, v, z):
        """View 2's depth exactly through (u, v) minus z: one 1x1 view per point, its pixel
        centre moved there."""
        Ks = np.tile(K[2], (len(u), 1, 1))
        Ks[:, 0, 2] -= u.numpy() - 0.5
        Ks[:, 1, 2] -= v.numpy() - 0.5
        return render(scene, np.tile(c2w[2], (len(Ks), 1, 1)), Ks, 1, 1)[1][:, 0, 0].double() - z

    u1, v1, z1 = uu[inside], vv[inside], z[inside]
    diff = cast(u1, v1, z1)
    assert (diff.abs() < tol).double().mean() > 0.5  # most of view 0 is in view 2, 4 frames on
    far = diff >= tol
    nearest = torch.stack([cast(u1[far] + du, v1[far] + dv, z1[far]) for du, dv in
                           ((1e-4, 0), (-1e-4, 0), (0, 1e-4), (0, -1e-4))]).amin(0)
    assert (nearest < tol).all()


def test_stored_sequence_fields():
    seq = synthetic_sequence(0, 2, num_frames=3, size=(20, 30), image_format="jpeg")
    assert seq.source == "synthetic" and len(seq.frames) == 3
    f = seq.frames[1]
    assert f.image[:3] == b"\xff\xd8\xff" and f.index == 1
    assert f.K.dtype == np.float64 and f.c2w.dtype == np.float64
    assert f.depth.shape == (20, 30) and f.depth.dtype == np.float32
    assert len(list(synthetic_sequences(2, num_frames=2, size=(8, 8)))) == 2
    ds = SyntheticSequences(3, seed=7, num_frames=5, size=(20, 28))
    assert len(ds) == 3 and ds[1].frames[4].image == synthetic_sequence(7, 1, 5, (20, 28)).frames[4].image
