"""The one-kernel (atomic-dq) PRoPE backward (kernels/prope/backward.py `backward_atomic`)
against the float64 reference; the two-kernel backward is tested through autograd in
test_prope_fused.py.

CPU: the Triton interpreter, fp32, dq / dk / dv within 1e-4 relative error of the float64
autograd gradients of `prope_attention_ref` (see test_prope_fused.py for the bound). As there,
the interpreter cases run in-process only when this process started with TRITON_INTERPRET=1;
otherwise `test_interpreter_cases_in_subprocess` reruns them in a fresh process that has it.
GPU (marker `gpu`): bf16, error against float64 at most 2x that of the PyTorch reference run in
bf16, with dq added per element and by TMA reduce-add.
"""
from dataclasses import replace

import pytest
import torch

from kernels import PRoPEKernels, prope_attention_ref
from kernels.prope.backward import backward_atomic, dq_tma_available
from kernels.prope.bench import random_inputs
from kernels.prope.configs import AtomicConfig, default_config
from kernels.prope.core import geometry
from kernels.prope.forward import forward_prepass
from tests.test_prope_ref import make_inputs
from tests.triton_interp import assert_within_twice, interp, interpreter_subprocess_test, rel


test_interpreter_cases_in_subprocess = interpreter_subprocess_test(__file__)


def strided(t, dtype, device):
    """t (B, h, N, d) as a (B, N, h, d) tensor viewed as (B, h, N, d): non-contiguous."""
    return t.detach().transpose(1, 2).contiguous().to(device, dtype).transpose(1, 2)


def atomic_grads(q, k, v, w2c, K, patches, image, do, dtype, device, cfg=None,
                 convention="textbook"):
    """backward_atomic's (dq, dk, dv) after the pre-pass forward; each in its input's dtype and
    strides."""
    ins = [strided(t, dtype, device) for t in (q, k, v)]
    g = geometry(w2c.to(device, torch.float32), K.to(device, torch.float32), patches, image,
                 q.shape[-1], device, convention)
    o, lse = forward_prepass(*ins, g)
    grads = backward_atomic(*ins, o, lse, do.to(device, dtype), g, PRoPEKernels(atomic=cfg))
    for a, x in zip(grads, ins):
        assert a.shape == x.shape and a.stride() == x.stride() and a.dtype == dtype
    return grads


def reference_grads(q, k, v, w2c, K, patches, image, do, dtype=torch.float64, device="cpu",
                    convention="textbook"):
    ins = [t.detach().to(device, dtype).clone().requires_grad_(True) for t in (q, k, v)]
    cam = torch.float64 if dtype == torch.float64 else torch.float32
    r = prope_attention_ref(*ins, w2c.to(device, cam), K.to(device, cam), patches, image,
                            convention=convention)
    r.backward(do.to(device, dtype))
    return [t.grad for t in ins]


@interp
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (5, 7))])
def test_interp_atomic_backward_matches_reference(d, V, patches, convention):
    """3 views of 3x5 (N = 45: 3 blocks of 16, the last masked) and 2 views of 5x7 (N = 70:
    5 blocks, the last masked); random cameras; every head dim (48 runs padded to 64); B = 2
    with (B, N, h, d) inputs viewed as (B, h, N, d)."""
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=2, h=1, V=V, patches=patches, d=d, image=image, seed=d + V)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = atomic_grads(q, k, v, w2c, K, patches, image, do, torch.float32, "cpu",
                       cfg=AtomicConfig(16, 16, 1, 1), convention=convention)
    want = reference_grads(q, k, v, w2c, K, patches, image, do, convention=convention)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= 1e-4, f"{name}: relative error {rel(a, b):.2e}"


@interp
def test_interp_tma_path_needs_a_gpu():
    q, k, v, w2c, K = make_inputs(B=1, h=1, V=1, patches=(2, 2), d=16, image=(28, 28),
                                  dtype=torch.float32)
    assert not dq_tma_available(q)
    with pytest.raises(ValueError, match=r"AtomicConfig\(dq_tma=True\) needs a compiled"):
        atomic_grads(q, k, v, w2c, K, (2, 2), (28, 28), torch.ones_like(q), torch.float32, "cpu",
                     cfg=AtomicConfig(16, 16, 1, 1, dq_tma=True))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("dq_tma", [False, True])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (4, (9, 11)), (2, (18, 18))])
def test_gpu_bf16_error_at_most_twice_reference(dq_tma, d, V, patches, convention):
    if dq_tma and not dq_tma_available(torch.empty(1, device="cuda")):
        pytest.skip("no TMA reduce-add here (compute capability < 9 or old triton)")
    q, k, v, w2c, K, patches, image = random_inputs(2, 3, d, V, patches, torch.float64, "cpu",
                                                    seed=d + V)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = replace(default_config("atomic", d), dq_tma=dq_tma)
    got = atomic_grads(q, k, v, w2c, K, patches, image, do, torch.bfloat16, "cuda", cfg,
                       convention)
    want = reference_grads(q, k, v, w2c, K, patches, image, do, convention=convention)
    base = reference_grads(q, k, v, w2c, K, patches, image, do, torch.bfloat16, "cuda",
                           convention)
    assert_within_twice(("dq", "dk", "dv"), got, base, want)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [48, 64])
def test_gpu_float32(d):
    q, k, v, w2c, K, patches, image = random_inputs(1, 2, d, 3, (6, 7), torch.float64, "cpu",
                                                    seed=7)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = atomic_grads(q, k, v, w2c, K, patches, image, do, torch.float32, "cuda")
    want = reference_grads(q, k, v, w2c, K, patches, image, do)
    for a, b in zip(got, want):
        assert rel(a, b.cuda()) <= 1e-4
