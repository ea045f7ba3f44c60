"""View selection and resize / crop: exact intrinsics, determinism, eval source placement."""
import numpy as np
import pytest
import torch

from gld.data.schema import DataError
from gld.data.synthetic import render, scene_cameras, synthetic_sequence
from gld.data.views import ViewSpec, make_sample, resize_crop_size, select_views, view_rng


def test_train_selection_is_deterministic_and_in_a_window():
    spec = ViewSpec(num_views=8, window=12, min_sources=1, max_sources=4, seed=3)
    seen_counts = set()
    for sid in range(50):
        pos, mask = select_views(40, spec, view_rng(spec, 0, sid))
        pos2, mask2 = select_views(40, spec, view_rng(spec, 0, sid))
        assert np.array_equal(pos, pos2) and np.array_equal(mask, mask2)
        assert len(set(pos.tolist())) == 8 and (np.diff(pos) > 0).all()
        assert pos.max() - pos.min() < 12 and 0 <= pos.min() and pos.max() < 40
        seen_counts.add(int(mask.sum()))
    assert seen_counts == {1, 2, 3, 4}
    a = select_views(40, spec, view_rng(spec, 0, 1))[0]
    b = select_views(40, spec, view_rng(spec, 1, 1))[0]
    assert not np.array_equal(a, b)  # a new epoch draws new views


def test_eval_selection():
    spec = ViewSpec(num_views=8, window=15, mode="eval", eval_sources=4,
                    eval_selection="interpolate")
    pos, mask = select_views(21, spec, view_rng(spec, 5, 0))
    assert pos.tolist() == [3, 5, 7, 9, 11, 13, 15, 17]
    assert np.flatnonzero(mask).tolist() == [0, 2, 5, 7]
    spec = ViewSpec(num_views=8, window=15, mode="eval", eval_sources=2, eval_selection="first")
    assert np.flatnonzero(select_views(21, spec, view_rng(spec, 0, 0))[1]).tolist() == [0, 1]
    with pytest.raises(DataError, match="fewer than num_views=8"):
        select_views(5, spec, view_rng(spec, 0, 0))


def test_resize_crop_updates_intrinsics_exactly():
    """Render at 60x90, resize/crop to 28x28 through make_sample; the returned K must be the
    camera that renders the returned pixels: re-rendering with it matches them better than with
    the principal point moved by a quarter pixel either way."""
    seq = synthetic_sequence(2, 4, num_frames=8, size=(60, 90), image_format="png")
    spec = ViewSpec(num_views=2, window=8, max_sources=1, load_depth=True)
    pos, mask = np.array([1, 6]), np.array([True, False])
    s = make_sample(seq, pos, mask, (28, 28), spec, "test", 0)
    assert s["images"].shape == (2, 3, 28, 28) and s["images"].dtype == torch.uint8
    assert s["depth"].shape == (2, 28, 28) and s["K"].shape == (2, 3, 3)
    (nh, nw), top, left = resize_crop_size((60, 90), (28, 28))
    assert (nh, nw, top, left) == (28, 42, 0, 7)
    K0 = seq.frames[1].K
    want = np.array([[K0[0, 0] * 42 / 90, 0, K0[0, 2] * 42 / 90 - 7],
                     [0, K0[1, 1] * 28 / 60, K0[1, 2] * 28 / 60], [0, 0, 1]])
    # K is exact in float64, then stored as float32: one rounding of each entry.
    np.testing.assert_allclose(s["K"][0].numpy(), want, rtol=2.0**-23, atol=0)
    scene, _, c2w = scene_cameras(2, 4, 8, (60, 90))

    def mismatch(du, dv):
        """Mean |rendered - resampled| of colour and median of depth, K moved by (du, dv)."""
        K = s["K"][:1].double().numpy().copy()
        K[0, :2, 2] += (du, dv)
        rgb, depth = render(scene, c2w[[1]], K, 28, 28)
        return (float((rgb[0] * 255).permute(2, 0, 1).sub(s["images"][0].float()).abs().mean()),
                float((s["depth"][0] - depth[0]).abs().median()))

    exact = mismatch(0, 0)
    for shift in ((0.25, 0), (-0.25, 0), (0, 0.25), (0, -0.25)):
        moved = mismatch(*shift)
        assert exact[0] < moved[0] and exact[1] < moved[1], (shift, exact, moved)
