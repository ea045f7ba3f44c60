"""PRoPE attention on the GPU kernels: `prope_attention`, the fused kernels' autograd Function,
and `resolve`, the one place that says which kernels run for a call.

Same arguments and result as `kernels.prope.reference.prope_attention_ref` (math:
docs/reference.md section 3; the per-token transforms: core.py). A call runs the SDPA core
(sdpa_core.py: transform passes around PyTorch SDPA) or the fused kernels: a forward (forward.py's
pre-pass, or forward_ws.py's warp-specialised one) and, with gradients, saves q, k, v, o and the
fp32 log2-sum-exp (B, h, N) (no transformed copies) for a backward (backward.py: two kernels, or
one with dq by reduce-adds). All transient scratch is freed before a call returns. Both camera
conventions (reference.py) run on every kernel: only the geometry kernel's key/value matrix
differs (core.py).

Default policy (`resolve`, from the H100 / H200 measurements in docs/gpu.md and
launch/results/prope_kernels_history.md):
- core: configs.py `DEFAULT_CORE` per head dim (the fused kernels everywhere until the
  training-step benchmark has measured the SDPA core, sdpa_core.py, in the model).
- forward, with gradients: the pre-pass forward, the faster at every measured shape (H200 d = 64:
  383 against 314 TFLOP/s forward); the warp-specialised one saves transient memory the backward
  needs anyway. Without gradients: the warp-specialised forward where it runs (Hopper sm_90,
  16-bit, d 48 / 64 / 128: plain attention's peak memory, o and the LSE, instead of 2 more
  tensors the size of k), else the pre-pass forward.
- backward: the one-kernel (atomic-dq) backward at d = 64 where dq's TMA reduce-add runs (Hopper;
  H100 forward+backward 8.06 against 8.38 ms at N = 10368), else the two-kernel one (equal time
  at d = 48 and 128 and on short sequences, with less memory).
Calls that the kernels do not take (`core.supported`: float64, fp16 at d > 64, head dims outside
16..128, CPU without the interpreter, mixed dtypes) run the reference. No gradient flows to the
cameras (w2c, K).
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from kernels.prope.backward import backward_atomic, backward_two_kernel, dq_tma_available
from kernels.prope.configs import PRoPEKernels, default_core
from kernels.prope.core import Geometry, dense, geometry, supported
from kernels.prope.forward import forward_prepass
from kernels.prope.forward_ws import forward_ws, ws_supported
from kernels.prope.sdpa_core import sdpa_core
from kernels.prope.reference import check_convention, check_prope_inputs, prope_attention_ref

__all__ = ["prope_attention", "resolve"]

_DEFAULT = PRoPEKernels()


@functools.lru_cache(maxsize=64)
def _concrete(kernels: PRoPEKernels, core: str, forward: str, backward: str) -> PRoPEKernels:
    # cached: a call's host time counts at short sequences (0.45 ms of kernels)
    return replace(kernels, core=core, forward=forward, backward=backward)


def resolve(kernels: Optional[PRoPEKernels], q: Tensor, grad: bool) -> Optional[PRoPEKernels]:
    """The kernels a call with query q runs: `kernels` (None: the defaults) with its "auto"
    core, forward and backward replaced by concrete ones (the module docstring's policy; an
    SDPA core keeps forward and backward "auto": it runs neither); `grad`:
    whether the call records a graph for a backward. None when the fused kernels do not take q
    (the reference runs). A forced "ws" forward where it cannot run is a ValueError."""
    if kernels is None:
        kernels = _DEFAULT
    elif not isinstance(kernels, PRoPEKernels):
        raise TypeError(f"kernels must be a PRoPEKernels or None, got {type(kernels).__name__}")
    if not supported(q):
        return None
    forward, backward = kernels.forward, kernels.backward
    core = kernels.core
    if core == "auto":   # a forced fused kernel means the fused core
        core = default_core(q.shape[-1]) if (forward, backward) == ("auto", "auto") else "fused"
    if core == "sdpa":
        return _concrete(kernels, core, "auto", "auto")
    if forward == "auto":
        forward = "ws" if not grad and ws_supported(q) else "prepass"
    elif forward == "ws" and not ws_supported(q):
        raise ValueError(f"PRoPEKernels(forward='ws') needs a Hopper GPU (sm_90), fp16/bf16 and "
                         f"d in (48, 64, 128); got {q.dtype}, d={q.shape[-1]}, device "
                         f"{q.device} (use 'auto' or 'prepass')")
    if backward == "auto":
        backward = "atomic" if q.shape[-1] == 64 and dq_tma_available(q) else "two_kernel"
    return _concrete(kernels, core, forward, backward)


def _forward(kernels: PRoPEKernels, q: Tensor, k: Tensor, v: Tensor,
             g: Geometry) -> tuple[Tensor, Tensor]:
    if kernels.forward == "ws":
        return forward_ws(q, k, v, g, kernels.ws)
    return forward_prepass(q, k, v, g, kernels)


class _PRoPEAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g: Geometry, kernels: PRoPEKernels):
        q, k, v = (dense(x) for x in (q, k, v))
        o, lse = _forward(kernels, q, k, v, g)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geometry = g
        ctx.kernels = kernels
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        run = backward_atomic if ctx.kernels.backward == "atomic" else backward_two_kernel
        dq, dk, dv = run(q, k, v, o, lse, do, ctx.geometry, ctx.kernels)
        return dq, dk, dv, None, None


def prope_attention(q: Tensor, k: Tensor, v: Tensor, w2c: Tensor, K: Tensor,
                    patches: tuple[int, int], image_size: tuple[int, int], *,
                    kernels: Optional[PRoPEKernels] = None,
                    convention: str = "textbook") -> Tensor:
    """Fused PRoPE attention; same arguments and result as `prope_attention_ref`.

    q, k, v: (B, h, N, d), N = V * ph * pw tokens ordered (view, row, column);
    w2c: (B, V, 4, 4) OpenCV world-to-camera; K: (B, V, 3, 3) pixel intrinsics;
    patches: (ph, pw); image_size: (H, W) pixels; kernels: which kernels (None: `resolve`'s
    defaults); convention: "textbook" or "release" (the key/value matrix, reference.py).
    Returns o: (B, h, N, d) in q's dtype.
    """
    check_prope_inputs(q, k, v, w2c, K, patches, image_size)
    check_convention(convention)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = resolve(kernels, q, grad)
    if chosen is None or k.dtype != q.dtype or v.dtype != q.dtype:
        return prope_attention_ref(q, k, v, w2c, K, patches, image_size, convention=convention)
    g = geometry(w2c, K, patches, image_size, q.shape[-1], q.device, convention)
    if chosen.core == "sdpa":
        return sdpa_core(q, k, v, g, chosen)
    if grad:
        return _PRoPEAttention.apply(q, k, v, g, chosen)
    q, k, v = (dense(x) for x in (q, k, v))
    return _forward(chosen, q, k, v, g)[0]
