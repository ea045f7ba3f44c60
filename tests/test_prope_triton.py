"""Fused PRoPE kernel against the PyTorch reference.

CPU: the Triton interpreter, fp32, output and every gradient within 1e-4 relative error of a
float64 reference. Triton fixes compiled vs interpreted when it is first imported, so the
interpreter cases (`interp` in their names) run in-process only when this process started with
TRITON_INTERPRET=1; otherwise `test_interpreter_cases_in_subprocess` reruns them in a fresh
process that has it (robust to whatever the rest of the suite imported first).
GPU (marker `gpu`): bf16 / fp16, error against float64 at most 2x that of the PyTorch reference
run in the same dtype.
"""
import math

import pytest
import torch

from kernels import PRoPECameras, attention, prope_attention_ref, use_backend
from kernels import prope_triton
from kernels.prope_triton import prope_attention
from tests.test_prope_ref import make_inputs
from tests.triton_interp import (ON_INTERPRETER, assert_within_twice, gpu_forward_case, interp,
                                 interpreter_subprocess_test, rel)


test_interpreter_cases_in_subprocess = interpreter_subprocess_test(__file__)


def run_both(q, k, v, w2c, K, patches, image, fused_dtype=torch.float32, device="cpu", seed=1):
    """(fused outputs and grads in fused_dtype, float64 reference outputs and grads)."""
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    ins = [t.detach().to(device, fused_dtype).clone().requires_grad_(True) for t in (q, k, v)]
    o = prope_attention(*ins, w2c.to(device, torch.float32), K.to(device, torch.float32),
                        patches, image)
    o.backward(do.to(device, fused_dtype))
    refs = [t.detach().double().clone().requires_grad_(True) for t in (q, k, v)]
    r = prope_attention_ref(*refs, w2c.double(), K.double(), patches, image)
    r.backward(do)
    return [o] + [t.grad for t in ins], [r] + [t.grad for t in refs]


@interp
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (5, 7))])
def test_interp_matches_reference(d, V, patches):
    """3 views of 3x5 (15 tokens per view: one masked block of 16) and 2 views of 5x7
    (35 tokens: 3 blocks, the last masked); random cameras; every head dim."""
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=1, h=2, V=V, patches=patches, d=d, image=image, seed=d)
    got, want = run_both(q, k, v, w2c, K, patches, image)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= 1e-4, f"{name}: relative error {rel(a, b):.2e}"


@interp
@pytest.mark.parametrize("kind", prope_triton.FORWARDS)
@pytest.mark.parametrize("d", [16, 48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (5, 7))])
def test_interp_inference_forward_matches_reference(kind, d, V, patches):
    """No-grad calls (either forward kernel): o within 1e-4 of float64; the no-scratch kernel's
    LSE equals the pre-pass forward's (the backward reads it when it is the training forward)."""
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=2, h=2, V=V, patches=patches, d=d, image=image, seed=d + 1)
    prev = dict(prope_triton._FORWARD)
    prope_triton.set_forward(infer=kind)
    try:
        with torch.no_grad():
            o = prope_attention(q.float(), k.float(), v.float(), w2c.float(), K.float(), patches,
                                image)
    finally:
        prope_triton._FORWARD.update(prev)
    r = prope_attention_ref(q, k, v, w2c, K, patches, image)
    assert rel(o, r) <= 1e-4, rel(o, r)
    g = prope_triton._geometry(w2c.float(), K.float(), patches, image, d, q.device)
    from kernels.prope_fwd_inloop import forward_merged
    _, lse_inloop = forward_merged(q.float(), k.float(), v.float(), g, patches)
    _, lse_prepass = prope_triton._forward(q.float(), k.float(), v.float(), g)
    torch.testing.assert_close(lse_inloop, lse_prepass, rtol=1e-5, atol=1e-5)


@interp
def test_interp_atomic_backward_through_autograd():
    """set_backward("atomic") at forward time routes .backward() to the one-kernel backward."""
    patches, V, d = (5, 7), 2, 64
    image = (70, 98)
    q, k, v, w2c, K = make_inputs(B=1, h=2, V=V, patches=patches, d=d, image=image, seed=5)
    prope_triton.set_backward("atomic")
    try:
        got, want = run_both(q, k, v, w2c, K, patches, image)
    finally:
        prope_triton.set_backward("auto")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert rel(a, b) <= 1e-4, f"{name}: relative error {rel(a, b):.2e}"


def test_backward_choice():
    with pytest.raises(ValueError, match="set_backward: 'fast'; choose one of"):
        prope_triton.set_backward("fast")
    with pytest.raises(ValueError, match="set_forward: infer='inloop'; choose one of"):
        prope_triton.set_forward(infer="inloop")
    # "auto" takes the atomic-dq backward only where its TMA reduce-add runs (Hopper, d = 64)
    assert prope_triton._backward_kind(torch.empty(1, 1, 4, 64)) == "two_kernel"


@interp
def test_interp_strided_inputs_and_batch():
    """(B, N, h, d) tensors viewed as (B, h, N, d): non-contiguous token/head strides; B = 2."""
    B, h, V, patches, d = 2, 2, 2, (2, 3), 32
    image = (28, 42)
    q, k, v, w2c, K = make_inputs(B=B, h=h, V=V, patches=patches, d=d, image=image, seed=3)
    N = q.shape[2]
    qs, ks, vs = (t.transpose(1, 2).contiguous().float().requires_grad_(True) for t in (q, k, v))
    o = prope_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                        w2c.float(), K.float(), patches, image)
    assert o.shape == (B, h, N, d)
    do = torch.randn(o.shape, dtype=torch.float64)
    o.backward(do.float())
    refs = [t.detach().double().clone().requires_grad_(True) for t in (q, k, v)]
    r = prope_attention_ref(*refs, w2c, K, patches, image)
    r.backward(do)
    assert rel(o, r) <= 1e-4
    for a, b in zip((qs.grad.transpose(1, 2), ks.grad.transpose(1, 2), vs.grad.transpose(1, 2)),
                    (t.grad for t in refs)):
        assert rel(a, b) <= 1e-4


def test_supported_head_dims():
    for d in (16, 48, 64, 96, 128):
        assert prope_triton.supported(torch.empty(1, 1, 1, d, device="meta")) is False  # meta
    x = torch.empty(1, 1, 1, 64, dtype=torch.float32)
    assert prope_triton.supported(x) == ON_INTERPRETER
    for d in (8, 44, 136, 256):
        assert not prope_triton.supported(torch.empty(1, 1, 1, d, dtype=torch.float32))


def test_fallbacks_use_the_reference():
    q, k, v, w2c, K = make_inputs(d=16)  # float64 and d=16: both outside the kernel
    torch.testing.assert_close(prope_attention(q, k, v, w2c, K, (3, 5), (42, 70)),
                               prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70)))


@pytest.mark.skipif(ON_INTERPRETER, reason="this process interprets")
def test_cpu_without_interpreter_uses_reference():
    q, k, v, w2c, K = make_inputs(d=32, dtype=torch.float32)
    assert not prope_triton.supported(q)
    torch.testing.assert_close(prope_attention(q, k, v, w2c.float(), K.float(), (3, 5), (42, 70)),
                               prope_attention_ref(q, k, v, w2c.float(), K.float(), (3, 5),
                                                   (42, 70)))


@interp
def test_interp_entry_point_forced_triton_backend():
    q, k, v, w2c, K = make_inputs(B=1, h=1, V=2, patches=(2, 4), d=32, image=(28, 56),
                                  dtype=torch.float32)
    cams = PRoPECameras(w2c.float(), K.float(), (2, 4), (28, 56))
    with use_backend("triton"):
        out = attention(q, k, v, cams)
    ref = prope_attention_ref(q.double(), k.double(), v.double(), w2c, K, (2, 4), (28, 56))
    assert rel(out, ref) <= 1e-4


def test_shape_errors_come_from_the_shared_check():
    q, k, v, w2c, K = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"N=45 tokens but V\*ph\*pw"):
        prope_attention(q, k, v, w2c, K, (3, 4), (42, 56))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (4, (9, 11)), (2, (18, 18))])
def test_gpu_low_precision_error_at_most_twice_reference(dtype, d, V, patches):
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=2, h=3, V=V, patches=patches, d=d, image=image, seed=d + V)
    got, want = run_both(q, k, v, w2c, K, patches, image, fused_dtype=dtype, device="cuda")
    # The unfused PyTorch reference in the same dtype, same inputs.
    g = torch.Generator().manual_seed(1)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    ins = [t.detach().to("cuda", dtype).clone().requires_grad_(True) for t in (q, k, v)]
    r = prope_attention_ref(*ins, w2c.cuda().float(), K.cuda().float(), patches, image)
    r.backward(do.to("cuda", dtype))
    assert_within_twice(("o", "dq", "dk", "dv"), got, [r] + [t.grad for t in ins], want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (18, 18)), (8, (18, 18))])
def test_gpu_inference_forward_error_at_most_twice_reference(dtype, d, V, patches):
    ins, cams, want = gpu_forward_case(dtype, d, V, patches)
    with torch.no_grad():
        got = prope_attention(*ins, *cams)
        base = prope_attention_ref(*ins, *cams)
    assert_within_twice(("o",), [got], [base], [want])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [48, 64])
def test_gpu_float32(d):
    patches, V = (6, 7), 3
    image = (84, 98)
    q, k, v, w2c, K = make_inputs(B=1, h=2, V=V, patches=patches, d=d, image=image, seed=7)
    got, want = run_both(q, k, v, w2c, K, patches, image, device="cuda")
    for a, b in zip(got, want):
        assert rel(a, b.cuda()) <= 1e-4


@pytest.mark.gpu
def test_gpu_entry_point_uses_fused_kernel(monkeypatch):
    """kernels.attention with cameras on a Hopper GPU runs the default (warp-specialised)
    forward kernel, without a graph and through the autograd Function alike."""
    from kernels import prope_fwd_ws
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the default forward kernel needs a Hopper GPU (sm_90)")
    q, k, v, w2c, K = make_inputs(B=1, h=2, V=2, patches=(4, 4), d=64, image=(56, 56),
                                  dtype=torch.float32)
    cams = PRoPECameras(w2c.float().cuda(), K.float().cuda(), (4, 4), (56, 56))
    calls = []
    real = prope_fwd_ws.forward_ws
    monkeypatch.setattr(prope_fwd_ws, "forward_ws", lambda *a: calls.append(1) or real(*a))
    q, k, v = (t.cuda().bfloat16() for t in (q, k, v))
    with torch.no_grad():
        out = attention(q, k, v, cams)
    assert calls == [1] and out.dtype == torch.bfloat16
    x = q.clone().requires_grad_()
    out2 = attention(x, k, v, cams)
    assert calls == [1, 1] and out2.grad_fn is not None
    torch.testing.assert_close(out, out2.detach(), rtol=0, atol=0)
    assert math.isfinite(out.float().abs().sum().item())
