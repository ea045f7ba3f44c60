"""gld.eval.metrics: PSNR and SSIM against independent float64 references (skimage when it is
installed; always a direct 2-D window sum written here, and scipy's gaussian_filter used the way
skimage uses it), LPIPS plumbing and its offline checks, depth errors on hand-computed values.

Tolerances: the module computes in float64, so the references agree to float64 rounding of sums
of ~10^4 terms (1e-10 is loose by orders of magnitude).
"""
import math
import os

import numpy as np
import pytest
import torch

from gld.eval.metrics import (DEPTH_KEYS, LPIPSMetric, depth_metrics, gaussian_window,
                              lpips_available, lpips_unavailable_reason, mean_image_baseline,
                              psnr, ssim)
from gld.models.decoder_loss import lpips_backbone_path


def ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM of (C, H, W) float64 images: explicit 11x11 window sums over the valid
    region, population (co)variances, K1 0.01, K2 0.03, data range 1, mean over pixels and C."""
    r = 5
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / 1.5) ** 2)
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    C, H, W = x.shape
    h, w = H - 2 * r, W - 2 * r

    def filt(a):
        out = np.zeros((C, h, w))
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                out += w2[dy, dx] * a[:, dy:dy + h, dx:dx + w]
        return out

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def ssim_scipy_as_skimage(x: np.ndarray, y: np.ndarray) -> float:
    """skimage's algorithm (reflect-padded gaussian_filter, then crop 5 px) with scipy."""
    from scipy.ndimage import gaussian_filter
    vals = []
    for a, b in zip(x, y):
        f = lambda im: gaussian_filter(im, sigma=1.5, truncate=3.5, mode="reflect")
        mx, my = f(a), f(b)
        vx, vy, cxy = f(a * a) - mx ** 2, f(b * b) - my ** 2, f(a * b) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        vals.append(s[5:-5, 5:-5].mean())
    return float(np.mean(vals))


def noisy_pair(gen, shape=(3, 23, 31), noise=0.1):
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = x + noise * torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, y  # y leaves [0, 1] in places: the metrics clip it


def test_psnr_known_values_and_batching(rng):
    t = torch.rand(2, 3, 3, 8, 10, generator=rng) * 0.8
    p = t + 0.1                                            # MSE 0.01 -> 20 dB
    p[1, 2] = t[1, 2] + 0.01                               # MSE 1e-4 -> 40 dB
    out = psnr(p, t)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    assert torch.allclose(out[0], torch.full((3,), 20.0, dtype=torch.float64), atol=1e-4)
    assert math.isclose(out[1, 2].item(), 40.0, abs_tol=1e-3)
    assert psnr(t, t).isinf().all()
    # clipping: a prediction of 2 scores like one of 1
    assert psnr(torch.full((3, 4, 4), 2.0), torch.zeros(3, 4, 4)).item() == 0.0


def test_psnr_errors():
    with pytest.raises(ValueError, match=r"target shape \(3, 4, 5\) differs from pred shape"):
        psnr(torch.zeros(3, 4, 4), torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\), got pred \(4, 4, 4\)"):
        psnr(torch.zeros(4, 4, 4), torch.zeros(4, 4, 4))


def test_gaussian_window_is_scipys_11_taps():
    w = gaussian_window()
    assert w.numel() == 11 and math.isclose(w.sum().item(), 1.0, abs_tol=1e-15)
    from scipy.ndimage import gaussian_filter1d
    impulse = np.zeros(21)
    impulse[10] = 1
    ref = gaussian_filter1d(impulse, 1.5, truncate=3.5)[5:16]
    np.testing.assert_allclose(w.numpy(), ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape", [(3, 11, 11), (3, 23, 31), (3, 40, 17)])
def test_ssim_matches_direct_and_scipy_references(rng, shape):
    x, y = noisy_pair(rng, shape)
    got = ssim(x, y).item()
    xc, yc = x.numpy(), y.clamp(0, 1).numpy()
    assert abs(got - ssim_direct(xc, yc)) < 1e-10
    assert abs(got - ssim_scipy_as_skimage(xc, yc)) < 1e-10


def test_ssim_matches_skimage_when_installed(rng):
    metrics = pytest.importorskip("skimage.metrics")
    x, y = noisy_pair(rng, (3, 29, 37))
    ref = metrics.structural_similarity(
        x.numpy(), y.clamp(0, 1).numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=0)
    assert abs(ssim(x, y).item() - ref) < 1e-10


def test_ssim_batched_dtype_invariants(rng):
    x = torch.rand(2, 3, 3, 24, 20, generator=rng)
    noise = torch.randn(x.shape, generator=rng)
    y = x + 0.05 * noise
    out = ssim(x, y)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    for b in range(2):
        for v in range(3):
            assert abs(out[b, v].item() - ssim_direct(x[b, v].double().numpy(),
                                                     y[b, v].clamp(0, 1).double().numpy())) < 1e-10
    assert torch.allclose(ssim(x, x), torch.ones(2, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ssim(x, y), ssim(y, x), rtol=0, atol=1e-14)
    levels = [ssim(x, x + s * noise).mean().item() for s in (0.01, 0.05, 0.2, 0.5)]
    assert all(a > b for a, b in zip(levels, levels[1:])), levels
    # float32 and float64 inputs give the same score (computed in float64 either way)
    assert torch.allclose(ssim(x.double(), y.double()), out, rtol=0, atol=1e-12)


def test_ssim_too_small():
    with pytest.raises(ValueError, match="10x12 are smaller than the 11x11 window"):
        ssim(torch.zeros(3, 10, 12), torch.zeros(3, 10, 12))


# -- LPIPS ----------------------------------------------------------------------------------------

def test_lpips_missing_backbone_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = lpips_backbone_path("alex")
    assert path.startswith(str(tmp_path))
    assert not lpips_available("alex")
    reason = lpips_unavailable_reason("alex")
    assert path in reason and f"TORCH_HOME is {tmp_path}" in reason
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as e:
        LPIPSMetric("alex")
    assert str(tmp_path) in str(e.value)
    os.makedirs(os.path.dirname(path))
    open(path, "wb").close()                               # the check looks for the file only
    assert lpips_available("alex") and lpips_unavailable_reason("alex") is None
    assert "unknown LPIPS net 'squeeze'" in lpips_unavailable_reason("squeeze")
    with pytest.raises(ValueError, match="unknown LPIPS net 'squeeze'"):
        LPIPSMetric("squeeze", random_backbone_for_tests=True)


def test_lpips_random_backbone_plumbing(monkeypatch, tmp_path, rng):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))        # works without any cached file
    torch.manual_seed(0)
    metric = LPIPSMetric("alex", random_backbone_for_tests=True, batch_size=2)
    x = torch.rand(2, 3, 3, 64, 64, generator=rng)
    y = (x + 0.3 * torch.randn(x.shape, generator=rng))
    out = metric(x, y)
    assert out.shape == (2, 3) and torch.isfinite(out).all() and (out > 0).all()
    assert torch.equal(metric(x, x), torch.zeros(2, 3))
    assert metric(x[1, 2], y[1, 2]).shape == () and torch.allclose(metric(x[1, 2], y[1, 2]),
                                                                   out[1, 2])
    # the same as lpips itself on [-1, 1] inputs of the clipped images, image by image
    with torch.no_grad():
        ref = metric.net(x.flatten(0, 1) * 2 - 1, y.clamp(0, 1).flatten(0, 1) * 2 - 1).flatten()
    assert torch.allclose(out.flatten(), ref, rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in metric.net.parameters())


# -- depth ----------------------------------------------------------------------------------------

def test_depth_hand_computed():
    gt = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    pred = torch.tensor([[1.1, 2.0, 4.0, 8.0]])
    m = depth_metrics(pred, gt, align="none")
    assert set(m) == set(DEPTH_KEYS)
    assert math.isclose(m["abs_rel"], 0.1 / 4, rel_tol=1e-6)
    assert math.isclose(m["sq_rel"], 0.01 / 4, rel_tol=1e-5)
    assert math.isclose(m["rmse"], math.sqrt(0.01 / 4), rel_tol=1e-5)
    assert math.isclose(m["log_rmse"], abs(math.log(1.1)) / 2, rel_tol=1e-5)
    assert m["delta1"] == m["delta2"] == m["delta3"] == 1.0


def test_depth_scale_alignment(rng):
    gt = torch.rand(2, 3, 16, 12, generator=rng) * 5 + 0.5
    m = depth_metrics(2 * gt, gt, align="none")
    assert math.isclose(m["abs_rel"], 1.0, rel_tol=1e-12)
    assert math.isclose(m["log_rmse"], math.log(2), rel_tol=1e-12)
    assert math.isclose(m["rmse"], gt.double().square().mean((-2, -1)).sqrt().mean().item(),
                        rel_tol=1e-9)
    assert m["delta1"] == m["delta2"] == m["delta3"] == 0.0  # ratio 2 > 1.25^3 = 1.95
    for align in ("median", "lstsq", "lstsq_shift"):
        m = depth_metrics(2 * gt, gt, align=align)
        assert m["abs_rel"] < 1e-6 and m["rmse"] < 1e-5 and m["delta1"] == 1.0, (align, m)
    # scale and shift: only lstsq_shift removes it
    assert depth_metrics(3 * gt + 1, gt, align="lstsq_shift")["abs_rel"] < 1e-6
    assert depth_metrics(3 * gt + 1, gt, align="median")["abs_rel"] > 0.01


def test_depth_validity_mask_and_per_image_mean():
    gt = torch.ones(2, 4, 4)
    pred = torch.ones(2, 4, 4)
    pred[0] = 1.5                                          # image 0: abs_rel 0.5; image 1: 0
    gt[1, 0, 0] = 0                                        # invalid: its wild pred is ignored
    pred[1, 0, 0] = 100
    m = depth_metrics(pred, gt, align="none")
    assert math.isclose(m["abs_rel"], 0.25, rel_tol=1e-12) and m["delta1"] == 0.5
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    pred[1, 3, 3] = 50
    assert depth_metrics(pred, gt, align="none")["abs_rel"] > 1
    mask[1, 3, 3] = False
    assert math.isclose(depth_metrics(pred, gt, mask, align="none")["abs_rel"], 0.25)


def test_depth_errors():
    z = torch.ones(2, 4, 4)
    with pytest.raises(ValueError, match="align must be"):
        depth_metrics(z, z, align="mean")
    with pytest.raises(ValueError, match=r"pred \(2, 4, 4\) and gt \(2, 4, 5\)"):
        depth_metrics(z, torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match=r"mask shape \(4, 4\) differs"):
        depth_metrics(z, z, torch.ones(4, 4, dtype=torch.bool))
    gt = z.clone()
    gt[1] = 0
    with pytest.raises(ValueError, match=r"image 1 \(of 2, leading dims flattened\) has no valid"):
        depth_metrics(z, gt)


def test_mean_image_baseline(rng):
    views = torch.rand(2, 5, 3, 8, 8, generator=rng)
    mean = mean_image_baseline(views)
    assert mean.shape == (2, 3, 8, 8)
    assert torch.allclose(mean[1], sum(views[1, v] for v in range(5)) / 5, atol=1e-6)
    # the mean image is the best constant-per-pixel guess: it beats any single view on average
    score = psnr(mean[:, None].expand_as(views), views).mean()
    assert score > psnr(views[:, :1].expand_as(views), views)[:, 1:].mean()
    with pytest.raises(ValueError, match=r"\(\.\.\., V, 3, H, W\), got \(3, 8, 8\)"):
        mean_image_baseline(views[0, 0])
