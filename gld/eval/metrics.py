"""Image and depth metrics of generated views (docs/reference.md section 5).

Images are (..., 3, H, W) RGB in [0, 1], any leading dims (for example (B, V)); they are clipped
to [0, 1] first, as the release does, and PSNR / SSIM are computed in float64 so a score does not
depend on the input dtype. Per-image values come back with the leading shape; the reported number
is their mean.

- PSNR: `-10 log10(MSE)` per image, data range 1 (identical images give +inf).
- SSIM: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5, scipy's truncation at 3.5
  sigma), K1 = 0.01, K2 = 0.03, population (co)variances, the SSIM map kept only where the window
  fits inside the image ('valid') and averaged over pixels and channels. This is what skimage's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=0)` computes (it filters with reflect padding, then crops the border
  of (11 - 1) / 2 pixels). torchmetrics' SSIM differs slightly (no crop).
- LPIPS: the `lpips` package on inputs scaled to [-1, 1]. Its backbone (torchvision's cached
  AlexNet / VGG16) cannot be downloaded on the training machines: `lpips_available` says whether
  it is there so a report can record LPIPS as unavailable, with `lpips_unavailable_reason`.
- Depth: errors against exact ground-truth depth where gt > 0, after aligning the prediction's
  scale (DA3's depth of generated views is up to scale), see `depth_metrics`.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from gld.models.decoder_loss import LPIPS_BACKBONES, lpips_backbone_path

__all__ = ["psnr", "ssim", "gaussian_window", "LPIPSMetric", "lpips_available",
           "lpips_unavailable_reason", "depth_metrics", "DEPTH_KEYS", "mean_image_baseline"]

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def _image_pair(pred: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if pred.dim() < 3 or pred.shape[-3] != 3:
        raise ValueError(f"{name}: images must be (..., 3, H, W), got pred {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: target shape {tuple(target.shape)} differs from pred shape "
                         f"{tuple(pred.shape)}")
    return (pred.detach().to(torch.float64).clamp(0, 1),
            target.detach().to(torch.float64).clamp(0, 1))


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB per image: pred, target (..., 3, H, W) in [0, 1] -> (...) float64."""
    p, t = _image_pair(pred, target, "psnr")
    mse = (p - t).square().mean(dim=(-3, -2, -1))
    return -10 * torch.log10(mse)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE,
                    dtype=torch.float64, device=None) -> Tensor:
    """The normalised 1-D Gaussian (2r + 1,) with r = int(truncate * sigma + 0.5) (scipy's
    gaussian_filter); r = 5, 11 taps, for the SSIM defaults."""
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM per image (see the module docstring): (..., 3, H, W) -> (...) float64.

    H and W must be at least the window size (11)."""
    p, t = _image_pair(pred, target, "ssim")
    lead, (C, H, W) = p.shape[:-3], p.shape[-3:]
    w = gaussian_window(device=p.device)
    if H < w.numel() or W < w.numel():
        raise ValueError(f"ssim: images of {H}x{W} are smaller than the {w.numel()}x{w.numel()} "
                         f"window")
    wy = w.view(1, 1, -1, 1).expand(C, 1, -1, 1)
    wx = w.view(1, 1, 1, -1).expand(C, 1, 1, -1)

    def filt(x: Tensor) -> Tensor:  # separable Gaussian, 'valid': (N, C, H-10, W-10)
        return F.conv2d(F.conv2d(x, wy, groups=C), wx, groups=C)

    x, y = p.reshape(-1, C, H, W), t.reshape(-1, C, H, W)
    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2                     # data range 1
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(-3, -2, -1)).reshape(lead)


def _lpips_package_problem(net: str) -> str | None:
    if net not in LPIPS_BACKBONES:
        return f"unknown LPIPS net {net!r}; expected one of {sorted(LPIPS_BACKBONES)}"
    if importlib.util.find_spec("lpips") is None:
        return "the lpips package is not installed"
    return None


def lpips_unavailable_reason(net: str = "alex") -> str | None:
    """None when LPIPS with backbone `net` can be built offline, else why not (for a report)."""
    reason = _lpips_package_problem(net)
    if reason is not None:
        return reason
    path = lpips_backbone_path(net)
    if not os.path.isfile(path):
        return (f"LPIPS backbone '{net}' not found: torchvision's cached weights are expected at "
                f"{path} ($TORCH_HOME/hub/checkpoints; TORCH_HOME is "
                f"{os.environ.get('TORCH_HOME', 'unset, so ~/.cache/torch')}); nothing is "
                f"downloaded here: fetch {LPIPS_BACKBONES[net][1]} on a machine with network and "
                f"copy it there")
    return None


def lpips_available(net: str = "alex") -> bool:
    """Whether `LPIPSMetric(net)` can be built here (package installed, backbone cached)."""
    return lpips_unavailable_reason(net) is None


class LPIPSMetric:
    """LPIPS per image with the `lpips` package (net 'alex', its default, or 'vgg').

    __call__(pred, target): (..., 3, H, W) in [0, 1] -> (...) float32, lower is better; inputs
    are clipped to [0, 1] and scaled to [-1, 1]; evaluated in fp32 without gradients, in chunks
    of `batch_size` images. The network follows the inputs' device.

    A missing backbone is a FileNotFoundError naming the file and TORCH_HOME (check
    `lpips_available` first to record LPIPS as unavailable instead). random_backbone_for_tests
    builds it on a random backbone: plumbing tests only, its values mean nothing.
    """

    def __init__(self, net: str = "alex", *, random_backbone_for_tests: bool = False,
                 batch_size: int = 16):
        problem = _lpips_package_problem(net)
        if problem is not None:
            raise (ValueError if net not in LPIPS_BACKBONES else ImportError)(
                f"LPIPSMetric: {problem}")
        reason = None if random_backbone_for_tests else lpips_unavailable_reason(net)
        if reason is not None:
            raise FileNotFoundError(f"LPIPSMetric: {reason}")
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated `pretrained=`
            model = lpips.LPIPS(net=net, pnet_rand=random_backbone_for_tests, verbose=False)
        self.net_name, self.batch_size = net, batch_size
        self.net = model.eval().requires_grad_(False).float()

    @torch.no_grad()
    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        p, t = _image_pair(pred, target, "LPIPSMetric")
        lead = p.shape[:-3]
        p, t = (x.reshape(-1, *x.shape[-3:]).float() * 2 - 1 for x in (p, t))
        if next(self.net.parameters()).device != p.device:
            self.net.to(p.device)
        out = [self.net(p[i:i + self.batch_size], t[i:i + self.batch_size]).flatten()
               for i in range(0, p.shape[0], self.batch_size)]
        return torch.cat(out).reshape(lead)


DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "log_rmse", "delta1", "delta2", "delta3")
_MIN_DEPTH = 1e-6  # aligned predictions are clamped here so log and ratios stay finite


def _align(p: Tensor, g: Tensor, align: str) -> Tensor:
    if align == "none":
        return p
    if align == "median":
        return p * (g.median() / p.median())
    if align == "lstsq":                                   # argmin_s |s p - g|^2
        return p * ((p * g).sum() / (p * p).sum())
    pc = p - p.mean()                                      # "lstsq_shift": argmin |s p + t - g|^2
    s = (pc * (g - g.mean())).sum() / (pc * pc).sum()
    return s * p + (g.mean() - s * p.mean())


def depth_metrics(pred: Tensor, gt: Tensor, mask: Tensor | None = None,
                  align: str = "median") -> dict[str, float]:
    """Depth errors of pred against exact ground truth, averaged over images.

    Args:
        pred, gt: (..., H, W) planar depth. Valid pixels: gt > 0 and finite, pred finite, and
            `mask` (..., H, W) bool when given.
        align: per image, over its valid pixels: "none"; "median" (pred * median(gt) /
            median(pred), torch's median: the lower middle value of an even count); "lstsq"
            (the least-squares scale s of s * pred = gt); "lstsq_shift" (least-squares scale
            and shift). The aligned pred is clamped below at 1e-6.
    Returns:
        {"abs_rel": mean |p - g| / g, "sq_rel": mean (p - g)^2 / g, "rmse", "log_rmse" (of
        log p - log g), "delta1/2/3": fraction with max(p/g, g/p) < 1.25, 1.25^2, 1.25^3}, each
        the mean over images of the per-image value, as Python floats.
    """
    if align not in ("none", "median", "lstsq", "lstsq_shift"):
        raise ValueError(f"depth_metrics: align must be 'none', 'median', 'lstsq' or "
                         f"'lstsq_shift', got {align!r}")
    if pred.dim() < 2 or pred.shape != gt.shape:
        raise ValueError(f"depth_metrics: pred and gt must both be (..., H, W) of one shape, got "
                         f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)}")
    if mask is not None and mask.shape != gt.shape:
        raise ValueError(f"depth_metrics: mask shape {tuple(mask.shape)} differs from depth "
                         f"shape {tuple(gt.shape)}")
    n_pix = gt.shape[-2] * gt.shape[-1]
    p_all = pred.detach().to(torch.float64).reshape(-1, n_pix)       # (images, H*W)
    g_all = gt.detach().to(torch.float64).reshape(-1, n_pix)
    valid = (g_all > 0) & torch.isfinite(g_all) & torch.isfinite(p_all)
    if mask is not None:
        valid &= mask.detach().to(torch.bool).reshape(-1, n_pix).to(valid.device)
    rows = []
    for i in range(p_all.shape[0]):
        p, g = p_all[i][valid[i]], g_all[i][valid[i]]
        if g.numel() == 0:
            raise ValueError(f"depth_metrics: image {i} (of {p_all.shape[0]}, leading dims "
                             f"flattened) has no valid pixel (gt > 0, finite, in mask)")
        p = _align(p, g, align).clamp_min(_MIN_DEPTH)
        ratio = torch.maximum(p / g, g / p)
        rows.append(torch.stack([
            ((p - g).abs() / g).mean(), ((p - g).square() / g).mean(),
            (p - g).square().mean().sqrt(), (p.log() - g.log()).square().mean().sqrt(),
            (ratio < 1.25).double().mean(), (ratio < 1.25 ** 2).double().mean(),
            (ratio < 1.25 ** 3).double().mean()]))
    mean = torch.stack(rows).mean(0)
    return {k: float(v) for k, v in zip(DEPTH_KEYS, mean)}


def mean_image_baseline(images_of_scene: Tensor) -> Tensor:
    """The scene's mean image: (..., V, 3, H, W) -> (..., 3, H, W), the pixel-wise mean of its V
    views.

    The baseline a report compares generated target views against: a "prediction" that knows
    the scene's colours but nothing of its geometry or the target camera. Score it with the same
    metric, `psnr(mean_image_baseline(views)[..., None, :, :, :].expand_as(targets), targets)`.
    Which views go in is the caller's choice and belongs in the report: all of the scene's views,
    targets included, favour the baseline (beating it is the conservative claim).
    """
    if images_of_scene.dim() < 4 or images_of_scene.shape[-3] != 3:
        raise ValueError(f"mean_image_baseline: views must be (..., V, 3, H, W), got "
                         f"{tuple(images_of_scene.shape)}")
    return images_of_scene.clamp(0, 1).mean(dim=-4)
