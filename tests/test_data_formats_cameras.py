"""Exact camera conversions that round trips alone do not pin down: OpenCV-model undistortion
(nerfstudio / DL3DV and COLMAP), HyperSim intrinsics from M_cam_from_uv, Euclidean -> planar
depth, and each format's axis convention checked against an independent statement of it."""
import numpy as np
import pytest
import torch

from gld.data.formats import convert
from gld.data.formats.hypersim import (
    default_intrinsics, distance_to_planar, intrinsics_from_cam_from_uv,
)
from gld.data.formats.undistort import distort_points, undistort_points
from gld.data.readers import read_sequences
from tests import data_fixtures as fx

DIST = {"k1": -0.12, "k2": 0.03, "p1": 0.002, "p2": -0.0015}


def test_undistort_points_inverts_distort():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.6, 0.6, (2, 1000))
    xd, yd = distort_points(x, y, {**DIST, "k3": 0.01})
    x2, y2 = undistort_points(xd, yd, {**DIST, "k3": 0.01})
    assert max(np.abs(x2 - x).max(), np.abs(y2 - y).max()) < 1e-12


def _pattern(x, y):
    """Smooth RGB (..., 3) in [0, 255] as a function of undistorted normalised coordinates."""
    return np.stack([127.5 + 110 * np.sin(3 * x + 0.5), 127.5 + 110 * np.cos(2.5 * y - 0.3),
                     127.5 + 100 * np.sin(2 * x + 2 * y)], -1)


def _expected(K, size):
    h, w = size
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    return _pattern((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1])


def _valid(K, size, dist, margin=1.0):
    """Output pixels whose distorted source point lies inside the image (with a margin)."""
    h, w = size
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xd, yd = distort_points((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], dist)
    su, sv = xd * K[0, 0] + K[0, 2], yd * K[1, 1] + K[1, 2]
    return (su > margin) & (su < w - margin) & (sv > margin) & (sv < h - margin)


def _curvature(K, size, dist):
    """max |g_uu| + |g_vv| over the distorted image, g = the pattern at the distorted pixel
    positions (what the fixture's source pixels hold before rounding), by second differences."""
    h, w = size
    u, v = np.meshgrid(np.arange(-1, w + 1) + 0.5, np.arange(-1, h + 1) + 0.5)
    x, y = undistort_points((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], dist)
    g = _pattern(x, y)
    guu = np.abs(g[1:-1, 2:] - 2 * g[1:-1, 1:-1] + g[1:-1, :-2])
    gvv = np.abs(g[2:, 1:-1] - 2 * g[1:-1, 1:-1] + g[:-2, 1:-1])
    return float((guu + gvv).max())


def _check_undistorted(seq, K, size, dist):
    # Each output pixel: the fixture's source pixels hold the pattern rounded to uint8 (<= 0.5,
    # kept by the convex bilinear weights), bilinear sampling adds at most (|g_uu| + |g_vv|) / 8,
    # the output is rounded again (<= 0.5). On average two roundings, each uniform on +-0.5,
    # give |sum| 1/3 at most (the bilinear weights only shrink the source one).
    interp = _curvature(K, size, dist) / 8
    for f in seq.frames:
        assert fx.decode(f.image).shape[:2] == size
        np.testing.assert_allclose(f.K, K, atol=1e-9)
        got = fx.decode(f.image).astype(float)
        want = _expected(K, size)
        m = _valid(K, size, dist)
        assert m.mean() > 0.9
        err = np.abs(got - want)[m]
        assert err.max() <= 1.0 + interp and err.mean() <= 1 / 3 + interp, (err.max(),
                                                                             err.mean(), interp)


def test_nerfstudio_undistortion(tmp_path):
    size = (60, 80)
    world = fx.world_sequences(1, 2, size, "png", depth=False)
    fx.write_nerfstudio(world, tmp_path / "in", factor=2, dist=DIST)
    K = world[0].frames[0].K
    for i in range(2):  # replace the images by distorted renderings of a smooth pattern
        img = fx.distort_image(_pattern, K, size, DIST)
        (tmp_path / "in" / "scene000" / "images_4" / f"frame_{i + 1:05d}.png").write_bytes(fx.encode(img))
    convert("dl3dv", tmp_path / "in", tmp_path / "out")
    (seq,) = read_sequences(str(tmp_path / "out"))
    _check_undistorted(seq, K, size, DIST)
    for fo, fg in zip(world[0].frames, seq.frames):
        np.testing.assert_allclose(fg.c2w, fo.c2w, atol=1e-9)


@pytest.mark.parametrize("model,params,dist", [
    ("OPENCV", [DIST["k1"], DIST["k2"], DIST["p1"], DIST["p2"]], DIST),
    ("SIMPLE_RADIAL", [-0.1], {"k1": -0.1}),
])
def test_colmap_undistortion(tmp_path, model, params, dist):
    size = (60, 80)
    world = fx.world_sequences(1, 1, size, "png", depth=False)
    K = world[0].frames[0].K.copy()
    if model == "SIMPLE_RADIAL":  # one focal length
        K[1, 1] = K[0, 0]
        world[0].frames[0].K = K
    world[0].frames[0].image = fx.encode(fx.distort_image(_pattern, K, size, dist))
    fx.write_colmap(world, tmp_path / "in", model=model, extra_params=params)
    convert("colmap", tmp_path / "in", tmp_path / "out")
    (seq,) = read_sequences(str(tmp_path / "out"))
    _check_undistorted(seq, K, size, dist)


def test_zero_distortion_keeps_bytes(tmp_path):
    world = fx.world_sequences(1, 2, (40, 48), "jpeg", depth=False)
    fx.write_nerfstudio(world, tmp_path / "in", factor=1, image_dir="images")
    convert("nerfstudio", tmp_path / "in", tmp_path / "out")
    (seq,) = read_sequences(str(tmp_path / "out"))
    assert [f.image for f in seq.frames] == [f.image for f in world[0].frames]


# --- HyperSim --------------------------------------------------------------------------------

def test_hypersim_default_intrinsics_match_published_matrix():
    # ai_001_001 row of HyperSim's metadata_camera_parameters.csv (60 deg, 1024 x 768)
    M = np.array([[0.5773502886169104, 0, 0], [0, 0.4330127164626828, 0], [0, 0, -1.0]])
    K = intrinsics_from_cam_from_uv(M, 768, 1024, "test")
    # The csv holds float32-rounded tangents (2^-24 relative each): fx = W / (2 M00) carries
    # that one rounding, doubled for the float64 inverse.
    np.testing.assert_allclose(K, default_intrinsics(768, 1024), rtol=2.0**-23, atol=0)
    assert abs(K[0, 0] - 886.8100) < 1e-3 and np.allclose(K[:2, 2], [512, 384], atol=1e-9)


def test_hypersim_shifted_cam_from_uv_projects_rays_back():
    M = np.array([[0.55, 0, 0.04], [0, 0.41, -0.03], [0, 0, -1.0]])
    h, w = 48, 64
    K = intrinsics_from_cam_from_uv(M, h, w, "test")
    rng = np.random.default_rng(1)
    px, py = rng.uniform(0, w, 20), rng.uniform(0, h, 20)
    uv = np.stack([2 * px / w - 1, 1 - 2 * py / h, np.ones(20)])
    ray_cv = np.diag([1.0, -1.0, -1.0]) @ M @ uv  # OpenGL camera ray -> OpenCV axes
    proj = K @ ray_cv
    np.testing.assert_allclose(proj[:2] / proj[2], np.stack([px, py]), atol=1e-9)
    with pytest.raises(ValueError, match="non-pinhole"):
        intrinsics_from_cam_from_uv(M + [[0, 0.05, 0], [0, 0, 0], [0, 0, 0]], h, w, "test")


def test_hypersim_camera_csv_round_trip(tmp_path):
    pytest.importorskip("h5py")
    size = (48, 64)
    M = np.array([[0.55, 0, 0.04], [0, 0.41, -0.03], [0, 0, -1.0]])
    K = intrinsics_from_cam_from_uv(M, *size, "test")
    world = fx.world_sequences(1, 2, size, "jpeg", K=K)
    fx.write_hypersim(world, tmp_path / "in", meters_per_asset_unit=0.01)
    cols = [f"M_cam_from_uv_{i}{j}" for i in range(3) for j in range(3)]
    (tmp_path / "in" / "metadata_camera_parameters.csv").write_text(
        "scene_name," + ",".join(cols) + "\nai_001_000," + ",".join(repr(float(v)) for v in M.ravel()) + "\n")
    convert("hypersim", tmp_path / "in", tmp_path / "out")
    (seq,) = read_sequences(str(tmp_path / "out"))
    for fo, fg in zip(world[0].frames, seq.frames):
        np.testing.assert_allclose(fg.K, fo.K, atol=1e-9)
        np.testing.assert_allclose(fg.c2w, fo.c2w, atol=1e-9)
        np.testing.assert_allclose(fg.depth, fo.depth, rtol=1e-6)


def test_distance_to_planar_on_a_plane():
    """A fronto-parallel wall at z = 2: Euclidean distance grows off-centre, planar z does not."""
    K = default_intrinsics(30, 40)
    u, v = np.meshgrid(np.arange(40) + 0.5, np.arange(30) + 0.5)
    d = 2.0 * np.sqrt(((u - 20) / K[0, 0]) ** 2 + ((v - 15) / K[1, 1]) ** 2 + 1)
    d[0, 0] = np.nan  # no geometry
    z = distance_to_planar(d, K)
    assert z[0, 0] == 0 and np.allclose(z.ravel()[1:], 2.0, atol=1e-6)


# --- axis conventions against independent statements ----------------------------------------

def test_axis_conventions(tmp_path):
    """A camera looking along world +x, image-right = world -y (OpenCV c2w columns x, y, z)
    written in each convention by hand, read back as that c2w."""
    R_cv = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # columns: cam x, y, z in world
    # TartanAir NED body axes: x forward = cam z, y right = cam x, z down = cam y
    R_ned = np.stack([R_cv[:, 2], R_cv[:, 0], R_cv[:, 1]], 1)
    from gld.data.formats.tartanair import NED_TO_OPENCV
    np.testing.assert_array_equal(R_ned @ NED_TO_OPENCV, R_cv)
    # nerfstudio / HyperSim OpenGL axes: x right, y up = -cam y, z back = -cam z
    R_gl = np.stack([R_cv[:, 0], -R_cv[:, 1], -R_cv[:, 2]], 1)
    from gld.data.formats.nerfstudio import OPENGL_TO_OPENCV
    np.testing.assert_array_equal(R_gl @ OPENGL_TO_OPENCV[:3, :3], R_cv)
    # COLMAP: qvec (w, x, y, z) of the world-to-camera rotation R_cv^T
    from gld.geometry.rotations import quat_to_rotmat, rotmat_to_quat
    q = rotmat_to_quat(torch.from_numpy(R_cv.T), order="wxyz")
    np.testing.assert_allclose(quat_to_rotmat(q, order="wxyz").numpy().T, R_cv, atol=1e-12)
