"""DecoderLoss (gld/models/decoder_loss.py): the L1 part against a hand computation, LPIPS off
at weight 0 without importing lpips, the missing-backbone error, LPIPS on a random backbone
(zero for identical images, gradients to pred only, kept out of parameters and state_dict),
config errors."""
import os
import sys

import pytest
import torch

from gld.configtypes import ConfigError
from gld.models import DecoderLoss, DecoderLossConfig
from gld.models.decoder_loss import LPIPS_BACKBONES, lpips_backbone_path


def _images(seed, shape=(2, 2, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


@pytest.fixture(scope="module")
def random_lpips_loss():
    torch.manual_seed(0)
    return DecoderLoss(DecoderLossConfig(l1_weight=0.5, lpips_weight=2.0, lpips_net="alex",
                                         random_backbone_for_tests=True))


def test_l1_part_is_mean_absolute_difference_and_weight_zero_never_imports_lpips(monkeypatch):
    # None in sys.modules makes `import lpips` raise: building or running would fail if tried
    monkeypatch.setitem(sys.modules, "lpips", None)
    loss = DecoderLoss(DecoderLossConfig(l1_weight=3.0, lpips_weight=0))
    pred, target = _images(1), _images(2)
    total, parts = loss(pred, target)
    hand = sum(abs(a - b) for a, b in zip(pred.flatten().tolist(), target.flatten().tolist()))
    hand /= pred.numel()
    # fp32 pairwise-summed mean of 12288 values in [0, 1]: relative error ~ 1e-6
    assert parts["l1"].item() == pytest.approx(hand, rel=1e-5)
    assert total.item() == pytest.approx(3.0 * hand, rel=1e-5)
    assert "lpips" not in parts and loss.lpips_net is None
    assert list(loss.parameters()) == [] and loss.state_dict() == {}


def test_missing_backbone_error_names_file_and_torch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for net, (fname, url) in LPIPS_BACKBONES.items():
        path = os.path.join(str(tmp_path), "hub", "checkpoints", fname)
        assert lpips_backbone_path(net) == path
        with pytest.raises(FileNotFoundError) as err:
            DecoderLoss(DecoderLossConfig(lpips_weight=1.0, lpips_net=net))
        msg = str(err.value)
        assert path in msg and "TORCH_HOME" in msg and str(tmp_path) in msg and url in msg
        assert not os.path.exists(path)          # nothing was downloaded


def test_lpips_zero_for_identical_positive_otherwise(random_lpips_loss):
    a, b = _images(3), _images(4)
    total, parts = random_lpips_loss(a, a.clone())
    assert parts["l1"].item() == 0 and parts["lpips"].item() == 0 and total.item() == 0
    total, parts = random_lpips_loss(a, b)
    assert parts["lpips"].item() > 0
    assert total.item() == pytest.approx(0.5 * parts["l1"].item() + 2.0 * parts["lpips"].item(),
                                         rel=1e-6)


def test_lpips_is_mean_over_all_views_on_minus_one_to_one_inputs(random_lpips_loss):
    a, b = _images(5), _images(6)
    _, parts = random_lpips_loss(a, b)
    net = random_lpips_loss.lpips_net
    with torch.no_grad():
        # lpips' own [0, 1] -> [-1, 1] path, image by image
        per_image = [net(a[i, j:j + 1], b[i, j:j + 1], normalize=True).item()
                     for i in range(a.shape[0]) for j in range(a.shape[1])]
    assert parts["lpips"].item() == pytest.approx(sum(per_image) / len(per_image), rel=1e-5)


def test_gradients_reach_pred_not_lpips_and_net_is_not_registered(random_lpips_loss):
    loss = random_lpips_loss
    pred = _images(7).requires_grad_(True)
    total, parts = loss(pred, _images(8))
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    net = loss.lpips_net
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    assert not net.training
    assert all(not v.requires_grad for v in parts.values())
    loss.train()                                  # the trainer's .train() leaves lpips in eval
    assert not net.training
    assert list(loss.parameters()) == [] and loss.state_dict() == {}


def test_fp32_under_autocast(random_lpips_loss):
    a, b = _images(9), _images(10)
    _, ref = random_lpips_loss(a, b)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total, parts = random_lpips_loss(a.bfloat16().float(), b)
    assert total.dtype == torch.float32 and parts["lpips"].dtype == torch.float32
    # pred's bf16 rounding (relative 2^-9 per pixel) is the only difference from ref
    assert parts["l1"].item() == pytest.approx(ref["l1"].item(), rel=1e-2)
    # the same input outside autocast: equal up to fp32 summation order, so no bf16 convolutions
    _, same = random_lpips_loss(a.bfloat16().float(), b)
    assert parts["lpips"].item() == pytest.approx(same["lpips"].item(), rel=1e-6)


def test_shape_errors(random_lpips_loss):
    with pytest.raises(ValueError, match=r"\(B, V, 3, H, W\)"):
        random_lpips_loss(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="target shape"):
        random_lpips_loss(torch.rand(1, 2, 3, 32, 32), torch.rand(1, 1, 3, 32, 32))


@pytest.mark.parametrize("kwargs, key", [
    (dict(l1_weight=-1.0), "loss.decoder.l1_weight"),
    (dict(lpips_weight=float("nan")), "loss.decoder.lpips_weight"),
    (dict(lpips_weight=True), "loss.decoder.lpips_weight"),
    (dict(l1_weight=0, lpips_weight=0), "loss.decoder.l1_weight"),
    (dict(lpips_net="squeeze"), "loss.decoder.lpips_net"),
    (dict(random_backbone_for_tests="yes"), "loss.decoder.random_backbone_for_tests"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DecoderLoss(DecoderLossConfig(**kwargs))
