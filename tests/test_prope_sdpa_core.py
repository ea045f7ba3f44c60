"""The SDPA-core PRoPE path (kernels/prope/sdpa_core.py: Triton transform passes around PyTorch
SDPA) against the float64 reference, both camera conventions, and its place in the kernel choice
(`PRoPEKernels.core`, `resolve`).

CPU: the transform passes under the Triton interpreter around SDPA's CPU backend. fp32: output
and every gradient within 1e-4 relative error of float64 (the bound of test_prope_fused.py);
fp16 (the interpreter's dots see fp32 operands here, so fp16 is exact to test): error at most
twice that of the reference run in fp16. As in the other kernel tests, the interpreter cases run
in a fresh TRITON_INTERPRET=1 process unless this one interprets.
GPU (marker `gpu`): test_prope_fused.py's GPU cases run both cores (bf16 / fp16 through cuDNN or
flash SDPA: error at most twice the reference's; fp32).
"""
import pytest
import torch

from kernels import PRoPECameras, PRoPEKernels, attention, prope_attention_ref
from kernels.prope import configs, fused
from kernels.prope.bench import random_inputs
from kernels.prope.core import geometry
from kernels.prope.fused import prope_attention, resolve
from kernels.prope.sdpa_core import sdpa_core
from tests.test_prope_fused import run_both, spy
from tests.test_prope_ref import make_inputs
from tests.triton_interp import (assert_errors_within_twice, interp,
                                 interpreter_subprocess_test, rel)

test_interpreter_cases_in_subprocess = interpreter_subprocess_test(__file__)

SDPA = PRoPEKernels(core="sdpa")
CONVENTIONS = ["textbook", "release"]


def core_only(q, k, v, w2c, K, patches, image, convention="textbook"):
    """sdpa_core itself (no dispatch: also for dtypes the public path sends to the reference)."""
    g = geometry(w2c.float(), K.float(), patches, image, q.shape[-1], q.device, convention)
    return sdpa_core(q, k, v, g)


@interp
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (5, 7))])
def test_interp_matches_reference(d, V, patches, convention, monkeypatch):
    """fp32 through prope_attention(kernels=PRoPEKernels(core="sdpa")): o, dq, dk, dv."""
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=2, h=2, V=V, patches=patches, d=d, image=image, seed=d)
    calls = spy(monkeypatch, "sdpa_core")
    got, want = run_both(q, k, v, w2c, K, patches, image, kernels=SDPA, convention=convention)
    assert calls == ["sdpa_core"]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert rel(a, b) <= 1e-4, f"{name}: relative error {rel(a, b):.2e}"


@interp
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("d", [48, 64, 128])
def test_interp_fp16_error_at_most_twice_reference(d, convention):
    q, k, v, w2c, K, patches, image = random_inputs(2, 2, d, 2, (5, 7), torch.float64, "cpu",
                                                    seed=d)
    cam = (w2c, K, patches, image)
    assert_errors_within_twice(core_only, torch.float16, q, k, v, cam, convention=convention)
    assert_errors_within_twice(core_only, torch.float16, q, k, v, cam, grad=False,
                               convention=convention)


@interp
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_interp_no_grad_and_strided_inputs(convention):
    """(B, N, h, d) tensors viewed as (B, h, N, d): o without a graph, and gradients with the
    inputs' strides (no copy back through the transpose)."""
    B, h, V, patches, d = 2, 2, 2, (2, 3), 32
    image = (28, 42)
    q, k, v, w2c, K = make_inputs(B=B, h=h, V=V, patches=patches, d=d, image=image, seed=3)
    cams = (w2c.float(), K.float(), patches, image)
    qs, ks, vs = (t.transpose(1, 2).contiguous().float().requires_grad_(True) for t in (q, k, v))
    views = [t.transpose(1, 2) for t in (qs, ks, vs)]
    r = prope_attention_ref(q, k, v, w2c, K, patches, image, convention=convention)
    with torch.no_grad():
        o = prope_attention(*views, *cams, kernels=SDPA, convention=convention)
    assert o.grad_fn is None and rel(o, r) <= 1e-4
    grads = torch.autograd.grad(prope_attention(*views, *cams, kernels=SDPA,
                                                convention=convention).sum(), views)
    refs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    prope_attention_ref(*refs, w2c, K, patches, image, convention=convention).sum().backward()
    for a, x, b in zip(grads, views, refs):
        assert a.stride() == x.stride()
        assert rel(a, b.grad) <= 1e-4


@interp
@pytest.mark.parametrize("core", ["fused", "sdpa"])
def test_interp_entry_point_passes_core_and_convention(core, monkeypatch):
    """kernels.attention(backend="triton") with release cameras and either core."""
    q, k, v, w2c, K = make_inputs(B=1, h=1, V=2, patches=(2, 4), d=32, image=(28, 56),
                                  dtype=torch.float32)
    cams = PRoPECameras(w2c.float(), K.float(), (2, 4), (28, 56), convention="release")
    calls = spy(monkeypatch, "sdpa_core")
    out = attention(q, k, v, cams, backend="triton", prope_kernels=PRoPEKernels(core=core))
    assert calls == (["sdpa_core"] if core == "sdpa" else [])
    ref = prope_attention_ref(q.double(), k.double(), v.double(), w2c, K, (2, 4), (28, 56),
                              convention="release")
    assert rel(out, ref) <= 1e-4


# ---------------------------------------------------------------------------------------------
# the kernel choice
# ---------------------------------------------------------------------------------------------
def test_core_choice_is_validated():
    with pytest.raises(ValueError, match="PRoPEKernels.core='cudnn'; choose one of 'auto', "
                                         "'fused', 'sdpa'"):
        PRoPEKernels(core="cudnn")
    with pytest.raises(ValueError, match=r"PRoPEKernels\(core='sdpa'\) runs no fused forward or "
                                         r"backward; got forward='ws', backward='auto'"):
        PRoPEKernels(core="sdpa", forward="ws")


@pytest.mark.parametrize("d", [48, 64, 128])
def test_core_policy(d, monkeypatch):
    """"auto" follows configs.DEFAULT_CORE per head dim (the one place to set it); a forced fused
    forward or backward means the fused core; a forced core stays."""
    q = torch.zeros(1, 1, 4, d)
    monkeypatch.setattr(fused, "supported", lambda x: True)
    assert resolve(None, q, True).core == configs.DEFAULT_CORE[d]
    monkeypatch.setitem(configs.DEFAULT_CORE, d, "sdpa")
    auto = resolve(PRoPEKernels(), q, True)
    assert (auto.core, auto.forward, auto.backward) == ("sdpa", "auto", "auto")
    assert resolve(PRoPEKernels(forward="prepass"), q, True).core == "fused"
    assert resolve(PRoPEKernels(core="fused"), q, False).core == "fused"
    monkeypatch.setitem(configs.DEFAULT_CORE, d, "fused")
    assert resolve(SDPA, q, True).core == "sdpa"


def test_cpu_without_interpreter_or_unsupported_dtype_uses_reference():
    q, k, v, w2c, K = make_inputs(d=16)   # float64: outside the kernels
    torch.testing.assert_close(prope_attention(q, k, v, w2c, K, (3, 5), (42, 70), kernels=SDPA),
                               prope_attention_ref(q, k, v, w2c, K, (3, 5), (42, 70)))
