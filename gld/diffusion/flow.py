"""Rectified-flow path, training times and loss (docs/reference.md section 2, docs/release-facts.md).

Path: `x_t = (1 - t) x + t eps`, t = 0 is data and t = 1 is noise; the network predicts the
velocity `eps - x`. One t per sample, shared by all of its views. The loss is the MSE of the
velocity over all views (the release's choice) or over target views only.

Time shift (one definition): `shift(t) = a t / (1 + (a - 1) t)`, with `a` the *time shift*. It is
applied to training times and to the sampler's grid alike, so a model must be sampled with the
value it was trained with: `a` is resolved once (`resolve_time_shift`) and stored in every
checkpoint. By default `a = sqrt(latent_dim / 4096)` with `latent_dim` = channels x tokens x views
of one sample's latent. The release computes its `a` inconsistently (19.60 in training from a
fallback latent size, 31.18 at evaluation); both are reachable by name for its files.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from gld.diffusion.config import DiffusionConfig

__all__ = ["RELEASE_TRAIN_SHIFT", "RELEASE_EVAL_SHIFT", "shift_time", "resolve_time_shift",
           "sample_times", "interpolate", "velocity_target", "flow_loss"]

# The release's training shift: its config names no latent size, so it falls back to
# (768, 16, 16) x 8 views. Its evaluation shift: (1536, 18, 18) x 8 views.
RELEASE_TRAIN_SHIFT = math.sqrt(768 * 16 * 16 * 8 / 4096)
RELEASE_EVAL_SHIFT = math.sqrt(1536 * 18 * 18 * 8 / 4096)
_NAMED_SHIFTS = {"release_train": RELEASE_TRAIN_SHIFT, "release_eval": RELEASE_EVAL_SHIFT}


def shift_time(t: Tensor, shift: float) -> Tensor:
    """`a t / (1 + (a - 1) t)`: maps [0, 1] onto itself, monotone, towards 1 (noise) for a > 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolve_time_shift(cfg: DiffusionConfig, latent_dim: Optional[int] = None) -> float:
    """The time shift `a` this model trains and samples with.

    cfg.time_shift: a number is used as is; "release_train" / "release_eval" name the release's
    two values; "auto" derives `sqrt(latent_dim / cfg.shift_base)` from one sample's latent size
    (channels x tokens per view x views), which must then be given.
    """
    value = cfg.time_shift
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value in _NAMED_SHIFTS:
        return _NAMED_SHIFTS[value]
    if value == "auto":
        if latent_dim is None or latent_dim <= 0:
            raise ValueError("diffusion.time_shift='auto' needs the latent size (channels x "
                             f"tokens x views) of one sample, got {latent_dim!r}")
        return math.sqrt(latent_dim / cfg.shift_base)
    raise ValueError(f"diffusion.time_shift: expected a number, 'auto', 'release_train' or "
                     f"'release_eval', got {value!r}")


def sample_times(n: int, cfg: DiffusionConfig, shift: float,
                 generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """(n,) training times: drawn from `cfg.time_dist` on [0, cfg.t_max], then shifted."""
    if cfg.time_dist == "uniform":
        t = torch.rand(n, generator=generator, device=device) * cfg.t_max
    elif cfg.time_dist == "logit_normal":
        z = torch.randn(n, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
        t = torch.sigmoid(z) * cfg.t_max
    else:
        raise ValueError(f"diffusion.time_dist: unknown {cfg.time_dist!r}")
    return shift_time(t, shift)


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be (B,) with B = {x.shape[0]} (one time per sample), "
                         f"got {tuple(t.shape)}")
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t eps; x, eps (B, ...) and t (B,)."""
    tb = _per_sample(t, x)
    return (1.0 - tb) * x + tb * eps


def velocity_target(x: Tensor, eps: Tensor) -> Tensor:
    """d x_t / d t = eps - x."""
    return eps - x


def flow_loss(pred: Tensor, x: Tensor, eps: Tensor, view_mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared velocity error, fp32. pred, x, eps: (B, V, N, C).

    view_mask: None (all views, the release's loss) or (B, V) bool of the views that count; the
    mean is over the counted views' elements.
    """
    err = (pred.float() - velocity_target(x.float(), eps.float())).square()
    if view_mask is None:
        return err.mean()
    if view_mask.shape != pred.shape[:2]:
        raise ValueError(f"view_mask must be (B, V) = {tuple(pred.shape[:2])}, "
                         f"got {tuple(view_mask.shape)}")
    w = view_mask.to(err.dtype).view(*view_mask.shape, *([1] * (err.dim() - 2)))
    count = w.sum() * err[0, 0].numel()
    if count == 0:
        raise ValueError("flow_loss: view_mask selects no view")
    return (err * w).sum() / count
