"""DA3 size presets (docs/da3.md "Sizes") and variant-name resolution.

A preset is a name -> `DA3Config` table (DiT style); `resolve_variant` accepts the names used by
the official package and the Hugging Face repos ("da3-base", "DA3-BASE", "vitb", "base", ...).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DA3Config", "PRESETS", "resolve_variant", "PATCH_SIZE", "IMAGENET_MEAN", "IMAGENET_STD"]

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DA3Config:
    """Architecture of one DA3 variant.

    dim: backbone width C (levels have 2C channels); depth: number of ViT blocks; heads: backbone
    attention heads; out_layers: the four GLOBAL blocks whose outputs form levels 0..3;
    alt_start: first block with alternating local/global attention, qk-norm and RoPE (the camera
    token is written just before it); dpt_features / dpt_channels: DualDPT widths.
    """

    name: str
    dim: int
    depth: int
    heads: int
    out_layers: tuple[int, int, int, int]
    alt_start: int
    dpt_features: int
    dpt_channels: tuple[int, int, int, int]
    pos_grid: int = 37  # learned position table side (trained at 518 = 37 * 14)
    rope_base: float = 100.0
    cam_enc_heads: int = 16
    cam_enc_depth: int = 4

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"DA3Config {self.name}: dim {self.dim} not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 4:
            raise ValueError(f"DA3Config {self.name}: head dim {self.dim // self.heads} must be a "
                             "multiple of 4 for 2D RoPE")
        for layer in self.out_layers:
            if not self.is_global(layer):
                raise ValueError(f"DA3Config {self.name}: out_layer {layer} is not a global block "
                                 f"(global blocks are odd and >= alt_start={self.alt_start})")

    def is_global(self, block: int) -> bool:
        """Blocks alt_start, alt_start+1, ... alternate local / global; the odd ones are global."""
        return block >= self.alt_start and block % 2 == 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


PRESETS: dict[str, DA3Config] = {
    "da3-small": DA3Config("da3-small", 384, 12, 6, (5, 7, 9, 11), 4, 64, (48, 96, 192, 384)),
    "da3-base": DA3Config("da3-base", 768, 12, 12, (5, 7, 9, 11), 4, 128, (96, 192, 384, 768)),
    "da3-large": DA3Config("da3-large", 1024, 24, 16, (11, 15, 19, 23), 8, 256,
                           (256, 512, 1024, 1024)),
}

_ALIASES = {
    "small": "da3-small", "vits": "da3-small", "s": "da3-small",
    "base": "da3-base", "vitb": "da3-base", "b": "da3-base",
    "large": "da3-large", "vitl": "da3-large", "l": "da3-large",
    "da3-large-1.1": "da3-large",
}


def resolve_variant(name: str) -> DA3Config:
    """"da3-base" / "DA3-BASE" / "depth-anything/DA3-BASE" / "vitb" / "base" -> its DA3Config."""
    key = str(name).strip().lower().rsplit("/", 1)[-1].replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown DA3 variant {name!r}; expected one of {sorted(PRESETS)} "
                         f"(or an alias: {sorted(_ALIASES)})")
    return PRESETS[key]
