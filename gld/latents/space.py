"""The latent space: images -> normalised raw DA3 levels, and back to levels and geometry.

    space = build_latent_space(cfg.latent)                    # frozen DA3 + statistics
    lat = space.encode(images)                                # Latent of the boundary level
    levels = space.decode([lat])                              # 4 Levels, decoder form
    geo = space.geometry([lat])                               # depth, rays, w2c, K

A `Latent` is what the diffusion model sees: the RAW level `[local | global]` (before DA3's
final LayerNorm on the second half, docs/release-facts.md), normalised per channel with the
statistics of its level. Decoding reverses that: denormalise, LayerNorm on the second half
(the decoder form the heads read), and the deeper levels by propagation. Levels shallower than
the deepest one given are not derivable (level 0 comes from a cascade model) and must be given.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from gld.checkpoints.da3 import load_da3
from gld.checkpoints.gld_release import load_gld_dpt_decoder
from gld.encoders.da3 import DA3, PATCH_SIZE, Level, resolve_variant
from gld.encoders.da3.measure import randomize_
from gld.latents.config import LatentConfig
from gld.latents.stats import LatentStats, load_stats

__all__ = ["Latent", "LatentSpace", "build_latent_space"]

AmpArg = Union[str, None, torch.dtype]


class Latent(NamedTuple):
    """One level as the diffusion model sees it.

    z: (B, V, N, 2C) raw [local | global] patch features, normalised per channel with the
    level's statistics (unchanged when the space has none); cam_token: (B, V, 2C) token 0, raw
    and never normalised (propagation reads it; for generated views the caller chooses it);
    level: 0..3; grid: (H/14, W/14), N = gh * gw row-major.
    """

    z: Tensor
    cam_token: Tensor
    level: int
    grid: tuple[int, int]


class LatentSpace(nn.Module):
    """The frozen DA3 `encoder`, the `boundary_level` the diffusion model generates, and the
    `stats` that normalise it (None: latents are the raw features as they are).

    Submodules: encoder (DA3), stats (LatentStats or None); both move with `.to(device)`.
    What goes through the encoder runs without autograd (DA3's entry points); normalize /
    denormalize are plain tensor arithmetic.
    """

    def __init__(self, encoder: DA3, boundary_level: int = 1,
                 stats: Optional[LatentStats] = None) -> None:
        super().__init__()
        n = len(encoder.config.out_layers)
        if not 0 <= boundary_level < n:
            raise ValueError(f"LatentSpace: boundary_level must be in [0, {n - 1}], got "
                             f"{boundary_level}")
        if stats is not None:
            if stats.channels != self._channels(encoder):
                raise ValueError(f"LatentSpace: {stats.where} have {stats.channels} channels, "
                                 f"{encoder.variant} levels {self._channels(encoder)}")
            stats.index(boundary_level)  # raises naming the levels the statistics hold
        self.encoder, self.boundary_level, self.stats = encoder, boundary_level, stats

    @staticmethod
    def _channels(encoder: DA3) -> int:
        return 2 * encoder.config.dim

    @property
    def channels(self) -> int:
        """2C: channels of a latent token (1536 for DA3-Base)."""
        return self._channels(self.encoder)

    # -- normalisation -------------------------------------------------------------------------
    def normalize(self, features: Tensor, level: Optional[int] = None) -> Tensor:
        """Raw features (..., 2C) of `level` (default: the boundary) -> normalised."""
        level = self.boundary_level if level is None else level
        return features if self.stats is None else self.stats.normalize(features, level)

    def denormalize(self, z: Tensor, level: Optional[int] = None) -> Tensor:
        """Normalised latent (..., 2C) of `level` (default: the boundary) -> raw features."""
        level = self.boundary_level if level is None else level
        return z if self.stats is None else self.stats.denormalize(z, level)

    # -- images -> latents ---------------------------------------------------------------------
    def encode_levels(self, images: Tensor, amp: AmpArg = "auto") -> list[Level]:
        """Images (B, V, 3, H, W) in [0, 1] -> the 4 levels, RAW form, not normalised."""
        return self.encoder.encode(images, amp=amp, form="raw")

    def to_latent(self, level: Level, index: int) -> Latent:
        """A raw `Level` of index `index` -> its normalised `Latent`."""
        return Latent(self.normalize(level.features, index), level.cam_token, index,
                      tuple(level.grid))

    def encode(self, images: Tensor, level: Optional[int] = None, amp: AmpArg = "auto") -> Latent:
        """Images (B, V, 3, H, W) in [0, 1] -> the `Latent` of `level` (default: boundary)."""
        level = self.boundary_level if level is None else level
        return self.to_latent(self.encode_levels(images, amp)[level], level)

    # -- latents -> levels -> geometry ---------------------------------------------------------
    def raw_level(self, latent: Latent) -> Level:
        """A `Latent` -> its raw `Level` (denormalised)."""
        return Level(self.denormalize(latent.z, latent.level), latent.cam_token,
                     tuple(latent.grid))

    def propagate(self, latent: Latent, via: str = "local", amp: AmpArg = "auto") -> list[Level]:
        """The levels deeper than `latent.level`, raw form (`DA3.propagate`; `via` "local"
        re-runs the level's global block from its local half, "current" continues from the
        global half as the GLD release does; the same for encoded latents)."""
        return self.encoder.propagate(self.raw_level(latent), latent.level, amp=amp,
                                      form="raw", via=via)

    def decode(self, latents: Sequence[Latent], via: str = "local", amp: AmpArg = "auto"
               ) -> list[Level]:
        """Latents of some levels -> all 4 levels in the decoder form (what `DA3.geometry`
        and the RGB decoder read). Given levels are denormalised and LayerNorm'd; the levels
        deeper than the deepest given one are propagated from it (`propagate`)."""
        given = {}
        for lat in latents:
            if lat.level in given:
                raise ValueError(f"LatentSpace.decode: level {lat.level} given twice")
            given[lat.level] = lat
        if not given:
            raise ValueError("LatentSpace.decode: no latent given")
        deepest = max(given)
        missing = [lv for lv in range(deepest) if lv not in given]
        if missing:
            raise ValueError(f"LatentSpace.decode: levels {missing} are missing; only levels "
                             f"deeper than the deepest given ({deepest}) are propagated")
        raw = [self.raw_level(given[lv]) for lv in range(deepest + 1)]
        raw += self.propagate(given[deepest], via=via, amp=amp)
        return [self.encoder.decoder_form(lv) for lv in raw]

    def geometry(self, latents: Sequence[Latent], image_size: Optional[Sequence[int]] = None,
                 via: str = "local") -> dict[str, Tensor]:
        """Latents -> `DA3.geometry` of their decoded levels: depth, depth_conf (B, V, H, W),
        ray (B, V, 8H/14, 8W/14, 6), ray_conf, pose_enc (B, V, 9), w2c (B, V, 4, 4), K
        (B, V, 3, 3). image_size defaults to the latent grid times 14."""
        levels = self.decode(latents, via=via)
        if image_size is None:
            image_size = tuple(PATCH_SIZE * g for g in levels[0].grid)
        return self.encoder.geometry(levels, image_size)


def build_latent_space(cfg: LatentConfig, device: Union[str, torch.device] = "cpu",
                       attention_backend: str = "auto") -> LatentSpace:
    """The `latent` config section -> a `LatentSpace` on `device`: DA3 from `cfg.weights`
    (random, reproducible weights when None), the release's head from `cfg.dpt_head`, the
    statistics from `cfg.stats` when `cfg.normalize`. File errors name the file."""
    cfg.validate()
    # Statistics first: a bad file fails before the encoder's weights are read.
    stats = load_stats(cfg.stats, resolve_variant(cfg.encoder)) if cfg.normalize else None
    if cfg.weights is not None:
        encoder = load_da3(cfg.weights, cfg.encoder, attention_backend=attention_backend)
    else:
        encoder = randomize_(DA3(cfg.encoder, attention_backend=attention_backend))
    if cfg.dpt_head is not None:
        load_gld_dpt_decoder(encoder, cfg.dpt_head)
    return LatentSpace(encoder, cfg.boundary_level, stats).to(device)
