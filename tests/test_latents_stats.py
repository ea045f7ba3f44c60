"""Latent statistics: the exact Chan merge, our safetensors files (atomic), the release's .pt
files, and the errors a bad file gives.

Tolerance of the merge. Float64 sums of m terms are within m * eps64 of the sum of their
magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., section 4.2),
and each Chan merge adds a few roundings. The two-pass mean of n values is then within
n eps64 max|x| of the exact one. M2 = sum (x - mean)^2 does not change to first order with an
error in the mean; rounding each x - mean (within eps64 |x|) and the sum give
n eps64 (M2 + n max|x| max|x - mean|), so the variance is within
n eps64 (var + max|x| max|x - mean|). A factor 4 covers the merges' extra roundings; torch's
result over the concatenation and the merged one are both within that, so within twice it of
each other.
"""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from gld.checkpoints.loading import CheckpointError
from gld.encoders.da3 import resolve_variant
from gld.latents import LatentStats, Moments, load_stats, save_stats
from gld.latents.stats import read_stats_file

F64 = torch.finfo(torch.float64).eps
SMALL, BASE = resolve_variant("da3-small"), resolve_variant("da3-base")


def chunks(seed: int = 0, C: int = 8) -> list[torch.Tensor]:
    """Uneven chunks (1 .. 200 rows) with per-channel scales 1e-3 .. 1e2 around an offset of
    1e3 (where E[x^2] - E[x]^2 loses most digits), chunk k shifted by 3 k scales (so the
    between-chunk term of the merge carries most of the variance)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 2, C, dtype=torch.float64)
    return [torch.randn(n, C, generator=g, dtype=torch.float64) * scale + 1e3 + 3 * k * scale
            for k, n in enumerate((1, 5, 64, 200, 3, 128, 99))]


def merge_bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) tolerances per channel for n values x (n, C) (module docstring), x2."""
    n = x.shape[0]
    big = x.abs().amax(0)
    spread = (x - x.mean(0)).abs().amax(0)
    return 2 * 4 * n * F64 * big, 2 * 4 * n * F64 * (x.var(0, unbiased=False) + big * spread)


def assert_moments_match(m: Moments, x: torch.Tensor) -> None:
    mean_tol, var_tol = merge_bounds(x)
    assert m.count == x.shape[0]
    assert ((m.mean - x.mean(0)).abs() <= mean_tol).all()
    assert ((m.var - x.var(0, unbiased=False)).abs() <= var_tol).all()


def test_chan_merge_equals_torch_over_the_concatenation():
    parts = chunks()
    x = torch.cat(parts)
    seq = Moments.empty(8)
    for p in parts:
        seq = seq.add(p)
    assert_moments_match(seq, x)
    # Another grouping (a tree, as ranks merge), and rows given with more leading axes.
    left = Moments.of(torch.cat(parts[:3])).merge(Moments.of(parts[3]))
    right = Moments.of(parts[4].reshape(1, 3, 8)).merge(Moments.of(torch.cat(parts[5:])))
    assert_moments_match(left.merge(right), x)
    # fp32 features are widened before any arithmetic.
    f32 = parts[3].float()
    a, b = Moments.of(f32), Moments.of(f32.double())
    assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
    # The naive one-pass formula fails this very test: it is not a vacuous bound.
    naive = (x.square().mean(0) - x.mean(0).square())
    assert ((naive - x.var(0, unbiased=False)).abs() > merge_bounds(x)[1]).any()


def test_moments_edge_cases():
    empty = Moments.empty(4)
    one = Moments.of(torch.arange(4.0)[None])
    assert empty.merge(one) is one and one.merge(empty) is one
    assert one.count == 1 and torch.equal(one.var, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="variance of no values"):
        empty.var
    with pytest.raises(ValueError, match="4 channels against 3"):
        one.merge(Moments.empty(3))


# -- our files -------------------------------------------------------------------------------------

def _stats(C=16, levels=(0, 1), encoder="da3-small", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(levels)
    return LatentStats(levels, torch.randn(n, C, generator=g, dtype=torch.float64),
                       torch.rand(n, C, generator=g, dtype=torch.float64) + 0.1,
                       [100 + i for i in range(n)], encoder, info={"samples": "12"})


def test_safetensors_round_trip(tmp_path):
    stats = _stats(C=768, levels=(3, 1))
    assert stats.levels == (1, 3)  # kept sorted, rows with them
    path = save_stats(stats, tmp_path / "sub" / "stats.safetensors")
    back = load_stats(path, SMALL)
    assert back.levels == (1, 3) and back.encoder == "da3-small" and back.info == {"samples": "12"}
    for name in ("mean", "var", "count"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert os.listdir(path.parent) == ["stats.safetensors"]
    levels, encoder, _ = read_stats_file(path)
    assert encoder == "da3-small" and sorted(levels) == [1, 3]
    assert (levels[3][2], levels[1][2]) == (100, 101)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_stats(_stats(seed=0), tmp_path / "stats.safetensors")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_stats(_stats(seed=1), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["stats.safetensors"]


def test_files_combine_levels(tmp_path):
    a = save_stats(_stats(levels=(0,), seed=1), tmp_path / "a.safetensors")
    b = save_stats(_stats(levels=(1, 2), seed=2), tmp_path / "b.safetensors")
    both = load_stats([b, a])
    assert both.levels == (0, 1, 2)
    assert torch.equal(both.mean[0], load_stats(a).mean[0])
    with pytest.raises(CheckpointError, match=r"b.safetensors: level 1 is also in .*b.safetensors"):
        load_stats([b, b])


# -- the release's files ---------------------------------------------------------------------------

def release_file(path, C=1536, level=1, seed=0, **override):
    """A stats file in the release's format: {"mean", "var", "std": (1, C, 1, 1) float32,
    "count": int, "level": int} saved with torch.save."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, C, 1, 1, generator=g) * 3
    var = torch.rand(1, C, 1, 1, generator=g) * 10 + 1e-3
    obj = {"mean": mean, "var": var, "std": var.sqrt(), "count": 123456, "level": level}
    obj.update(override)
    obj = {k: v for k, v in obj.items() if v is not None}
    torch.save(obj, path)
    return path, mean, var


def test_release_file_loads_to_the_same_numbers(tmp_path):
    path, mean, var = release_file(tmp_path / "normalization_stats_level1.pt")
    stats = load_stats(path, BASE)
    assert stats.levels == (1,) and stats.count.tolist() == [123456] and stats.encoder == "da3-base"
    assert torch.equal(stats.mean[0], mean.reshape(-1).double())
    assert torch.equal(stats.var[0], var.reshape(-1).double())
    # The release's normalisation, written out: (z - mean) / sqrt(var + 1e-5) in fp32.
    z = torch.randn(2, 8, 5, 1536, generator=torch.Generator().manual_seed(1)) * 4
    want = (z - mean.reshape(-1)) / torch.sqrt(var.reshape(-1) + 1e-5)
    assert torch.equal(stats.normalize(z, 1), want)
    assert torch.equal(stats.denormalize(want, 1),
                       want * torch.sqrt(var.reshape(-1) + 1e-5) + mean.reshape(-1))
    # Without a "level" key the file name says it; a level asked for must match.
    path0, _, _ = release_file(tmp_path / "normalization_stats_level0.pt", level=None)
    assert load_stats(path0).levels == (0,)
    assert sorted(read_stats_file(path0, level=0)[0]) == [0]
    with pytest.raises(CheckpointError, match=r"level1.pt: holds level 1, level 0 was asked"):
        read_stats_file(path, level=0)


@pytest.mark.parametrize("make, pattern", [
    (lambda p: release_file(p, var=None), r"stats.pt: missing key\(s\) 'var'; found \['count', "
                                          r"'level', 'mean', 'std'\]"),
    (lambda p: release_file(p, C=768), r"stats.pt: level 1 mean has 768 channels; the da3-base "
                                       r"levels have 1536 \(2 x width 768\)"),
    (lambda p: release_file(p, mean=torch.zeros(2, 1536)), r"stats.pt: 'mean' has shape "
                                                           r"\(2, 1536\), expected one value"),
    (lambda p: release_file(p, var=-torch.ones(1, 1536, 1, 1)), r"level 1 var has negative"),
    (lambda p: release_file(p, mean=torch.full((1536,), float("nan"))),
     r"level 1 mean has non-finite values"),
    (lambda p: release_file(p, level=None), r"stats.pt: the file does not say its level"),
    (lambda p: torch.save([1, 2], p), r"stats.pt: expected a dict with 'mean' and 'var', found "
                                      r"list"),
    (lambda p: p.write_bytes(b"\x00garbage"), r"stats.pt: not loadable with torch.load\("
                                              r"weights_only=True\)"),
    (lambda p: torch.save({"mean": torch.zeros(1536), "var": torch.ones(1536),
                           "args": argparse.Namespace(a=1)}, p),
     r"stats.pt: not loadable with torch.load\(weights_only=True\)"),
])
def test_bad_release_files_say_what_is_wrong(tmp_path, make, pattern):
    path = tmp_path / "stats.pt"
    make(path)
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_stats(path, BASE)
    assert err.value.where == str(path)


def test_bad_safetensors_files_say_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "stats.safetensors"
    save_file({"level1.mean": torch.zeros(768)}, str(path))
    with pytest.raises(CheckpointError, match=r"stats.safetensors: not a latent statistics file: "
                                              r"metadata format is None"):
        load_stats(path)
    meta = {"format": "gld-latent-stats"}
    save_file({"level1.mean": torch.zeros(768), "level1.count": torch.ones(1, dtype=torch.int64)},
              str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) level1.var"):
        load_stats(path)
    save_file({"level1.mean": torch.zeros(768), "level1.var": torch.ones(768),
               "level1.count": torch.zeros(1, dtype=torch.int64)}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"level 1 count is 0, expected >= 1"):
        load_stats(path)
    save_stats(_stats(C=1536, encoder="da3-base"), path)
    with pytest.raises(CheckpointError, match=r"statistics of da3-base levels, the encoder is "
                                              r"da3-small"):
        load_stats(path, SMALL)
    path.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"stats.safetensors: not a readable safetensors"):
        load_stats(path)
    with pytest.raises(CheckpointError, match=r"stats.npz: unknown statistics format '.npz'"):
        (tmp_path / "stats.npz").write_bytes(b"")
        load_stats(tmp_path / "stats.npz")
    with pytest.raises(FileNotFoundError, match="latent statistics file not found: .*none.pt"):
        load_stats(tmp_path / "none.pt")
