"""Attention kernels: the PRoPE reference in plain PyTorch, fused Triton / Gluon kernels beside it
(`kernels/prope/`), and the one dispatching entry point (`kernels.attention`) the models call."""
from kernels.attention import BACKENDS, PRoPECameras, attention, prope_attention
from kernels.prope.configs import PRoPEKernels
from kernels.prope.reference import prope_attention_ref

__all__ = ["BACKENDS", "PRoPECameras", "PRoPEKernels", "attention", "prope_attention",
           "prope_attention_ref"]
