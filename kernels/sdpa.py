"""PyTorch SDPA with the project's backend preference, shared by plain attention
(`kernels.attention`) and the PRoPE SDPA core (kernels/prope/sdpa_core.py).

On CUDA with 16-bit inputs cuDNN is tried first: on Hopper it is the faster backend (448 against
310 TFLOP/s forward at d = 64 on the H200, docs/gpu.md); flash, memory-efficient and math follow.
Elsewhere PyTorch's own choice (math on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["SDPA_BACKENDS", "sdpa"]

SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}
_PREFERENCE = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, h, N, d) tensors; backend: one key of `SDPA_BACKENDS`
    (that backend only), anything else the preference above."""
    if backend in SDPA_BACKENDS:
        with sdpa_kernel([SDPA_BACKENDS[backend]]):
            return F.scaled_dot_product_attention(q, k, v)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        with sdpa_kernel(_PREFERENCE, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
