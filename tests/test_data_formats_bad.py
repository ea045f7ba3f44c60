"""Bad source data: a clear error naming the file / scene / frame, or with skip_bad
(`--skip-bad`) the bad frames / sequences left out and counted; a failed conversion leaves no
output that looks complete. Also the command line itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gld.data.formats import BadSample, convert
from gld.data.readers import read_meta, read_sequences
from tests import data_fixtures as fx
from tests.data_helpers import prepare_data

SIZE = (32, 40)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return fx.world_sequences(2, 3, SIZE, "png")


@pytest.fixture(scope="module")
def jpeg_world():
    return fx.world_sequences(1, 3, SIZE, "jpeg", depth=False)


def fails(fmt, src, out, *parts, **kw):
    with pytest.raises(BadSample) as e:
        convert(fmt, src, out, **kw)
    msg = str(e.value)
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"
    assert not Path(out).exists()
    assert not [p for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}")]
    return msg


def test_corrupt_png_names_file_scene_frame(tmp_path, world):
    fx.write_npz_folder(world, tmp_path / "in")
    bad = tmp_path / "in" / "scene001" / "frame_1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    fails("npz_folder", tmp_path / "in", tmp_path / "out", "scene001", "frame_1.png",
          "frame 1", "does not decode")


def test_corrupt_jpeg_in_re10k_chunk(tmp_path, jpeg_world):
    import torch

    fx.write_re10k_chunks(jpeg_world, tmp_path / "in")
    chunk = torch.load(tmp_path / "in" / "000000.torch", weights_only=True)
    img = chunk[0]["images"][2]
    chunk[0]["images"][2] = torch.cat([img[:100], torch.zeros(50, dtype=torch.uint8)])
    torch.save(chunk, tmp_path / "in" / "000000.torch")
    fails("re10k", tmp_path / "in", tmp_path / "out", "000000.torch", "scene000", "frame 2",
          "does not decode")


def test_nan_pose_tartanair(tmp_path):
    world = fx.world_sequences(1, 3, SIZE, "png", K=fx.tartanair_K(SIZE))
    fx.write_tartanair(world, tmp_path / "in")
    pose = tmp_path / "in" / "scene000" / "Easy" / "P000" / "pose_left.txt"
    lines = pose.read_text().splitlines()
    lines[1] = "nan " + lines[1].split(" ", 1)[1]
    pose.write_text("\n".join(lines) + "\n")
    fails("tartanair", tmp_path / "in", tmp_path / "out", "pose_left.txt",
          "scene000/Easy/P000", "frame 1", "non-finite")


def test_non_rigid_pose_nerfstudio(tmp_path, world):
    fx.write_nerfstudio(world[:1], tmp_path / "in", factor=1, image_dir="images")
    tf = tmp_path / "in" / "scene000" / "transforms.json"
    meta = json.loads(tf.read_text())
    m = np.array(meta["frames"][0]["transform_matrix"])
    m[:3, :3] *= 2.0
    meta["frames"][0]["transform_matrix"] = m.tolist()
    tf.write_text(json.dumps(meta))
    fails("nerfstudio", tmp_path / "in", tmp_path / "out", "transforms.json", "scene000",
          meta["frames"][0]["file_path"], "not rigid")


def test_non_positive_focal_colmap(tmp_path, world):
    seq = world[0]
    bad = [f.__class__(f.image, f.K * [[-1], [1], [1]] + [[0, 0, 2 * f.K[0, 2]], [0] * 3, [0] * 3],
                       f.c2w, f.index) for f in seq.frames]
    fx.write_colmap([seq.__class__(seq.scene_id, bad)], tmp_path / "in")
    fails("colmap", tmp_path / "in", tmp_path / "out", "images.bin", "scene000", "IMG_0000",
          "non-positive focal length")


def test_normalised_intrinsics_are_refused(tmp_path, world):
    fx.write_npz_folder(world[:1], tmp_path / "in")
    z = tmp_path / "in" / "scene000" / "frame_2.npz"
    d = dict(np.load(z))
    d["intrinsic"] = d["intrinsic"] / np.array([[SIZE[1]], [SIZE[0]], [1]])
    np.savez(z, **d)
    fails("npz_folder", tmp_path / "in", tmp_path / "out", "frame_2", "normalised")


def test_unsupported_colmap_model(tmp_path, world):
    fx.write_colmap(world[:1], tmp_path / "in", binary=False)
    cams = tmp_path / "in" / "scene000" / "sparse" / "0" / "cameras.txt"
    lines = cams.read_text().splitlines()
    parts = lines[1].split()
    lines[1] = " ".join([parts[0], "OPENCV_FISHEYE"] + parts[2:] + ["0.1", "0", "0", "0"])
    cams.write_text("\n".join(lines) + "\n")
    fails("colmap", tmp_path / "in", tmp_path / "out", "OPENCV_FISHEYE", "not supported")


def test_missing_frame_re10k_txt(tmp_path, world):
    fx.write_re10k_txt(world, tmp_path / "in")
    stamp = world[1].frames[1].timestamp
    (tmp_path / "in" / "frames" / "scene001" / f"{stamp}.png").unlink()
    fails("re10k_txt", tmp_path / "in", tmp_path / "out", "scene001.txt", "frame 1",
          f"timestamp {stamp}", "missing frame image")


def test_missing_depth_hypersim(tmp_path):
    pytest.importorskip("h5py")
    world = fx.world_sequences(1, 2, SIZE, "jpeg", K=fx.hypersim_K(SIZE))
    fx.write_hypersim(world, tmp_path / "in")
    (tmp_path / "in" / "ai_001_000" / "images" / "scene_cam_00_geometry_hdf5" /
     "frame.0001.depth_meters.hdf5").unlink()
    fails("hypersim", tmp_path / "in", tmp_path / "out", "ai_001_000/cam_00", "frame 1",
          "frame.0001.depth_meters.hdf5")


def test_skip_bad_counts_and_keeps_the_rest(tmp_path, world):
    fx.write_npz_folder(world, tmp_path / "in")
    bad = tmp_path / "in" / "scene000" / "frame_1.png"
    bad.write_bytes(b"not an image")
    z = tmp_path / "in" / "scene001" / "frame_0.npz"
    d = dict(np.load(z))
    d["pose"][0, 3] = np.inf
    np.savez(z, **d)
    meta, problems = convert("npz_folder", tmp_path / "in", tmp_path / "out", skip_bad=True)
    assert (problems.skipped_frames, problems.skipped_sequences) == (2, 0)
    stored = read_meta(str(tmp_path / "out"))
    assert stored.extra["skipped_frames"] == 2 and stored.num_frames == 4
    assert any("frame_1.png" in m for m in stored.extra["bad_data"])
    got = list(read_sequences(str(tmp_path / "out")))
    assert [[f.index for f in s.frames] for s in got] == [[0, 2], [1, 2]]
    assert got[0].frames[1].image == world[0].frames[2].image


def test_skip_bad_drops_whole_sequences(tmp_path, world):
    fx.write_nerfstudio(world, tmp_path / "in", factor=2)
    (tmp_path / "in" / "scene001" / "transforms.json").write_text("{not json")
    meta, problems = convert("nerfstudio", tmp_path / "in", tmp_path / "out", skip_bad=True,
                             min_frames=1)
    assert (problems.skipped_frames, problems.skipped_sequences) == (0, 1)
    assert [s.scene_id for s in read_sequences(str(tmp_path / "out"))] == ["scene000"]
    # min_frames: a sequence left too short by bad frames is dropped and counted
    fx.write_nerfstudio(world, tmp_path / "in2", factor=2)
    img = tmp_path / "in2" / "scene000" / "images_4" / "frame_00002.png"
    img.write_bytes(img.read_bytes()[:40])
    _, problems = convert("nerfstudio", tmp_path / "in2", tmp_path / "out2", skip_bad=True,
                          min_frames=3)
    assert (problems.skipped_frames, problems.skipped_sequences) == (1, 1)
    assert [s.scene_id for s in read_sequences(str(tmp_path / "out2"))] == ["scene001"]
    # everything bad: a clear error, no output
    fails("nerfstudio", tmp_path / "in2", tmp_path / "out3", "nothing to write",
          "frame_00002.png", skip_bad=True, min_frames=4)


def test_cli_as_a_script(tmp_path, world):
    fx.write_npz_folder(world, tmp_path / "in")
    r = subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), "npz_folder",
                        str(tmp_path / "in"), str(tmp_path / "out"), "--writer", "wds",
                        "--no-progress"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert "2 sequences" in r.stdout and read_meta(str(tmp_path / "out")).writer == "wds"


def test_cli_bad_data_and_skip_bad(tmp_path, world, capsys):
    fx.write_npz_folder(world, tmp_path / "in")
    (tmp_path / "in" / "scene000" / "frame_0.npz").unlink()
    assert prepare_data("npz_folder", tmp_path / "in", tmp_path / "out2") == 1
    err = capsys.readouterr().err
    assert "frame_0" in err and "missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()
    assert prepare_data("npz_folder", tmp_path / "in", tmp_path / "out3", "--skip-bad") == 0
    assert "skipped 1 frames" in capsys.readouterr().out


def test_cli_names_its_own_flag_for_an_existing_output(tmp_path, capsys):
    spec = "scenes=1,frames=2,size=14x14"
    assert prepare_data("synthetic", spec, tmp_path / "out") == 0
    capsys.readouterr()
    assert prepare_data("synthetic", spec, tmp_path / "out") == 1
    assert capsys.readouterr().err == (f"prepare_data: error: {tmp_path / 'out'} already exists; "
                                       f"add --overwrite to replace it\n")
    assert prepare_data("synthetic", spec, tmp_path / "out", "--overwrite") == 0


@pytest.mark.parametrize("size", ["256", "256x", "x256", "256x256x3", "0x256", "ax256"])
def test_cli_synthetic_size_must_be_h_by_w(tmp_path, capsys, size):
    assert prepare_data("synthetic", f"scenes=1,size={size}", tmp_path / "out") == 1
    assert capsys.readouterr().err == (f"prepare_data: error: synthetic spec 'scenes=1,size={size}'"
                                       f": size must be HxW in pixels like 256x256, got "
                                       f"'{size}'\n")


def test_re10k_index_must_match_chunk(tmp_path, jpeg_world):
    fx.write_re10k_chunks(jpeg_world, tmp_path / "in")
    (tmp_path / "in" / "index.json").write_text(json.dumps({"scene000": "000007.torch"}))
    fails("re10k", tmp_path / "in", tmp_path / "out", "index.json", "000007.torch",
          "does not exist")


def test_truncated_colmap_images_bin(tmp_path, world):
    fx.write_colmap(world[:1], tmp_path / "in")
    ib = tmp_path / "in" / "scene000" / "sparse" / "0" / "images.bin"
    ib.write_bytes(ib.read_bytes()[:-30])
    fails("colmap", tmp_path / "in", tmp_path / "out", "images.bin", "truncated")


def test_grey_png_becomes_rgb_png(tmp_path, world):
    from PIL import Image

    fx.write_npz_folder(world[:1], tmp_path / "in")
    grey = np.arange(SIZE[0] * SIZE[1], dtype=np.uint8).reshape(SIZE)
    Image.fromarray(grey, "L").save(tmp_path / "in" / "scene000" / "frame_0.png")
    convert("npz_folder", tmp_path / "in", tmp_path / "out")
    (seq,) = read_sequences(str(tmp_path / "out"))
    assert seq.frames[0].image[:4] == b"\x89PNG"
    assert np.array_equal(fx.decode(seq.frames[0].image), np.repeat(grey[..., None], 3, -1))
    assert seq.frames[1].image == world[0].frames[1].image
