"""The warp-specialised forward (kernels/prope/forward_ws.py, Gluon; GPU only: Gluon has no CPU
interpreter). bf16 / fp16 output and log2-sum-exp (what the backward reads) with an error against
the float64 reference at most twice that of the bf16 reference / the pre-pass forward, every
candidate launch config, training through the backward, and the errors for what it does not
take."""
import math
from functools import partial

import pytest
import torch

from kernels import PRoPEKernels, prope_attention_ref
from kernels.prope import fused
from kernels.prope.configs import WSConfig
from kernels.prope.core import geometry
from kernels.prope.forward import forward_prepass
from kernels.prope.forward_ws import forward_ws, ws_supported
from kernels.prope.reference import prope_matrices, prope_transform, rope_tables
from kernels.prope.sweeps import WS_CANDIDATES
from tests.triton_interp import assert_errors_within_twice, assert_within_twice, gpu_case


def test_forward_ws_rejects_what_it_does_not_support():
    q = torch.zeros(1, 1, 4, 48)
    assert not ws_supported(q)
    with pytest.raises(ValueError, match="forward_ws: needs Gluon, a Hopper GPU"):
        forward_ws(q, q, q, None)
    with pytest.raises(ValueError, match="WSConfig.block_n=128: the producer's layout takes 64"):
        WSConfig(208, 96, True, True, True, True, block_n=128)


def _needs_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU (sm_90)")


def lse_float64(q, k, cam, convention="textbook"):
    """The log2-sum-exp (B, h, N) of the scores q' k'^T / sqrt(d), in float64."""
    w2c, K, patches, image = cam
    V, d = w2c.shape[1], q.shape[-1]
    P, A = prope_matrices(w2c.double(), K.double(), image, torch.float64, convention)
    tables = rope_tables(patches, d, torch.float64, q.device)
    s = (prope_transform(q.double(), P, tables, V, transpose=True)
         @ prope_transform(k.double(), A, tables, V).transpose(-1, -2))
    return torch.logsumexp(s / math.sqrt(d), -1) / math.log(2)


def _check_ws(dtype, d, V, patches, cfg=None, convention="textbook"):
    """forward_ws (launch config cfg; None: the default) within 2x the reference's error against
    float64, in q's dtype; its LSE within 2x the pre-pass forward's error."""
    _needs_hopper()
    q, k, v, cam = gpu_case(dtype, d, V, patches)
    ins = [t.to(dtype) for t in (q, k, v)]
    g = geometry(*cam, d, "cuda", convention)
    with torch.no_grad():
        got, lse = forward_ws(*ins, g, cfg)
        base = prope_attention_ref(*ins, *cam, convention=convention)
        _, lse_pre = forward_prepass(*ins, g)
    assert got.dtype == dtype
    assert_within_twice(("o", "lse"), [got, lse], [base, lse_pre],
                        [prope_attention_ref(q, k, v, *cam, convention=convention),
                         lse_float64(q, k, cam, convention)])


@pytest.mark.gpu
@pytest.mark.parametrize("convention", ["textbook", "release"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (18, 18)), (8, (18, 18)), (2, (9, 20))])
def test_gpu_ws_error_at_most_twice_reference(dtype, d, V, patches, convention):
    _check_ws(dtype, d, V, patches, convention=convention)


@pytest.mark.gpu
@pytest.mark.parametrize("d,V,patches,cfg", [
    (d, V, patches, cfg) for d, V, patches in ((64, 3, (3, 5)), (64, 8, (18, 18)), (48, 3, (9, 20)))
    for cfg in WS_CANDIDATES[d]], ids=str)
def test_gpu_ws_every_candidate_config(d, V, patches, cfg):
    """Each candidate launch config; d = 48 in 64-wide rows (`_head_col`, no prefetch); 9x20
    patches: views of 180 tokens, so key tiles span cameras mid-tile."""
    _check_ws(torch.bfloat16, d, V, patches, cfg)


@pytest.mark.gpu
def test_gpu_ws_forward_trains_through_the_backward(monkeypatch):
    """A forced ws forward with gradients: the LSE it saves drives the backward to gradients
    within twice the bf16 reference's error."""
    _needs_hopper()
    calls, real = [], fused.forward_ws
    monkeypatch.setattr(fused, "forward_ws", lambda *a: calls.append(1) or real(*a))
    q, k, v, cam = gpu_case(torch.bfloat16, 64, 2, (18, 18))
    run = partial(fused.prope_attention, kernels=PRoPEKernels(forward="ws"))
    assert_errors_within_twice(run, torch.bfloat16, q, k, v, cam)
    assert calls == [1]
