"""gld.eval.images / ply / report: uint8 conversion, the turbo table against matplotlib's (when
installed), grids placed where they should be, atomic files, PLY round trips (bit-exact), depth
unprojection onto a known plane and back through the projection, and the report files."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gld.eval.images import (depth_to_color, make_grid, save_depth_raw, save_png, to_uint8,
                             turbo, write_atomic)
from gld.eval.ply import depth_to_points, read_ply, write_ply
from gld.eval.report import write_report
from gld.geometry.rotations import quat_to_rotmat


def test_to_uint8_layouts_rounding_and_errors():
    hwc = np.array([[[0.0, 1.0, 0.5], [-1.0, 2.0, 0.2]]])                # (1, 2, 3)
    out = to_uint8(hwc)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert out.tolist() == [[[0, 255, 128], [0, 255, 51]]]
    assert np.array_equal(to_uint8(torch.from_numpy(hwc.transpose(2, 0, 1)).float()), out)
    assert np.array_equal(to_uint8(out), out)
    with pytest.raises(ValueError, match=r"\(3, 4, 3\) is ambiguous"):
        to_uint8(np.zeros((3, 4, 3)))
    assert to_uint8(np.zeros((3, 4, 3)), channels_first=True).shape == (4, 3, 3)
    with pytest.raises(ValueError, match=r"got shape \(4, 4\)"):
        to_uint8(np.zeros((4, 4)))


def test_turbo_matches_matplotlib():
    colormaps = pytest.importorskip("matplotlib").colormaps
    ref = np.round(colormaps["turbo"](np.arange(256))[:, :3] * 255)
    got = turbo(np.arange(256) / 255).astype(float)
    assert np.abs(got - ref).max() <= 3                    # the 33-knot table: 2.1 before rounding
    assert turbo(0.0).tolist() == [48, 18, 59] and turbo(1.0).tolist() == [122, 4, 3]


def test_depth_to_color():
    d = np.linspace(1, 10, 100).reshape(10, 10)
    d[0, 0] = 0                                            # invalid
    d[0, 1] = np.nan                                       # invalid
    mask = np.ones((10, 10), bool)
    mask[9, 9] = False
    c = depth_to_color(torch.from_numpy(d), mask=mask)
    assert c.shape == (10, 10, 3) and c.dtype == np.uint8
    assert c[0, 0].tolist() == c[0, 1].tolist() == c[9, 9].tolist() == [0, 0, 0]
    # near below the 2nd percentile -> the blue end, far above the 98th -> the red end
    assert c[0, 2].tolist() == [48, 18, 59] and c[9, 8].tolist() == [122, 4, 3]
    assert np.array_equal(depth_to_color(d, vmin=1, vmax=10)[5, 5],
                          turbo((d[5, 5] - 1) / 9))
    g = depth_to_color(d, cmap="gray", vmin=0, vmax=10)
    assert g[9, 8, 0] == g[9, 8, 2] == round(d[9, 8] / 10 * 255)
    assert depth_to_color(np.full((3, 3), 2.0)).tolist() == [[turbo(0.5).tolist()] * 3] * 3
    assert not depth_to_color(np.zeros((3, 3))).any()
    with pytest.raises(ValueError, match=r"mask shape \(3, 3\) differs from depth shape"):
        depth_to_color(d, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="cmap must be"):
        depth_to_color(d, cmap="viridis")


def test_make_grid_places_tiles():
    a = np.full((4, 5, 3), 10, np.uint8)
    b = np.full((6, 3, 3), 20, np.uint8)
    c = np.full((2, 2, 3), 30, np.uint8)
    grid = make_grid([[a, b], [c]], pad=1, background=255)
    # rows 6 and 2 tall, widths 5+1+3 and 2: H = 1+6+1+2+1, W = 1+9+1
    assert grid.shape == (11, 11, 3)
    assert (grid[1:5, 1:6] == 10).all() and (grid[5:7, 1:6] == 255).all()  # a padded below
    assert (grid[1:7, 7:10] == 20).all()
    assert (grid[8:10, 1:3] == 30).all() and (grid[8:10, 3:] == 255).all()
    assert (grid == 255).sum() == grid.size - 3 * (20 + 18 + 4)
    labelled = make_grid([[a], [c]], pad=1, labels=["source", "generated"])
    label_w = labelled.shape[1] - make_grid([[a], [c]], pad=1).shape[1]
    assert label_w > 10 and (labelled[:, :label_w] < 255).any()           # text was drawn
    assert (labelled[1:5, label_w + 1:label_w + 6] == 10).all()
    with pytest.raises(ValueError, match=r"tile \(0, 1\) must be an \(h, w, 3\) uint8"):
        make_grid([[a, b.astype(np.float32)]])
    with pytest.raises(ValueError, match="1 labels for 2 rows"):
        make_grid([[a], [b]], labels=["x"])
    with pytest.raises(ValueError, match="non-empty"):
        make_grid([[a], []])


def test_save_png_and_depth_raw(tmp_path, rng):
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = save_png(img, tmp_path / "sub" / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), img)
    d16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    assert np.array_equal(np.asarray(Image.open(save_png(d16, tmp_path / "d.png"))), d16)
    with pytest.raises(ValueError, match=r"float32 \(7, 9, 3\) for .*b.png"):
        save_png(img.astype(np.float32), tmp_path / "b.png")
    depth = torch.rand(5, 6, generator=rng) * 40
    p = save_depth_raw(depth, tmp_path / "depth.npy")
    back = np.load(p)
    assert back.dtype == np.float32 and np.array_equal(back, depth.numpy())
    with pytest.raises(ValueError, match="must end in .npy"):
        save_depth_raw(depth, tmp_path / "depth.png")
    assert sorted(os.listdir(tmp_path)) == ["d.png", "depth.npy", "sub"]  # no temporaries left


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    write_atomic(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip_is_exact(tmp_path, binary):
    g = np.random.default_rng(1)
    pts = (g.standard_normal((50, 3)) * 1e3).astype(np.float32)
    pts[0] = [np.float32(1e-30), np.float32(-3.4e38), np.float32(0.1)]
    cols = g.integers(0, 256, (50, 3), dtype=np.uint8)
    path = write_ply(tmp_path / "c.ply", pts, cols, binary=binary)
    p2, c2 = read_ply(path)
    assert p2.dtype == np.float32 and np.array_equal(p2.view(np.uint32), pts.view(np.uint32))
    assert np.array_equal(c2, cols)
    raw = open(path, "rb").read()
    header = raw[:raw.index(b"end_header\n") + 11].decode()
    fmt = "binary_little_endian" if binary else "ascii"
    assert header.startswith(f"ply\nformat {fmt} 1.0\n") and "element vertex 50\n" in header
    assert ("property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
            "property uchar green\nproperty uchar blue\nend_header\n") in header
    if binary:
        assert len(raw) == len(header) + 50 * 15
        assert np.frombuffer(raw[len(header):len(header) + 4], "<f4")[0] == pts[0, 0]


def test_ply_float_colors_big_endian_and_errors(tmp_path):
    pts = np.array([[0, 1, 2], [3, 4, 5]], np.float64)
    p, c = read_ply(write_ply(tmp_path / "f.ply", pts, np.array([[0, 0.5, 1], [2, -1, 0.2]])))
    assert np.array_equal(p, pts.astype(np.float32)) and c.tolist() == [[0, 128, 255],
                                                                        [255, 0, 51]]
    be = (b"ply\nformat binary_big_endian 1.0\nelement vertex 1\nproperty double x\n"
          b"property double y\nproperty double z\nend_header\n" + np.array([1.5, 2, 3], ">f8")
          .tobytes())
    (tmp_path / "be.ply").write_bytes(be)
    p, c = read_ply(tmp_path / "be.ply")
    assert p.tolist() == [[1.5, 2, 3]] and c is None
    (tmp_path / "t.ply").write_bytes(open(tmp_path / "f.ply", "rb").read()[:-4])
    with pytest.raises(ValueError, match=r"t.ply: truncated, 26 bytes of vertex data for 2"):
        read_ply(tmp_path / "t.ply")
    with pytest.raises(ValueError, match=r"points must be \(N, 3\), got \(2, 2\)"):
        write_ply(tmp_path / "x.ply", np.zeros((2, 2)), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"colors must be \(2, 3\) to match the points"):
        write_ply(tmp_path / "x.ply", pts, np.zeros((3, 3), np.uint8))
    (tmp_path / "n.ply").write_bytes(b"solid x\n")
    with pytest.raises(ValueError, match="n.ply is not a PLY file"):
        read_ply(tmp_path / "n.ply")


def plane_scene(H=24, W=32):
    """A camera looking at the world plane n.X = 4 (n tilted): its exact planar depth."""
    K = torch.tensor([[30.0, 0, 15.5], [0, 28.0, 12.0], [0, 0, 1]], dtype=torch.float64)
    R = quat_to_rotmat(torch.tensor([0.1, -0.2, 0.05, 1.0], dtype=torch.float64) /
                       torch.tensor([0.1, -0.2, 0.05, 1.0], dtype=torch.float64).norm())
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3], c2w[:3, 3] = R, torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    n = torch.nn.functional.normalize(R @ torch.tensor([0.1, -0.15, 1.0], dtype=torch.float64),
                                      dim=0)
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    rays = torch.stack([u, v, torch.ones_like(u)], -1).double() @ torch.linalg.inv(K).T
    # X = C + z R r on the plane: z = (4 - n.C) / (n.R r); r has unit z, so z is planar depth
    depth = (4 - n @ c2w[:3, 3]) / (rays @ R.T @ n)
    return depth, K, c2w, n


def test_depth_to_points_on_a_plane_and_back(rng):
    depth, K, c2w, n = plane_scene()
    assert (depth > 0).all()
    image = torch.rand(3, 24, 32, generator=rng)
    pts, cols = depth_to_points(depth, K, c2w, image)
    assert pts.shape == (24 * 32, 3) and pts.dtype == np.float32 and cols.dtype == np.uint8
    # on the plane, to float32 rounding of coordinates of size ~5
    np.testing.assert_allclose(pts.astype(np.float64) @ n.numpy(), 4.0, atol=5e-6)
    # project back: pixel centres and depths come out again, in row-major order
    w2c = torch.linalg.inv(c2w).numpy()
    cam = pts.astype(np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ K.numpy().T
    uv = uv[:, :2] / uv[:, 2:]
    vv, uu = np.mgrid[0:24, 0:32]
    np.testing.assert_allclose(uv, np.stack([uu + 0.5, vv + 0.5], -1).reshape(-1, 2), atol=1e-4)
    np.testing.assert_allclose(cam[:, 2], depth.numpy().reshape(-1), rtol=2e-6)
    assert np.array_equal(cols, to_uint8(image).reshape(-1, 3))


def test_depth_to_points_mask_stride_and_errors(rng):
    depth, K, c2w, _ = plane_scene()
    image = torch.rand(24, 32, 3, generator=rng).numpy()       # (H, W, 3) accepted too
    full, _ = depth_to_points(depth, K, c2w, image)
    pts, cols = depth_to_points(depth, K, c2w, image, stride=5)
    assert pts.shape == (5 * 7, 3)                              # rows 0,5,..,20; cols 0,..,30
    assert np.array_equal(pts[8], full[5 * 32 + 5]) and np.array_equal(cols[8],
                                                                       to_uint8(image)[5, 5])
    depth = depth.clone()
    depth[0, 0], depth[0, 1] = 0, float("nan")
    mask = torch.ones(24, 32, dtype=torch.bool)
    mask[1] = False
    pts, _ = depth_to_points(depth, K, c2w, image, mask=mask)
    assert pts.shape[0] == 24 * 32 - 2 - 32 and np.array_equal(pts[0], full[2])
    with pytest.raises(ValueError, match=r"image is \(24, 30\), depth is \(24, 32\)"):
        depth_to_points(depth, K, c2w, image[:, :30])
    with pytest.raises(ValueError, match=r"K \(3, 3\) and c2w \(4, 4\), got \(3, 3\) and \(3, 4\)"):
        depth_to_points(depth, K, c2w[:3], image)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        depth_to_points(depth, K, c2w, image, stride=0)


def test_write_report(tmp_path):
    metrics = {
        "nvs": {"generated": {"psnr": torch.tensor(17.25), "ssim": np.float32(0.5), "lpips": None},
                "mean_image": {"psnr": 12.5, "ssim": 0.25, "lpips": None}},
        "depth": {"abs_rel": 0.125, "delta1": 0.875, "align": "median"},
        "source_psnr": float("inf"),
        "unavailable": {"nvs.generated.lpips": "LPIPS backbone 'alex' not found: /x/alex.pth"},
    }
    summary = {"name": "tiny", "config": "configs/tiny.yaml", "wall_time_s": 612.4,
               "stages": {"decoder": {"steps": 300, "time_s": 120.0},
                          "diffusion": {"steps": 800, "time_s": 400.5}},
               "notes": ["mean image over all views of each scene"], "seed": 3}
    grid = make_grid([[np.zeros((12, 12, 3), np.uint8)]])
    paths = write_report(tmp_path, metrics, grid, summary)
    assert paths["metrics"] == str(tmp_path / "report" / "metrics.json")
    saved = json.loads(open(paths["metrics"]).read())
    assert saved["nvs"]["generated"] == {"psnr": 17.25, "ssim": 0.5, "lpips": None}
    assert saved["source_psnr"] is None                      # JSON has no inf
    assert saved["unavailable"] == metrics["unavailable"]
    assert np.array_equal(np.asarray(Image.open(paths["grid"])), grid)
    md = open(paths["summary"]).read()
    assert md.startswith("# Report: tiny\n")
    for line in ("- config: configs/tiny.yaml", "- wall time (s): 612.4", "- seed: 3",
                 "| stage | steps | time_s |", "| diffusion | 800 | 400.5 |",
                 "| metric | generated | mean_image | generated - mean_image |",
                 "| psnr | 17.25 | 12.5 | 4.75 |", "| lpips | n/a | n/a |  |",
                 "| abs_rel | 0.125 |", "| align | median |",
                 "- `nvs.generated.lpips`: LPIPS backbone 'alex' not found: /x/alex.pth",
                 "- `nvs.mean_image.lpips`: not computed (no reason given)",
                 "| source_psnr | inf |", "- mean image over all views of each scene",
                 "![samples](grid.png)"):
        assert line in md, line
    paths = write_report(tmp_path, {"depth": {"rmse": 1.0}}, None, {"name": "again"})
    assert paths["grid"] is None and sorted(os.listdir(tmp_path / "report")) == [
        "metrics.json", "summary.md"]
    with pytest.raises(ValueError, match="must map metric paths to reason strings"):
        write_report(tmp_path, {"unavailable": {"x": 1}}, None, {})
    with pytest.raises(ValueError, match=r"a scalar, got an array of shape \(2,\)"):
        write_report(tmp_path, {"psnr": np.zeros(2)}, None, {})
