"""The `latent` config section, read by `gld.latents.space.build_latent_space`.

The defaults need no files (random encoder weights, no normalisation) so that a bare config
validates; the presets set real values. Widths come from the encoder preset, never from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gld.checkpoints.loading import TORCH_SUFFIXES
from gld.configtypes import ConfigError
from gld.encoders.da3.config import PRESETS, resolve_variant

__all__ = ["LatentConfig"]


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class LatentConfig:
    """The diffusion latent: level `boundary_level` of the frozen DA3 `encoder`, raw form.

    weights: a DA3 weights file or folder (gld.checkpoints.da3.load_da3); None builds the
    encoder with reproducible random weights (tests and the tiny preset only).
    dpt_head: the GLD release's fine-tuned DualDPT head (dpt_decoder.pt) loaded over the
    encoder's head for geometry; None keeps the head of `weights`.
    stats: statistics files whose levels are combined (ours .safetensors from
    launch/compute_stats.py, or the release's normalization_stats_level{L}.pt); they must hold
    `boundary_level` when `normalize` is on.
    """

    encoder: str = "da3-base"
    weights: Optional[str] = None
    dpt_head: Optional[str] = None
    boundary_level: int = 1
    stats: list[str] = field(default_factory=list)
    normalize: bool = False

    def validate(self, key: str = "latent") -> None:
        try:
            variant = resolve_variant(self.encoder)
        except ValueError:
            raise ConfigError(f"{key}.encoder: unknown DA3 variant {self.encoder!r}; expected one "
                              f"of {', '.join(sorted(PRESETS))}") from None
        levels = len(variant.out_layers)
        _require(0 <= self.boundary_level < levels, f"{key}.boundary_level",
                 f"must be in [0, {levels - 1}] (the {variant.name} levels), got "
                 f"{self.boundary_level}")
        for name in ("weights", "dpt_head"):
            value = getattr(self, name)
            _require(value is None or value.strip() != "", f"{key}.{name}",
                     "must be a path or null, got an empty string")
        for i, path in enumerate(self.stats):
            suffix = Path(path).suffix
            _require(suffix == ".safetensors" or suffix in TORCH_SUFFIXES, f"{key}.stats[{i}]",
                     f"expected a .safetensors file (launch/compute_stats.py) or the release's "
                     f".pt, got {path!r}")
        _require(not self.normalize or self.stats, f"{key}.stats",
                 f"{key}.normalize is true but no statistics file is given (compute one with "
                 f"launch/compute_stats.py, or set {key}.normalize=false)")
