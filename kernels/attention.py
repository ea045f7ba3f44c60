"""The one attention entry point the models call.

`attention(q, k, v, cameras=None)` with q, k, v (B, h, N, d):
- with `cameras` (a `PRoPECameras`): PRoPE attention over all views' tokens; the fused Triton
  kernel on CUDA when it is available, the plain-PyTorch reference elsewhere.
- without: plain softmax attention; the `flash_attn` package when installed (CUDA, fp16/bf16;
  FlashAttention-2's `flash_attn_func`, or FlashAttention-4's `flash_attn.cute` when only that is
  there), else PyTorch SDPA (on CUDA cuDNN first: on the H100 it is the faster backend, 468 vs
  301 TFLOP/s forward at d=64, see launch/results/profile_kernels_*.md; flash next).

`use_backend(name)` forces one backend (tests and benchmarks); names are in `BACKENDS`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.prope_ref import prope_attention_ref

__all__ = ["PRoPECameras", "attention", "use_backend", "BACKENDS", "current_backend"]

BACKENDS = ("auto", "reference", "triton", "flash_attn", "sdpa", "sdpa_flash", "sdpa_cudnn",
            "sdpa_math")
_forced: Optional[str] = None


@dataclass(frozen=True)
class PRoPECameras:
    """Cameras of the V views whose tokens an attention call mixes.

    w2c: (B, V, 4, 4) OpenCV world-to-camera; K: (B, V, 3, 3) pixel intrinsics;
    patches: (ph, pw) token grid per view; image_size: (H, W) in pixels.
    """

    w2c: Tensor
    K: Tensor
    patches: tuple[int, int]
    image_size: tuple[int, int]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force an attention backend inside the block (e.g. "reference", "sdpa_math")."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    prev, _forced = _forced, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced = prev


def current_backend() -> str:
    return _forced or "auto"


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


def _triton_prope():
    try:
        from kernels.prope_triton import prope_attention  # triton is optional at import
    except ImportError:
        return None
    return prope_attention


def _sdpa(q: Tensor, k: Tensor, v: Tensor, backend: Optional[str]) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
             "sdpa_math": SDPBackend.MATH}
    if backend in table:
        with sdpa_kernel([table[backend]]):
            return F.scaled_dot_product_attention(q, k, v)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # cuDNN is the faster backend on Hopper (gpu.md); flash is the fallback.
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


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


def attention(q: Tensor, k: Tensor, v: Tensor, cameras: Optional[PRoPECameras] = None) -> Tensor:
    """Softmax attention (scale 1/sqrt(d)) over N tokens; PRoPE when `cameras` is given.

    q, k, v: (B, h, N, d) -> (B, h, N, d).
    """
    backend = _forced
    if cameras is not None:
        # The fused kernel itself falls back to the reference where it does not apply
        # (CPU without the Triton interpreter, float64, unsupported head dims).
        args = (q, k, v, cameras.w2c, cameras.K, cameras.patches, cameras.image_size)
        if backend in (None, "triton") and (q.is_cuda or backend == "triton"):
            fused = _triton_prope()
            if fused is not None:
                return fused(*args)
            if backend == "triton":
                raise RuntimeError("attention backend 'triton' forced but kernels.prope_triton "
                                   "is not importable")
        return prope_attention_ref(*args)
    if backend == "flash_attn" or (
        backend is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and flash_attn_available()
    ):
        return _flash_attn(q, k, v)
    return _sdpa(q, k, v, backend)
