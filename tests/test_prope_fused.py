"""Fused PRoPE attention (kernels/prope/fused.py) against the PyTorch reference, and the kernel
choice (`PRoPEKernels`, `resolve`).

CPU: the Triton interpreter, fp32, output and every gradient within 1e-4 relative error of a
float64 reference: fp32 accumulation over at most N = 70 keys and d = 128 channels bounds the
error by about (N + d) u = 1.2e-5 (u = 2^-24) times the transforms' growth (4-term camera mixes,
rotations: a few); measured 2e-7 to 3e-7. Triton fixes compiled vs interpreted when it
is first imported, so the interpreter cases run in-process only when this process started with
TRITON_INTERPRET=1; otherwise `test_interpreter_cases_in_subprocess` reruns them in a fresh
process that has it (robust to whatever the rest of the suite imported first).
GPU (marker `gpu`): bf16 / fp16, error against float64 at most 2x that of the PyTorch reference
run in the same dtype; both attention cores (fused kernels, SDPA core) and both conventions.
"""
import dataclasses
from functools import partial

import pytest
import torch

from kernels import PRoPECameras, PRoPEKernels, attention, prope_attention_ref
from kernels.prope import core, fused
from kernels.prope.bench import random_inputs
from kernels.prope.configs import AtomicConfig, BlockConfig, WSConfig
from kernels.prope.fused import prope_attention, resolve
from tests.test_prope_ref import make_inputs
from tests.triton_interp import (ON_INTERPRETER, assert_errors_within_twice,
                                 assert_within_twice, gpu_case, interp,
                                 interpreter_subprocess_test, rel)


test_interpreter_cases_in_subprocess = interpreter_subprocess_test(__file__)

# The fused core: what these tests exercise (the default core is "sdpa" at every head dim the
# kernels take, configs.DEFAULT_CORE; tests/test_prope_sdpa_core.py covers that one).
FUSED = PRoPEKernels(core="fused")


def run_both(q, k, v, w2c, K, patches, image, fused_dtype=torch.float32, device="cpu", seed=1,
             kernels=None, convention="textbook"):
    """(fused outputs and grads in fused_dtype, float64 reference outputs and grads)."""
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    ins = [t.detach().to(device, fused_dtype).clone().requires_grad_(True) for t in (q, k, v)]
    o = prope_attention(*ins, w2c.to(device, torch.float32), K.to(device, torch.float32),
                        patches, image, kernels=kernels or FUSED, convention=convention)
    o.backward(do.to(device, fused_dtype))
    refs = [t.detach().double().clone().requires_grad_(True) for t in (q, k, v)]
    r = prope_attention_ref(*refs, w2c.double(), K.double(), patches, image,
                            convention=convention)
    r.backward(do)
    return [o] + [t.grad for t in ins], [r] + [t.grad for t in refs]


def spy(monkeypatch, name):
    """Record the calls of fused.py's `name` (a forward or backward it dispatches to)."""
    calls, real = [], getattr(fused, name)
    monkeypatch.setattr(fused, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    return calls


@interp
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (5, 7))])
def test_interp_matches_reference(d, V, patches, convention):
    """3 views of 3x5 (15 tokens per view: one masked block of 16) and 2 views of 5x7
    (35 tokens: 3 blocks, the last masked); random cameras; every head dim; both conventions."""
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=1, h=2, V=V, patches=patches, d=d, image=image, seed=d)
    got, want = run_both(q, k, v, w2c, K, patches, image, convention=convention)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= 1e-4, f"{name}: relative error {rel(a, b):.2e}"


@interp
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("d", [16, 48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (5, 7))])
def test_interp_inference_forward_matches_reference(d, V, patches, convention, monkeypatch):
    """No-grad calls: the pre-pass forward (the default here), o within 1e-4 of float64."""
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=2, h=2, V=V, patches=patches, d=d, image=image, seed=d + 1)
    calls = spy(monkeypatch, "forward_prepass")
    with torch.no_grad():
        o = prope_attention(q.float(), k.float(), v.float(), w2c.float(), K.float(), patches,
                            image, kernels=FUSED, convention=convention)
    assert calls == ["forward_prepass"]
    r = prope_attention_ref(q, k, v, w2c, K, patches, image, convention=convention)
    assert rel(o, r) <= 1e-4, rel(o, r)


@interp
def test_interp_atomic_backward_through_autograd(monkeypatch):
    """A choice with backward="atomic" routes .backward() to the one-kernel backward."""
    patches, V, d = (5, 7), 2, 64
    image = (70, 98)
    q, k, v, w2c, K = make_inputs(B=1, h=2, V=V, patches=patches, d=d, image=image, seed=5)
    calls = spy(monkeypatch, "backward_atomic")
    got, want = run_both(q, k, v, w2c, K, patches, image,
                         kernels=PRoPEKernels(backward="atomic"))
    assert calls == ["backward_atomic"]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert rel(a, b) <= 1e-4, f"{name}: relative error {rel(a, b):.2e}"


@interp
def test_interp_strided_inputs_and_batch():
    """(B, N, h, d) tensors viewed as (B, h, N, d): non-contiguous token/head strides; B = 2."""
    B, h, V, patches, d = 2, 2, 2, (2, 3), 32
    image = (28, 42)
    q, k, v, w2c, K = make_inputs(B=B, h=h, V=V, patches=patches, d=d, image=image, seed=3)
    N = q.shape[2]
    qs, ks, vs = (t.transpose(1, 2).contiguous().float().requires_grad_(True) for t in (q, k, v))
    o = prope_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                        w2c.float(), K.float(), patches, image, kernels=FUSED)
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


@interp
def test_interp_entry_point_passes_the_choice(monkeypatch):
    """kernels.attention(backend="triton") runs the fused kernels on CPU (interpreter) with the
    choice it is given: here the atomic backward."""
    q, k, v, w2c, K = make_inputs(B=1, h=1, V=2, patches=(2, 4), d=32, image=(28, 56),
                                  dtype=torch.float32)
    cams = PRoPECameras(w2c.float(), K.float(), (2, 4), (28, 56))
    calls = spy(monkeypatch, "backward_atomic")
    x = q.clone().requires_grad_()
    out = attention(x, k, v, cams, backend="triton", prope_kernels=PRoPEKernels(backward="atomic"))
    out.sum().backward()
    assert calls == ["backward_atomic"]
    ref = prope_attention_ref(q.double(), k.double(), v.double(), w2c, K, (2, 4), (28, 56))
    assert rel(out, ref) <= 1e-4


# ---------------------------------------------------------------------------------------------
# the kernel choice
# ---------------------------------------------------------------------------------------------
def test_choice_is_validated_at_construction():
    with pytest.raises(ValueError, match="PRoPEKernels.forward='merged'; choose one of 'auto', "
                                         "'prepass', 'ws'"):
        PRoPEKernels(forward="merged")
    with pytest.raises(ValueError, match="PRoPEKernels.backward='fast'; choose one of 'auto', "
                                         "'two_kernel', 'atomic'"):
        PRoPEKernels(backward="fast")
    with pytest.raises(TypeError, match="PRoPEKernels.atomic must be a AtomicConfig or None, "
                                        "got BlockConfig"):
        PRoPEKernels(atomic=BlockConfig())
    with pytest.raises(ValueError, match="ping .* needs pipe=True"):
        WSConfig(208, 96, True, pipe=False, prefetch=True, ping=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRoPEKernels().forward = "ws"
    with pytest.raises(TypeError, match="kernels must be a PRoPEKernels or None, got dict"):
        resolve({"forward": "ws"}, torch.zeros(1, 1, 4, 64), False)


def test_a_given_launch_config_is_used_as_given():
    choice = PRoPEKernels(atomic=AtomicConfig(16, 32, 2, 1, dq_tma=False))
    assert choice.config("atomic", 64) == (AtomicConfig(16, 32, 2, 1, dq_tma=False), True)
    cfg, given = choice.config("dq", 128)
    assert not given and cfg == BlockConfig(128, 64, 8, 3)   # the d = 128 default


@pytest.mark.parametrize("d", [48, 64, 128])
def test_default_policy(d, monkeypatch):
    """As on a Hopper GPU where every kernel runs: with gradients the pre-pass forward, without
    the warp-specialised one; the atomic backward at d = 64 only. Elsewhere (no ws, no TMA
    reduce-add) the pre-pass forward and the two-kernel backward."""
    q = torch.zeros(1, 1, 4, d)
    monkeypatch.setattr(fused, "supported", lambda x: True)
    for hopper in (True, False):
        monkeypatch.setattr(fused, "ws_supported", lambda x: hopper)
        monkeypatch.setattr(fused, "dq_tma_available", lambda x: hopper)
        with_grad, without = resolve(FUSED, q, grad=True), resolve(FUSED, q, grad=False)
        assert with_grad.forward == "prepass"
        assert without.forward == ("ws" if hopper else "prepass")
        want = "atomic" if hopper and d == 64 else "two_kernel"
        assert with_grad.backward == without.backward == want
    # forced kernels stay forced (and imply the fused core); a forced ws forward where it
    # cannot run is an error
    forced = PRoPEKernels(forward="prepass", backward="atomic")
    assert resolve(forced, q, grad=False) == dataclasses.replace(forced, core="fused")
    with pytest.raises(ValueError, match=r"PRoPEKernels\(forward='ws'\) needs a Hopper GPU"):
        resolve(PRoPEKernels(forward="ws"), q, grad=False)


def test_supported_head_dims():
    for d in (16, 48, 64, 96, 128):
        assert core.supported(torch.empty(1, 1, 1, d, device="meta")) is False  # meta
    x = torch.empty(1, 1, 1, 64, dtype=torch.float32)
    assert core.supported(x) == ON_INTERPRETER
    assert (resolve(None, x, True) is None) == (not ON_INTERPRETER)
    for d in (8, 44, 136, 256):
        assert not core.supported(torch.empty(1, 1, 1, d, dtype=torch.float32))


def test_fallbacks_use_the_reference():
    q, k, v, w2c, K = make_inputs(d=16)  # float64 and d=16: both outside the kernel
    torch.testing.assert_close(prope_attention(q, k, v, w2c, K, (3, 5), (42, 70)),
                               prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70)))


@pytest.mark.skipif(ON_INTERPRETER, reason="this process interprets")
def test_cpu_without_interpreter_uses_reference():
    q, k, v, w2c, K = make_inputs(d=32, dtype=torch.float32)
    assert not core.supported(q)
    torch.testing.assert_close(prope_attention(q, k, v, w2c.float(), K.float(), (3, 5), (42, 70)),
                               prope_attention_ref(q, k, v, w2c.float(), K.float(), (3, 5),
                                                   (42, 70)))


def test_shape_errors_come_from_the_shared_check():
    q, k, v, w2c, K = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"N=45 tokens but V\*ph\*pw"):
        prope_attention(q, k, v, w2c, K, (3, 4), (42, 56))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
CORES = ["fused", "sdpa"]   # both attention cores (the SDPA one: test_prope_sdpa_core.py)


@pytest.mark.gpu
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (4, (9, 11)), (2, (18, 18))])
def test_gpu_low_precision_error_at_most_twice_reference(dtype, d, V, patches, convention,
                                                         core):
    q, k, v, cam = gpu_case(dtype, d, V, patches)
    fn = partial(prope_attention, kernels=PRoPEKernels(core=core))
    assert_errors_within_twice(fn, dtype, q, k, v, cam, convention=convention)


@pytest.mark.gpu
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (18, 18)), (8, (18, 18))])
def test_gpu_inference_forward_error_at_most_twice_reference(dtype, d, V, patches, convention,
                                                             core):
    q, k, v, cam = gpu_case(dtype, d, V, patches)
    fn = partial(prope_attention, kernels=PRoPEKernels(core=core))
    assert_errors_within_twice(fn, dtype, q, k, v, cam, grad=False, convention=convention)


@pytest.mark.gpu
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("d", [48, 64])
def test_gpu_float32(d, convention, core):
    q, k, v, w2c, K, patches, image = random_inputs(1, 2, d, 3, (6, 7), torch.float64, "cpu",
                                                    seed=7)
    got, want = run_both(q, k, v, w2c, K, patches, image, device="cuda",
                         kernels=PRoPEKernels(core=core), convention=convention)
    for a, b in zip(got, want):
        assert rel(a, b.cuda()) <= 1e-4


@pytest.mark.gpu
def test_gpu_entry_point_follows_the_default_policy(monkeypatch):
    """kernels.attention with cameras and the fused core on a Hopper GPU: the warp-specialised
    forward without a graph, the pre-pass forward through the autograd Function; both within
    twice the bf16 reference's error."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward needs a Hopper GPU (sm_90)")
    q, k, v, (w2c, K, patches, image) = gpu_case(torch.bfloat16, 64, 2, (4, 4), B=1, h=2)
    cams = PRoPECameras(w2c, K, patches, image)
    ws_calls, pre_calls = spy(monkeypatch, "forward_ws"), spy(monkeypatch, "forward_prepass")
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    with torch.no_grad():
        out = attention(q16, k16, v16, cams, prope_kernels=FUSED)
    assert ws_calls == ["forward_ws"] and pre_calls == [] and out.dtype == torch.bfloat16
    out2 = attention(q16.clone().requires_grad_(), k16, v16, cams, prope_kernels=FUSED)
    assert pre_calls == ["forward_prepass"] and out2.grad_fn is not None
    base = prope_attention_ref(q16, k16, v16, w2c, K, patches, image)
    want = prope_attention_ref(q, k, v, w2c, K, patches, image)
    assert_within_twice(("o no grad", "o with grad"), [out, out2.detach()], [base, base],
                        [want, want])
