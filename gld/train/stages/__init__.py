"""Training stages: what a batch's loss is. Each is a `gld.train.trainer.Stage`.

- `decoder` (stage 1): the RGB decoder from the frozen encoder's four levels, L1 + LPIPS,
  level dropout (gld/train/stages/decoder.py).
- `diffusion`: the DiT-DH on any boundary level 0..3, flow matching, sources encoded alone and
  all views together as the release does (gld/train/stages/diffusion.py).

`build_stage(cfg, device)` picks one by `cfg.train.stage`. The cascade and the GAN come later
through the same interface.
"""
from __future__ import annotations

from gld.train.stages.decoder import DecoderStage
from gld.train.stages.diffusion import DiffusionStage

__all__ = ["DecoderStage", "DiffusionStage", "build_stage", "STAGES"]

STAGES = {"decoder": DecoderStage, "diffusion": DiffusionStage}


def build_stage(cfg, device="cpu", **kwargs):
    """The stage `cfg.train.stage` of the resolved `gld.config.Config`, its frozen encoder on
    `device` (the trainable model stays on the CPU until the engine moves it)."""
    return STAGES[cfg.train.stage](cfg, device=device, **kwargs)
