"""Frozen feature extractors. `gld.encoders.da3.DA3`: the geometric latent space (docs/da3.md)."""
from gld.encoders.da3 import DA3, DA3Config, Level

__all__ = ["DA3", "DA3Config", "Level"]
