"""The one attention entry point the models call.

`attention(q, k, v, cameras=None, *, backend="auto", prope_kernels=None)` with q, k, v
(B, h, N, d):
- with `cameras` (a `PRoPECameras`, which carries the camera convention): PRoPE attention over
  all views' tokens; the Triton kernels (kernels/prope/) on CUDA where they apply, the
  plain-PyTorch reference elsewhere. `prope_kernels` (a `PRoPEKernels`) picks the attention
  core (the fused kernels, or transform passes around SDPA) and the kernels (None: the default
  policy, `kernels.prope.fused.resolve`).
- without: plain softmax attention; the `flash_attn` package when installed (CUDA, fp16/bf16;
  FlashAttention-2's `flash_attn_func`, or FlashAttention-4's `flash_attn.cute` when only that is
  there), else PyTorch SDPA (kernels/sdpa.py: on CUDA cuDNN first, the faster backend on Hopper).

`backend` (one of `BACKENDS`) forces one implementation per call: "reference" (with cameras)
and "sdpa_math" are the CPU-exact paths tests use, "triton" the Triton kernels even on CPU (under
the Triton interpreter), "flash_attn" / "sdpa_*" one plain-attention backend. Nothing is global:
every choice travels with the call.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kernels.prope.configs import PRoPEKernels
from kernels.prope.reference import CONVENTIONS, check_convention, prope_attention_ref
from kernels.sdpa import sdpa

__all__ = ["PRoPECameras", "attention", "prope_attention", "BACKENDS", "CONVENTIONS",
           "flash_attn_available"]

BACKENDS = ("auto", "reference", "triton", "flash_attn", "sdpa", "sdpa_flash", "sdpa_cudnn",
            "sdpa_math")


@dataclass(frozen=True)
class PRoPECameras:
    """Cameras of the V views whose tokens an attention call mixes.

    w2c: (B, V, 4, 4) OpenCV world-to-camera; K: (B, V, 3, 3) pixel intrinsics;
    patches: (ph, pw) token grid per view; image_size: (H, W) in pixels; convention: PRoPE's
    key/value matrix, "textbook" (P^-1) or "release" (T^-1 lift(K_n), the published GLD
    weights'; kernels/prope/reference.py).
    """

    w2c: Tensor
    K: Tensor
    patches: tuple[int, int]
    image_size: tuple[int, int]
    convention: str = "textbook"

    def __post_init__(self):
        check_convention(self.convention, "PRoPECameras")


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    """flash_attn_func of FlashAttention-2 or -4 (flash_attn.cute), or None; looked up once
    (a failed import is not retried on every attention call)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_func  # FlashAttention-2
        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn.cute import flash_attn_func  # FlashAttention-4 (Hopper / Blackwell)
        return flash_attn_func
    except Exception as e:   # ImportError, or e.g. a RuntimeError from a missing CUDA flavour
        warnings.warn(f"flash_attn.cute present but unusable ({type(e).__name__}: {e}); "
                      f"plain attention uses PyTorch SDPA")
        return None


def flash_attn_available() -> bool:
    return _flash_attn_func() is not None


@functools.lru_cache(maxsize=None)
def _fused_prope():
    try:
        from kernels.prope.fused import prope_attention as fused  # triton is optional at import
    except ImportError:
        return None
    return fused


def prope_attention(q: Tensor, k: Tensor, v: Tensor, w2c: Tensor, K: Tensor,
                    patches: tuple[int, int], image_size: tuple[int, int], *,
                    kernels: Optional[PRoPEKernels] = None,
                    convention: str = "textbook") -> Tensor:
    """Fused PRoPE attention (kernels/prope/fused.py), or the reference where triton is not
    importable; same arguments and result as `prope_attention_ref`."""
    fused = _fused_prope()
    if fused is None:
        return prope_attention_ref(q, k, v, w2c, K, patches, image_size, convention=convention)
    return fused(q, k, v, w2c, K, patches, image_size, kernels=kernels, convention=convention)


def _flash_attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    flash_attn_func = _flash_attn_func()
    if flash_attn_func is None:
        raise RuntimeError("attention backend 'flash_attn' forced but no flash_attn package "
                           "(FlashAttention-2 or flash-attn-4) is importable")
    # flash_attn wants (B, N, h, d).
    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        softmax_scale=1.0 / math.sqrt(q.shape[-1]))
    if isinstance(o, tuple):  # FA4 may return (out, lse)
        o = o[0]
    return o.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, cameras: Optional[PRoPECameras] = None, *,
              backend: str = "auto", prope_kernels: Optional[PRoPEKernels] = None) -> Tensor:
    """Softmax attention (scale 1/sqrt(d)) over N tokens; PRoPE when `cameras` is given.

    q, k, v: (B, h, N, d) -> (B, h, N, d). backend: one of `BACKENDS`; prope_kernels: the fused
    PRoPE kernels to run (with cameras, on the fused path).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from "
                         f"{', '.join(BACKENDS)}")
    if prope_kernels is not None and not isinstance(prope_kernels, PRoPEKernels):
        raise TypeError(f"prope_kernels must be a PRoPEKernels or None, got "
                        f"{type(prope_kernels).__name__}")
    if cameras is not None:
        # The fused kernels themselves fall back to the reference where they do not apply
        # (CPU without the Triton interpreter, float64, unsupported head dims).
        args = (q, k, v, cameras.w2c, cameras.K, cameras.patches, cameras.image_size)
        if backend == "triton" or (backend == "auto" and q.is_cuda):
            if backend == "triton" and _fused_prope() is None:
                raise RuntimeError("attention backend 'triton' forced but kernels.prope.fused "
                                   "is not importable")
            return prope_attention(*args, kernels=prope_kernels, convention=cameras.convention)
        return prope_attention_ref(*args, convention=cameras.convention)
    if backend == "flash_attn" or (
        backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and flash_attn_available()
    ):
        return _flash_attn(q, k, v)
    return sdpa(q, k, v, backend)
