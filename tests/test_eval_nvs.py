"""Pieces of the held-out evaluation (gld/eval/nvs.py) that need no model."""
import pytest
import torch

from gld.eval.nvs import _nearest_source, _split


def _c2w(centres):
    m = torch.eye(4).repeat(len(centres), 1, 1)
    m[:, :3, 3] = torch.tensor(centres, dtype=torch.float32)
    return m


def test_nearest_source_copies_the_source_with_the_nearest_camera_centre():
    # views 0, 1 are sources at x = 0 and x = 4; targets at x = 3, 1, 10
    c2w = _c2w([[0, 0, 0], [4, 0, 0], [3, 0, 0], [1, 0, 0], [10, 0, 0]])[None]
    images = torch.arange(5.0).view(1, 5, 1, 1, 1).expand(1, 5, 3, 2, 2)
    out = _nearest_source(images, c2w, S=2)
    assert out.shape == (1, 3, 3, 2, 2)
    assert out[0, :, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]


def test_split_orders_sources_first_and_needs_equal_counts():
    mask = torch.tensor([[False, True, False, True], [True, False, True, False]])
    src, tgt = _split({"source_mask": mask})
    assert src.tolist() == [[1, 3], [0, 2]] and tgt.tolist() == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="same number of sources"):
        _split({"source_mask": torch.tensor([[True, False], [True, True]])})
