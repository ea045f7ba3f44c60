"""Attention kernels: the PRoPE reference in plain PyTorch, fused Triton kernels beside it, and
the one dispatching entry point (`kernels.attention`) the models call."""
from kernels.attention import BACKENDS, PRoPECameras, attention, use_backend
from kernels.prope_ref import prope_attention_ref

__all__ = ["BACKENDS", "PRoPECameras", "attention", "use_backend", "prope_attention_ref",
           "prope_attention"]


def prope_attention(q, k, v, w2c, K, patches, image_size):
    """Fused PRoPE attention (kernels/prope_triton.py); same arguments and result as
    `prope_attention_ref`. Imported lazily so that `import kernels` never needs triton."""
    try:
        from kernels.prope_triton import prope_attention as fused
    except ImportError:
        return prope_attention_ref(q, k, v, w2c, K, patches, image_size)
    return fused(q, k, v, w2c, K, patches, image_size)
