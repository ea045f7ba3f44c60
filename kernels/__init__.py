"""Attention kernels: the PRoPE reference in plain PyTorch, fused Triton kernels beside it, and
the one dispatching entry point (`kernels.attention`) the models call."""
from kernels.attention import BACKENDS, PRoPECameras, attention, use_backend
from kernels.prope_ref import prope_attention_ref

__all__ = ["BACKENDS", "PRoPECameras", "attention", "use_backend", "prope_attention_ref"]
