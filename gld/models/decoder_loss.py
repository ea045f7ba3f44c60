"""The stage-1 losses of the RGB decoder: L1 + LPIPS (docs/reference.md section 1; the GAN term
comes later). A loss module beside the decoder, not part of the network: the stage-1 trainer
calls it on the decoder's output and the ground-truth views.

LPIPS uses the `lpips` package, which ships only its linear heads; the AlexNet / VGG16 backbone
comes from torchvision's download cache, `torch.hub.get_dir()/checkpoints/<file>` (by default
`$TORCH_HOME/hub/checkpoints`, TORCH_HOME defaulting to ~/.cache/torch). Training machines have
no network, so the file is checked before lpips is built and a missing one is an error that
names the path; nothing is ever downloaded here.

The LPIPS network is frozen and held outside the module's registered children: it is not in
`parameters()` (nothing for the optimiser), not in `state_dict()` (trainer checkpoints do not
carry the frozen backbone), `.train()` does not switch on its heads' dropout and `.half()` does not
change its dtype; it follows the inputs' device on first use.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gld.configtypes import ConfigError

__all__ = ["DecoderLossConfig", "DecoderLoss", "LPIPS_BACKBONES", "lpips_backbone_path"]

# torchvision's file name and URL of each backbone lpips builds (its IMAGENET1K_V1 weights).
LPIPS_BACKBONES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth",
             "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}


@dataclass
class DecoderLossConfig:
    """Weights of the stage-1 losses. lpips_weight 0 turns LPIPS off (lpips is never imported).

    random_backbone_for_tests builds LPIPS on a randomly initialised backbone (no cached file
    needed); its values mean nothing, so it is for plumbing tests only.
    """

    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"
    random_backbone_for_tests: bool = False

    def validate(self, key: str = "loss.decoder") -> None:
        for name in ("l1_weight", "lpips_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 \
                    or v == float("inf"):
                raise ConfigError(f"{key}.{name}: must be a finite number >= 0, got {v!r}")
        if self.l1_weight == 0 and self.lpips_weight == 0:
            raise ConfigError(f"{key}.l1_weight: l1_weight and lpips_weight are both 0, "
                              f"so there is no loss")
        if self.lpips_net not in LPIPS_BACKBONES:
            raise ConfigError(f"{key}.lpips_net: must be one of "
                              f"{', '.join(repr(n) for n in LPIPS_BACKBONES)}, got "
                              f"{self.lpips_net!r}")
        if not isinstance(self.random_backbone_for_tests, bool):
            raise ConfigError(f"{key}.random_backbone_for_tests: must be true or false, got "
                              f"{self.random_backbone_for_tests!r}")


def lpips_backbone_path(net: str) -> str:
    """Where torchvision looks for the cached backbone `net` ('vgg' or 'alex')."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_BACKBONES[net][0])


def _build_lpips(net: str, random_backbone: bool) -> nn.Module:
    if not random_backbone:
        path = lpips_backbone_path(net)
        if not os.path.isfile(path):
            url = LPIPS_BACKBONES[net][1]
            raise FileNotFoundError(
                f"LPIPS backbone '{net}' not found: torchvision's cached weights are expected at "
                f"{path} (the folder is $TORCH_HOME/hub/checkpoints; TORCH_HOME is "
                f"{os.environ.get('TORCH_HOME', 'unset, so ~/.cache/torch')}). This machine "
                f"cannot download it: on a machine with network fetch {url} and copy it into "
                f"{os.path.dirname(path)}, or point TORCH_HOME at a folder whose "
                f"hub/checkpoints holds it. lpips_weight: 0 turns LPIPS off.")
    import lpips  # only when LPIPS is on: a weight of 0 needs neither lpips nor its backbone

    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
    model.eval()
    model.requires_grad_(False)
    return model.float()


class DecoderLoss(nn.Module):
    """l1_weight * L1 + lpips_weight * LPIPS between decoded and ground-truth views.

    forward(pred, target): both (B, V, 3, H, W) in [0, 1] (pred is the decoder's unclamped
    output and is not clamped here, so out-of-range pixels keep their gradient) ->
    (total: 0-dim tensor with grad, parts: {"l1", "lpips", "total"} as detached 0-dim fp32
    tensors; "lpips" only when it is on). L1 is the mean over all B*V*3*H*W values; LPIPS the
    mean over the B*V images of lpips on inputs scaled to [-1, 1]. Both in fp32, also under
    autocast.
    """

    def __init__(self, cfg: DecoderLossConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else DecoderLossConfig()
        cfg.validate()
        self.cfg = cfg
        # a tuple hides the network from nn.Module's registration (see the module docstring)
        self._lpips: tuple[nn.Module, ...] = ()
        if cfg.lpips_weight > 0:
            self._lpips = (_build_lpips(cfg.lpips_net, cfg.random_backbone_for_tests),)

    @property
    def lpips_net(self) -> nn.Module | None:
        """The frozen LPIPS network, or None when LPIPS is off."""
        return self._lpips[0] if self._lpips else None

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if pred.dim() != 5 or pred.shape[2] != 3:
            raise ValueError(f"DecoderLoss: pred must be (B, V, 3, H, W), got "
                             f"{tuple(pred.shape)}")
        if target.shape != pred.shape:
            raise ValueError(f"DecoderLoss: target shape {tuple(target.shape)} differs from "
                             f"pred shape {tuple(pred.shape)}")
        with torch.autocast(device_type=pred.device.type, enabled=False):
            p = pred.float().flatten(0, 1)                 # (B*V, 3, H, W)
            t = target.float().flatten(0, 1)
            l1 = F.l1_loss(p, t)
            total = self.cfg.l1_weight * l1
            parts = {"l1": l1.detach()}
            net = self.lpips_net
            if net is not None:
                if next(net.parameters()).device != p.device:
                    net.to(p.device)
                # lpips expects [-1, 1]; scaling here is the same as its normalize=True
                lp = net(p * 2 - 1, t * 2 - 1).mean()
                total = total + self.cfg.lpips_weight * lp
                parts["lpips"] = lp.detach()
        parts["total"] = total.detach()
        return total, parts
