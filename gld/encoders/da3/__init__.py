"""Depth Anything 3, reimplemented weight-compatibly (docs/da3.md).

config.py: size presets and the patch size; backbone.py: ViT with alternating local / global
attention, levels, propagation; heads.py: DualDPT depth / ray head; camera.py: camera decoder /
encoder and pose encoding; model.py: `DA3` (encode, propagate, geometry, attention backend);
cuda_graph.py: `GraphedCall`; measure.py: FLOP counts, random weights, benchmarked entry points.
Published files load through `gld.checkpoints.da3.load_da3` (and `gld.checkpoints.gld_release`);
this package imports nothing from `gld.checkpoints`.
"""
from gld.encoders.da3.backbone import Level
from gld.encoders.da3.config import PATCH_SIZE, PRESETS, DA3Config, resolve_variant
from gld.encoders.da3.model import DA3

__all__ = ["DA3", "DA3Config", "Level", "PATCH_SIZE", "PRESETS", "resolve_variant"]
