"""The `model` config section: the sizes of the trainable networks, read by the trainer's
stages, the export and the pipeline.

    model:
      dit: {preset: level1}                       # a DIT_PRESETS name ...
      decoder: {preset: xl, level_dropout: 0.1}   # ... with any DecoderConfig field overridden

`preset` names a size table entry (gld/models/dit.py DIT_PRESETS, gld/models/decoder.py
DECODER_PRESETS); the other keys replace that preset's fields. Channel counts that follow from
the encoder (the DiT's latent channels, the decoder's input channels) are derived by
`Config.validate` (gld/config.py) and need not be written.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from gld.configtypes import ConfigError
from gld.models.decoder import DECODER_PRESETS, NUM_LEVELS, DecoderConfig
from gld.models.dit import DIT_PRESETS, DiTConfig

__all__ = ["ModelConfig"]


def _spec_fields(cls) -> set[str]:
    return {f.name for f in fields(cls)}


@dataclass
class ModelConfig:
    """dit / decoder: a mapping with `preset` and any field of DiTConfig / DecoderConfig."""

    dit: dict[str, Any] = field(default_factory=lambda: {"preset": "level1"})
    decoder: dict[str, Any] = field(default_factory=lambda: {"preset": "xl"})

    def _build(self, which: str, key: str, presets: dict, cls, derived: dict):
        spec = dict(getattr(self, which) or {})
        name = spec.pop("preset", None)
        if name not in presets:
            raise ConfigError(f"{key}.{which}.preset: expected one of {sorted(presets)}, got "
                              f"{name!r}")
        allowed = _spec_fields(cls)
        for k in spec:
            if k not in allowed:
                raise ConfigError(f"{key}.{which}.{k}: unknown {cls.__name__} field; allowed: "
                                  f"preset, {', '.join(sorted(allowed))}")
        base = {f.name: getattr(presets[name], f.name) for f in fields(cls)}
        base.update(derived)
        base.update(spec)
        for k, v in base.items():       # YAML gives lists where the dataclasses hold tuples
            if isinstance(v, list):
                base[k] = tuple(v)
        try:
            cfg = cls(**base)
            cfg.validate(f"{key}.{which}")
        except TypeError as e:
            raise ConfigError(f"{key}.{which}: {e}") from None
        for k, v in derived.items():
            if getattr(cfg, k) != v:
                raise ConfigError(f"{key}.{which}.{k}: {getattr(cfg, k)} does not match the "
                                  f"encoder ({v}); leave it out to derive it")
        return cfg

    def dit_config(self, latent_channels: Optional[int] = None, key: str = "model") -> DiTConfig:
        """The DiTConfig; latent_channels (2C of the encoder) is filled in when given."""
        derived = {} if latent_channels is None else {"latent_channels": latent_channels}
        return self._build("dit", key, DIT_PRESETS, DiTConfig, derived)

    def decoder_config(self, level_channels: Optional[int] = None,
                       key: str = "model") -> DecoderConfig:
        """The DecoderConfig; in_channels = 4 levels x 2C filled in when level_channels given."""
        derived = {} if level_channels is None else {"in_channels": NUM_LEVELS * level_channels}
        return self._build("decoder", key, DECODER_PRESETS, DecoderConfig, derived)

    def validate(self, key: str = "model", level_channels: Optional[int] = None) -> None:
        for which in ("dit", "decoder"):
            if not isinstance(getattr(self, which), dict):
                raise ConfigError(f"{key}.{which}: expected a mapping with 'preset', got "
                                  f"{getattr(self, which)!r}")
        self.dit_config(level_channels, key)
        self.decoder_config(level_channels, key)
