"""Round trips: synthetic-world fixtures in every supported format -> prepare_data (convert) ->
shards -> read back with gld.data.readers.read_sequences: cameras equal to float64 accuracy
(K compared normalised by the image size; float32 accuracy where the format stores float32),
pixels equal, source image bytes passed through unchanged (PNG and JPEG alike: no
re-encoding), depth equal where the format has it."""
import numpy as np
import pytest

from gld.data.formats import convert
from gld.data.readers import read_sequences
from tests import data_fixtures as fx

SIZE = (48, 64)  # (H, W)
# Float64 camera paths are a few operations (quaternion, inverse, text round trip) on values
# below 10: errors near 1e-15. 1e-12 leaves room and still catches a float32 step (1e-7).
F64_ATOL = 1e-12
F32 = 2.0**-24  # one float32 rounding, relative
# Depth goes through float32 twice at most (a format's file, the stored record): 2 roundings,
# doubled for the float64 conversions between.
DEPTH_RTOL = 4 * F32


def read_back(out):
    return list(read_sequences(str(out)))


def assert_same(orig, got, scene_ids, depth=True, timestamps=False, atol=F64_ATOL, source=None):
    assert [s.scene_id for s in got] == scene_ids
    for so, sg in zip(orig, got):
        if source:
            assert sg.source == source
        assert len(sg.frames) == len(so.frames), sg.scene_id
        for fo, fg in zip(so.frames, sg.frames):
            assert fg.image == fo.image, f"{sg.scene_id} frame {fo.index}: bytes re-encoded"
            img = fx.decode(fg.image)
            assert np.array_equal(img, fx.decode(fo.image))
            h, w = img.shape[:2]
            norm = np.array([[1 / w], [1 / h], [1.0]])
            np.testing.assert_allclose(fg.K * norm, fo.K * norm, rtol=0, atol=atol)
            np.testing.assert_allclose(fg.c2w, fo.c2w, rtol=0, atol=atol)
            assert fg.index == fo.index
            if timestamps:
                assert fg.timestamp == fo.timestamp
            if depth:
                np.testing.assert_allclose(fg.depth, fo.depth, rtol=DEPTH_RTOL, atol=0)
            else:
                assert fg.depth is None


@pytest.fixture(scope="module")
def png_world():
    return fx.world_sequences(2, 3, SIZE, "png")


@pytest.fixture(scope="module")
def jpeg_world():
    return fx.world_sequences(2, 3, SIZE, "jpeg", depth=False)


@pytest.mark.parametrize("writer", ["mds", "wds"])
def test_re10k_chunks(tmp_path, jpeg_world, writer):
    fx.write_re10k_chunks(jpeg_world, tmp_path / "in")
    meta, problems = convert("re10k", tmp_path / "in", tmp_path / "out", writer)
    assert meta.num_sequences == 2 and meta.image_format == "jpeg" and meta.writer == writer
    assert problems.skipped_frames == 0
    # The chunk format stores float32 cameras: normalised K entries (below 1) and w2c = [R | t]
    # each rounded once; c2w's centre -R^T t then carries about |t| (3 + 1) roundings.
    t_max = max(np.linalg.norm(f.c2w[:3, 3]) for s in jpeg_world for f in s.frames)
    assert_same(jpeg_world, read_back(tmp_path / "out"), ["scene000", "scene001"], depth=False,
                timestamps=True, atol=4 * F32 * max(1.0, t_max), source="re10k")


@pytest.mark.parametrize("ext", ["png", "jpeg"])
def test_re10k_txt(tmp_path, png_world, jpeg_world, ext):
    world = png_world if ext == "png" else jpeg_world
    fx.write_re10k_txt(world, tmp_path / "in", "png" if ext == "png" else "jpg")
    convert("re10k_txt", tmp_path / "in", tmp_path / "out")
    assert_same(world, read_back(tmp_path / "out"), ["scene000", "scene001"], depth=False,
                timestamps=True)


def test_nerfstudio_dl3dv_images_4(tmp_path, png_world):
    fx.write_nerfstudio(png_world, tmp_path / "in", factor=4)
    convert("dl3dv", tmp_path / "in", tmp_path / "out")
    assert_same(png_world, read_back(tmp_path / "out"), ["scene000", "scene001"], depth=False,
                source="dl3dv")


@pytest.mark.parametrize("binary", [True, False])
def test_colmap(tmp_path, jpeg_world, binary):
    fx.write_colmap(jpeg_world, tmp_path / "in", binary=binary, ext="jpg")
    convert("colmap", tmp_path / "in", tmp_path / "out", "wds" if binary else "mds")
    assert_same(jpeg_world, read_back(tmp_path / "out"), ["scene000", "scene001"], depth=False)


def test_colmap_downscaled_folder_and_split(tmp_path):
    """Mip-NeRF 360 layout: cameras of the full-size images, pixels read from images_2 (here the
    fixture's images are the half-size ones and the model says twice their size)."""
    world = fx.world_sequences(1, 10, SIZE, "png", depth=False)
    big = [s.__class__(s.scene_id, [f.__class__(f.image, f.K * [[2], [2], [1]], f.c2w, f.index)
                                    for f in s.frames]) for s in world]
    fx.write_colmap(big, tmp_path / "in", image_dir="images_2")
    # the camera sizes must say 2x: rewrite them from the (decoded) sizes * 2
    import struct
    cams = tmp_path / "in" / "scene000" / "sparse" / "0" / "cameras.bin"
    data = bytearray(cams.read_bytes())
    n = struct.unpack_from("<Q", data, 0)[0]
    off = 8
    for _ in range(n):
        cid, mid, w, h = struct.unpack_from("<iiQQ", data, off)
        struct.pack_into("<iiQQ", data, off, cid, mid, 2 * w, 2 * h)
        off += 24 + 8 * 4
    cams.write_bytes(bytes(data))
    convert("mipnerf360", tmp_path / "in" / "scene000", tmp_path / "out",
            options={"images": "images_2", "split": "test"})
    got = read_back(tmp_path / "out")
    test_only = [s.__class__(s.scene_id, s.frames[::8]) for s in world]
    assert_same(test_only, got, ["scene000"], depth=False)
    assert [f.index for f in got[0].frames] == [0, 8]


def test_tartanair(tmp_path):
    world = fx.world_sequences(2, 3, SIZE, "png", K=fx.tartanair_K(SIZE))
    fx.write_tartanair(world, tmp_path / "in")
    convert("tartanair", tmp_path / "in", tmp_path / "out")
    assert_same(world, read_back(tmp_path / "out"), ["scene000/Easy/P000", "scene001/Easy/P000"])


def test_hypersim(tmp_path):
    pytest.importorskip("h5py")
    world = fx.world_sequences(2, 3, SIZE, "jpeg", K=fx.hypersim_K(SIZE))
    fx.write_hypersim(world, tmp_path / "in", meters_per_asset_unit=0.0254)
    convert("hypersim", tmp_path / "in", tmp_path / "out", "wds")
    assert_same(world, read_back(tmp_path / "out"), ["ai_001_000/cam_00", "ai_001_001/cam_00"])


def test_npz_folder(tmp_path):
    world = fx.world_sequences(2, 11, SIZE, "png")  # 11 frames: frame_10 sorts after frame_9
    fx.write_npz_folder(world, tmp_path / "in")
    convert("npz_folder", tmp_path / "in", tmp_path / "out")
    assert_same(world, read_back(tmp_path / "out"), ["scene000", "scene001"])


def test_synthetic(tmp_path):
    from gld.data.synthetic import synthetic_sequence

    meta, _ = convert("synthetic", "scenes=2,frames=3,size=48x64,seed=5", tmp_path / "out")
    want = [synthetic_sequence(5, i, 3, SIZE) for i in range(2)]
    assert_same(want, read_back(tmp_path / "out"), [s.scene_id for s in want], timestamps=True)
