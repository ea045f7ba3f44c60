"""Depth Anything 3, reimplemented weight-compatibly (docs/da3.md).

backbone.py: ViT with alternating local / global attention, levels, propagation;
heads.py: DualDPT depth / ray head; camera.py: camera decoder / encoder and pose encoding;
model.py: `DA3` (from_pretrained, encode, propagate, geometry); config.py: size presets.
Loading published files: `gld.checkpoints.da3` (official) and `gld.checkpoints.gld_release`.
"""
from gld.encoders.da3.backbone import Level
from gld.encoders.da3.config import PRESETS, DA3Config, resolve_variant
from gld.encoders.da3.model import DA3

__all__ = ["DA3", "DA3Config", "Level", "PRESETS", "resolve_variant"]
