"""The warp-specialised no-scratch forward (kernels/prope_fwd_ws.py, Gluon; GPU only: Gluon has no
CPU interpreter). bf16 / fp16 error against the float64 reference at most twice the PyTorch
reference's in the same dtype, its LSE equal to the pre-pass forward's, the mode switch, and the
error for inputs it does not take."""
import pytest
import torch

from kernels import prope_attention_ref, prope_fwd_ws, prope_triton
from tests.triton_interp import assert_within_twice, gpu_forward_case


def test_forward_ws_rejects_what_it_does_not_support():
    q = torch.zeros(1, 1, 4, 48)
    assert not prope_fwd_ws.supported(q)
    with pytest.raises(ValueError, match="forward_ws: needs Gluon, a Hopper GPU"):
        prope_fwd_ws.forward_ws(q, q, q, None)
    with pytest.raises(ValueError, match=r"head dim 32; the kernel takes \[48, 64, 128\]"):
        prope_fwd_ws.set_ws_config(32, prope_fwd_ws.WS_CONFIGS[0])


def test_ws_is_the_default_forward_and_set_forward_switches_per_mode():
    assert prope_triton._FORWARD == {"train": "ws", "infer": "ws"}
    saved = dict(prope_triton._FORWARD)
    try:
        prope_triton.set_forward(train="prepass")
        assert prope_triton._FORWARD == {"train": "prepass", "infer": "ws"}
        prope_triton.set_forward(train="ws", infer="merged")
        assert prope_triton._FORWARD == {"train": "ws", "infer": "merged"}
        with pytest.raises(ValueError, match="choose one of"):
            prope_triton.set_forward(infer="fast")
    finally:
        prope_triton._FORWARD.update(saved)


def _needs_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU (sm_90)")


def _check_ws(dtype, d, V, patches, cfg=None):
    """forward_ws (launch config cfg, default None) within 2x the reference's error against
    float64, in q's dtype, with the pre-pass forward's LSE."""
    _needs_hopper()
    ins, cams, want = gpu_forward_case(dtype, d, V, patches)
    g = prope_triton._geometry(*cams, d, "cuda")
    prope_fwd_ws.set_ws_config(d, cfg)
    try:
        with torch.no_grad():
            got, lse = prope_fwd_ws.forward_ws(*ins, g)
            base = prope_attention_ref(*ins, *cams)
            _, lse_pre = prope_triton._forward(*ins, g)
    finally:
        prope_fwd_ws.set_ws_config(d, None)
    assert got.dtype == dtype
    assert_within_twice(("o",), [got], [base], [want])
    torch.testing.assert_close(lse, lse_pre, rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [48, 64, 128])
@pytest.mark.parametrize("V,patches", [(3, (3, 5)), (2, (18, 18)), (8, (18, 18)), (2, (9, 20))])
def test_gpu_ws_error_at_most_twice_reference(dtype, d, V, patches):
    _check_ws(dtype, d, V, patches)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", prope_fwd_ws.WS_CONFIGS, ids=str)
@pytest.mark.parametrize("d,V,patches", [(64, 3, (3, 5)), (64, 8, (18, 18)), (48, 3, (9, 20))])
def test_gpu_ws_every_config(cfg, d, V, patches):
    """Each launch config (the three transform placements XFC 0 / 1 / 2 included); d = 48 in
    64-wide rows (`_head_col`, PF turned off); 9x20 patches: views of 180 tokens, so key tiles
    span cameras mid-tile."""
    _check_ws(torch.bfloat16, d, V, patches, cfg)


@pytest.mark.gpu
def test_gpu_ws_forward_trains_through_the_fused_backward():
    """set_forward(train="ws"): the LSE it saves drives the backward to the pre-pass's grads."""
    _needs_hopper()
    ins, cams, _ = gpu_forward_case(torch.bfloat16, 64, 2, (18, 18))
    grads = []
    saved = dict(prope_triton._FORWARD)
    try:
        for kind in ("prepass", "ws"):
            prope_triton.set_forward(train=kind)
            x = [t.clone().requires_grad_() for t in ins]
            o = prope_triton.prope_attention(*x, *cams)
            o.backward(torch.ones_like(o))
            grads.append([t.grad for t in x])
    finally:
        prope_triton._FORWARD.update(saved)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
