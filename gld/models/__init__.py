"""Trainable networks as plain nn.Modules: the DiT-DH diffusion transformer, its layers and its
camera inputs. They know nothing of DeepSpeed, data or files."""
from gld.models.dit import DIT_PRESETS, DiTConfig, DiTDH, dit_preset

__all__ = ["DIT_PRESETS", "DiTConfig", "DiTDH", "dit_preset"]
