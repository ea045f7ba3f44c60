"""Camera geometry against independent constructions."""
import math

import pytest
import torch

from gld import geometry as G
from tests.geometry_utils import axis_angle, random_c2w, random_K, random_rotation


def test_rigid_inverse_matches_linalg_inv(rng):
    T = random_c2w(16, rng)
    torch.testing.assert_close(G.rigid_inverse(T), torch.linalg.inv(T), atol=1e-12, rtol=0)
    torch.testing.assert_close(G.w2c_to_c2w(G.c2w_to_w2c(T)), T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_preserved(dtype, rng):
    T = random_c2w(3, rng).to(dtype)
    K = random_K(3, 32, 48, rng).to(dtype)
    assert G.rigid_inverse(T).dtype == dtype
    assert G.opencv_to_opengl(T).dtype == dtype
    assert G.normalize_intrinsics(K, 32, 48).dtype == dtype
    assert G.resize_intrinsics(K, (32, 48), (16, 24)).dtype == dtype


def test_opengl_round_trip_and_axes(rng):
    c2w = random_c2w(8, rng)
    gl = G.opencv_to_opengl(c2w)
    torch.testing.assert_close(G.opengl_to_opencv(gl), c2w, atol=0, rtol=0)
    # OpenGL looks down -z: its -z axis is the OpenCV +z (forward) axis; y flips; centre stays.
    torch.testing.assert_close(-gl[:, :3, 2], c2w[:, :3, 2])
    torch.testing.assert_close(-gl[:, :3, 1], c2w[:, :3, 1])
    torch.testing.assert_close(gl[:, :3, 3], c2w[:, :3, 3])


def test_intrinsics_normalise_round_trip(rng):
    K = random_K(5, 280, 504, rng)
    Kn = G.normalize_intrinsics(K, 280, 504)
    assert torch.allclose(Kn[:, 0, 0], K[:, 0, 0] / 504) and torch.allclose(Kn[:, 1, 2], K[:, 1, 2] / 280)
    torch.testing.assert_close(G.denormalize_intrinsics(Kn, 280, 504), K)


def _project(K, pts_cam):
    uvw = pts_cam @ K.transpose(-1, -2)
    return uvw[..., :2] / uvw[..., 2:]


def test_resize_and_crop_intrinsics_follow_the_pixels(rng):
    """A 3D point projects to the same continuous image position after resizing / cropping."""
    K = random_K(1, 120, 160, rng)[0]
    pts = torch.randn(50, 3, generator=rng, dtype=torch.float64) + torch.tensor([0, 0, 5.0])
    uv = _project(K, pts)
    K2 = G.resize_intrinsics(K, (120, 160), (60, 200))
    torch.testing.assert_close(_project(K2, pts), uv * torch.tensor([200 / 160, 60 / 120]))
    # Pixel (i, j) with centre (j+.5, i+.5) resized by an integer factor f maps onto the centre of
    # block (f i .. f i + f - 1): continuous coordinates scale exactly.
    K3 = G.crop_intrinsics(K, top=10, left=7)
    torch.testing.assert_close(_project(K3, pts), uv - torch.tensor([7.0, 10.0]))


def test_make_intrinsics():
    K = G.make_intrinsics(torch.tensor([100.0, 200.0]), 110.0, 50.0, 40.0)
    assert K.shape == (2, 3, 3) and K[1, 0, 0] == 200 and K[0, 1, 1] == 110 and K[0, 2, 2] == 1


def test_plucker_moment_and_direction(rng):
    c2w = random_c2w(3, rng)
    K = random_K(3, 28, 42, rng)
    pl = G.plucker_rays(c2w, K, 28, 42)
    assert pl.shape == (3, 6, 28, 42)
    d, m = pl[:, :3], pl[:, 3:]
    o = c2w[:, :3, 3][:, :, None, None].expand_as(d)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(3, 28, 42, dtype=torch.float64))
    torch.testing.assert_close(m, torch.linalg.cross(o, d, dim=1))
    assert (m * d).sum(1).abs().max() < 1e-12  # moment is orthogonal to the direction


def test_plucker_rays_pass_through_their_pixels(rng):
    """Independent check: a point along ray (i, j) projects to the centre of pixel (i, j)."""
    c2w = random_c2w(2, rng)
    K = random_K(2, 14, 28, rng)
    d = G.plucker_rays(c2w, K, 14, 28, channels_first=False)[..., :3]
    pts = c2w[:, None, None, :3, 3] + 3.0 * d  # world points
    w2c = torch.linalg.inv(c2w)
    cam = torch.einsum("bij,bhwj->bhwi", w2c[:, :3, :3], pts) + w2c[:, None, None, :3, 3]
    assert (cam[..., 2] > 0).all()
    uv = torch.einsum("bij,bhwj->bhwi", K, cam)
    uv = uv[..., :2] / uv[..., 2:]
    jj, ii = torch.meshgrid(torch.arange(28.0), torch.arange(14.0), indexing="xy")
    expect = torch.stack([jj + 0.5, ii + 0.5], -1).double()
    torch.testing.assert_close(uv, expect.expand_as(uv))


def test_plucker_patch_resolution_samples_patch_centres(rng):
    c2w = random_c2w(1, rng)
    K = random_K(1, 28, 56, rng)
    full = G.ray_directions(c2w, K, 28, 56)
    patch = G.ray_directions(c2w, K, 28, 56, stride=14)
    assert patch.shape == (1, 2, 4, 3)
    # Patch (1, 2) centre is (2.5*14, 1.5*14) = (35, 21): between pixels 34 and 35 in x.
    grid = G.pixel_grid(28, 56, 14)
    assert grid[1, 2].tolist() == [35.0, 21.0, 1.0]
    with pytest.raises(ValueError, match="not divisible by stride 14"):
        G.pixel_grid(30, 56, 14)
    assert full.shape == (1, 28, 56, 3)


def test_quaternion_round_trip_and_conventions(rng):
    R = random_rotation(64, rng)
    q = G.rotmat_to_quat(R)
    assert (q[:, 3] >= 0).all()
    torch.testing.assert_close(G.quat_to_rotmat(q), R, atol=1e-12, rtol=0)
    q_wxyz = G.rotmat_to_quat(R, order="wxyz")
    torch.testing.assert_close(q_wxyz, torch.cat([q[:, 3:], q[:, :3]], -1))
    torch.testing.assert_close(G.quat_to_rotmat(q_wxyz, order="wxyz"), R, atol=1e-12, rtol=0)
    # 90 degrees about z: q = (0, 0, sin 45, cos 45).
    Rz = axis_angle([0, 0, 1], math.pi / 2)
    torch.testing.assert_close(G.rotmat_to_quat(Rz), torch.tensor([0, 0, 0.5 ** 0.5, 0.5 ** 0.5],
                                                                  dtype=torch.float64))
    # Near-180-degree rotations (w ~ 0) stay accurate.
    Rpi = axis_angle([1, 2, 3], math.pi - 1e-9)
    torch.testing.assert_close(G.quat_to_rotmat(G.rotmat_to_quat(Rpi)), Rpi, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="order"):
        G.quat_to_rotmat(q, order="zyxw")


def test_rotation_angle():
    assert abs(float(G.rotation_angle(axis_angle([0, 1, 0], 0.3), degrees=False)) - 0.3) < 1e-12


def test_relative_and_max_normalisation(rng):
    c2w = random_c2w(10, rng).reshape(2, 5, 4, 4)
    out, s = G.normalize_poses(c2w, ref_index=-1, scale="max")
    torch.testing.assert_close(out[:, -1], torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    assert torch.allclose(out[..., :3, 3].norm(dim=-1).amax(-1), torch.ones(2, dtype=torch.float64))
    # Invariance: applying one similarity to every camera leaves the normalised poses unchanged.
    M = torch.eye(4, dtype=torch.float64)
    M[:3, :3] = random_rotation(1, rng)[0]
    M[:3, 3] = torch.tensor([1.0, -2.0, 0.5])
    moved = M @ c2w
    moved[..., :3, 3] *= 3.0
    out2, s2 = G.normalize_poses(moved, ref_index=-1, scale="max")
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(s2, 3 * s)
    out0, _ = G.normalize_poses(c2w, ref_index=0)
    torch.testing.assert_close(out0[:, 0], torch.eye(4, dtype=torch.float64).expand(2, 4, 4))


def test_median_normalisation(rng):
    c2w = torch.eye(4, dtype=torch.float64).repeat(1, 4, 1, 1)
    c2w[0, :, 0, 3] = torch.tensor([0.0, 1.0, 2.0, 10.0])
    out, s = G.normalize_poses(c2w, ref_index=0, scale="median")
    assert float(s) == 1.0  # torch's median of (0, 1, 2, 10) is the lower middle value
    tiny = c2w.clone()
    tiny[0, :, 0, 3] *= 1e-3
    _, s_tiny = G.normalize_poses(tiny, ref_index=0, scale="median")
    assert float(s_tiny) == 0.1


def test_coincident_cameras_keep_scale_one():
    c2w = torch.eye(4, dtype=torch.float64).repeat(1, 3, 1, 1)
    out, s = G.normalize_poses(c2w)
    assert float(s) == 1.0 and torch.equal(out, c2w)


def test_umeyama_recovers_sim3_under_noise(rng):
    src = torch.randn(4, 100, 3, generator=rng, dtype=torch.float64)
    R = random_rotation(4, rng)
    s = torch.tensor([0.5, 1.0, 2.0, 7.0], dtype=torch.float64)
    t = torch.randn(4, 3, generator=rng, dtype=torch.float64)
    dst = G.apply_sim3(s, R, t, src) + 1e-3 * torch.randn(4, 100, 3, generator=rng, dtype=torch.float64)
    s_hat, R_hat, t_hat = G.umeyama(src, dst)
    assert (s_hat / s - 1).abs().max() < 1e-3
    assert (R_hat - R).abs().max() < 1e-3
    assert (t_hat - t).abs().max() < 1e-2
    assert torch.allclose(torch.linalg.det(R_hat), torch.ones(4, dtype=torch.float64))
    # Exact data is recovered exactly, and SE(3) mode fixes s = 1.
    s_e, R_e, t_e = G.umeyama(src, G.apply_sim3(s, R, t, src))
    torch.testing.assert_close(s_e, s)
    torch.testing.assert_close(R_e, R)
    s1, _, _ = G.umeyama(src, G.apply_sim3(torch.ones(4, dtype=torch.float64), R, t, src),
                         with_scale=False)
    assert torch.equal(s1, torch.ones(4, dtype=torch.float64))


def test_umeyama_never_returns_a_reflection(rng):
    src = torch.randn(50, 3, generator=rng, dtype=torch.float64)
    dst = src * torch.tensor([1.0, 1.0, -1.0])  # a mirror image: no rotation fits exactly
    _, R, _ = G.umeyama(src, dst)
    assert torch.linalg.det(R) > 0


def test_check_cameras_names_the_first_bad_camera_and_why(rng):
    c2w = random_c2w(6, rng).reshape(2, 3, 4, 4)  # batched over any leading dimensions
    K = random_K(6, 32, 48, rng).reshape(2, 3, 3, 3)
    G.check_cameras(c2w, K, (32, 48))
    G.check_cameras(c2w.numpy(), K.numpy(), [[(32, 48)] * 3] * 2)  # arrays, one size per camera
    G.check_cameras(c2w)  # poses alone

    def refused(pattern, c2w=c2w, K=K, name="camera"):
        with pytest.raises(G.CameraError, match=pattern) as e:
            G.check_cameras(c2w, K, (32, 48), name=name)
        return e.value

    bad = c2w.clone()
    bad[1, 1, :3, :3] *= 2
    err = refused(r"camera\[4\]: camera-to-world pose is not rigid \(\|R\^T R - I\|max=3, det R=8",
                  c2w=bad)
    assert err.index == 4 and err.what.startswith("camera-to-world pose is not rigid")
    nan = c2w.clone()
    nan[0, 1, 0, 3] = float("nan")
    refused(r"cams\[1\]: non-finite camera-to-world pose", c2w=nan, name="cams")
    skew = K.clone()
    skew[0, 2, 0, 1] = 0.5
    refused(r"camera\[2\]: intrinsics must be \[\[fx,0,cx\],\[0,fy,cy\],\[0,0,1\]\]", K=skew)
    normalised = K / torch.tensor([[48.0], [32.0], [1.0]], dtype=K.dtype)
    refused(r"camera\[0\]: focal lengths fx=.* are not pixels of a 48x32 image .*normalised",
            K=normalised)
    negative = K.clone()
    negative[1, 0, 1, 1] *= -1
    refused(r"camera\[3\]: non-positive focal length", K=negative)
    outside = K.clone()
    outside[0, 0, 0, 2] = 49.0
    refused(r"camera\[0\]: principal point \(49, .*\) lies outside the 48x32 image", K=outside)
    with pytest.raises(G.CameraError, match=r"expected K \(\.\.\., 3, 3\) and c2w"):
        G.check_cameras(c2w, K[0], (32, 48))
    with pytest.raises(G.CameraError, match=r"image sizes \(4, 2\) do not match"):
        G.check_cameras(c2w, K, [(32, 48)] * 4)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 4, 4\)"):
        G.rigid_inverse(torch.eye(3))
    with pytest.raises(ValueError, match="needs at least 3 points"):
        G.umeyama(torch.zeros(2, 3), torch.zeros(2, 3))
