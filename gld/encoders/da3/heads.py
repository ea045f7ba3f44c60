"""DualDPT: the DA3 depth / ray head (docs/da3.md "Heads"), run in fp32.

Input: the four levels' patch features, each (B', N, 2C) with B' = B * V images, and the image
size (H, W). Per level: LayerNorm(2C) (eps 1e-5), 1x1 projection to out_channels[l], UV sin-cos
embedding (x 0.1), resize (ConvT 4/s4, ConvT 2/s2, identity, conv 3x3/s2) so the four maps sit at
4x, 2x, 1x, 1/2x the patch grid; 3x3 conv (no bias) to `features`; two independent top-down
fusion chains (depth and ray; bilinear, align_corners=True).

Outputs (dict keys):
    depth      (B', H, W)      exp(c0)
    depth_conf (B', H, W)      exp(c1) + 1
    ray        (B', 8gh, 8gw, 6)  (direction, origin), linear
    ray_conf   (B', 8gh, 8gw)  exp + 1

Module names follow the official ones below `head.`. The ray chain has four output stacks
(`output_conv1_aux.{0..3}`, `output_conv2_aux.{0..3}`) of which only the last is used; all four
are kept so that published weights load without leftovers, but only the last is computed. The
four `output_conv2_aux.{i}.2` LayerNorms are one module (tied weights), as in the official code.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gld.encoders.da3.config import PATCH_SIZE

__all__ = ["DualDPT", "uv_embedding"]


def uv_embedding(channels: int, height: int, width: int, aspect: float, device,
                 dtype=torch.float32, omega: float = 100.0) -> Tensor:
    """Sin-cos embedding of a UV grid normalised by the image diagonal: (channels, height, width).

    u spans +-aspect/diag, v spans +-1/diag (pixel-centred: (n-1)/n of the span); channels
    [0, C/2) embed u as [sin, cos], [C/2, C) embed v.
    """
    diag = (aspect ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect / diag, 1.0 / diag
    u = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width,
                       dtype=dtype, device=device)
    v = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height,
                       steps=height, dtype=dtype, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="xy")  # (height, width)

    def sincos(pos: Tensor, dim: int) -> Tensor:
        freq = torch.arange(dim // 2, dtype=torch.float32, device=device)
        freq /= dim / 2.0
        freq = 1.0 / omega ** freq
        ang = torch.einsum("m,d->md", pos.reshape(-1), freq)
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    emb = torch.cat([sincos(uu, channels // 2), sincos(vv, channels // 2)], dim=-1).float()
    return emb.view(height, width, channels).permute(2, 0, 1)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """(top [+ RCU(lateral)]) -> RCU -> bilinear resize (x2 or to `size`) -> 1x1 conv."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1, 1, 0)

    def forward(self, top: Tensor, lateral: Optional[Tensor] = None,
                size: Optional[tuple[int, int]] = None) -> Tensor:
        y = top
        if lateral is not None and self.resConfUnit1 is not None:
            y = y + self.resConfUnit1(lateral)
        y = self.resConfUnit2(y)
        if size is None:
            size = (int(y.shape[-2] * 2), int(y.shape[-1] * 2))
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(y)


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class DualDPT(nn.Module):
    """Depth + ray DPT head; see the module docstring for shapes and output keys."""

    def __init__(self, dim_in: int, features: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        oc = list(out_channels)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
        ])
        s = self.scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(s, f"layer{i}_rn", nn.Conv2d(c, features, 3, 1, 1, bias=False))
        for suffix in ("", "_aux"):
            for i in (1, 2, 3, 4):
                setattr(s, f"refinenet{i}{suffix}", FusionBlock(features, has_residual=i != 4))
        half = features // 2
        s.output_conv1 = nn.Conv2d(features, half, 3, 1, 1)
        s.output_conv2 = nn.Sequential(nn.Conv2d(half, 32, 3, 1, 1), nn.ReLU(),
                                       nn.Conv2d(32, 2, 1))
        s.output_conv1_aux = nn.ModuleList(
            nn.Sequential(nn.Conv2d(features, half, 3, 1, 1), nn.Conv2d(half, features, 3, 1, 1),
                          nn.Conv2d(features, half, 3, 1, 1), nn.Conv2d(half, features, 3, 1, 1),
                          nn.Conv2d(features, half, 3, 1, 1))
            for _ in range(4))
        ray_norm = nn.LayerNorm(32)  # one module, shared by the four stacks (tied weights)
        s.output_conv2_aux = nn.ModuleList(
            nn.Sequential(nn.Conv2d(half, 32, 3, 1, 1), _Permute(0, 2, 3, 1), ray_norm,
                          _Permute(0, 3, 1, 2), nn.ReLU(), nn.Conv2d(32, 7, 1))
            for _ in range(4))

    def _add_uv(self, x: Tensor, H: int, W: int) -> Tensor:
        pe = uv_embedding(x.shape[1], x.shape[-2], x.shape[-1], W / H, x.device, x.dtype)
        return x + (pe * 0.1)[None]

    def _forward_chunk(self, feats: Sequence[Tensor], H: int, W: int) -> dict[str, Tensor]:
        Bp, N, C = feats[0].shape
        gh, gw = H // PATCH_SIZE, W // PATCH_SIZE
        maps = []
        for i, f in enumerate(feats):
            x = self.norm(f).permute(0, 2, 1).reshape(Bp, C, gh, gw)
            x = self._add_uv(self.projects[i](x), H, W)
            maps.append(self.resize_layers[i](x))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i + 1}_rn")(m) for i, m in enumerate(maps))
        main = s.refinenet4(l4, size=l3.shape[2:])
        aux = s.refinenet4_aux(l4, size=l3.shape[2:])
        main = s.refinenet3(main, l3, size=l2.shape[2:])
        aux = s.refinenet3_aux(aux, l3, size=l2.shape[2:])
        main = s.refinenet2(main, l2, size=l1.shape[2:])
        aux = s.refinenet2_aux(aux, l2, size=l1.shape[2:])
        main = s.output_conv1(s.refinenet1(main, l1))
        aux = s.output_conv1_aux[-1](s.refinenet1_aux(aux, l1))

        main = F.interpolate(main, size=(gh * PATCH_SIZE, gw * PATCH_SIZE), mode="bilinear",
                             align_corners=True)
        main = s.output_conv2(self._add_uv(main, H, W)).permute(0, 2, 3, 1)
        ray = s.output_conv2_aux[-1](self._add_uv(aux, H, W)).permute(0, 2, 3, 1)
        return {"depth": torch.exp(main[..., 0]), "depth_conf": torch.exp(main[..., 1]) + 1,
                "ray": ray[..., :6], "ray_conf": torch.exp(ray[..., 6]) + 1}

    def forward(self, feats: Sequence[Tensor], H: int, W: int, views: int,
                chunk: int = 8) -> dict[str, Tensor]:
        """feats: 4 x (B*V, N, 2C); (H, W) image size; views V. Returns the keys listed above.

        With more than `chunk` views the images are processed `chunk` at a time (memory), the
        rule the official head uses, which also keeps its fp32 numbers.
        """
        if views <= chunk:
            return self._forward_chunk(feats, H, W)
        outs = [self._forward_chunk([f[s:s + chunk] for f in feats], H, W)
                for s in range(0, feats[0].shape[0], chunk)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
