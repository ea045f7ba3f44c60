"""Trainable networks as plain nn.Modules: the DiT-DH diffusion transformer, its layers and its
camera inputs, and the RGB decoder. They know nothing of DeepSpeed, data or files."""
from gld.models.decoder import (DECODER_PRESETS, DecoderConfig, RGBDecoder, decoder_preset)
from gld.models.dit import DIT_PRESETS, DiTConfig, DiTDH, dit_preset

__all__ = ["DIT_PRESETS", "DiTConfig", "DiTDH", "dit_preset",
           "DECODER_PRESETS", "DecoderConfig", "RGBDecoder", "decoder_preset"]
from gld.models.decoder_loss import DecoderLoss, DecoderLossConfig

__all__ += ["DecoderLoss", "DecoderLossConfig"]
