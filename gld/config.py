"""The run's configuration: the sections of the components that exist, composed into one tree.

Each section's dataclass lives beside the code that reads it: `data` in gld/data/config.py,
`diffusion` in gld/diffusion/config.py, `latent` in gld/latents/config.py, `model` in
gld/models/config.py, `loss.decoder` in gld/models/decoder_loss.py, `train` in
gld/train/config.py, `job` (the main job's stages and report) in gld/train/job_config.py. This module only composes them:
`load_config` reads YAML (`extends:` names a base file, relative to the including file),
applies dotted command-line overrides (`--data.num_views=6` or `--data.num_views 6`, values
parsed as YAML) and validates once, each section and then the rules that span sections; unknown
keys, wrong types and impossible combinations raise `ConfigError` naming the key, the value and
what is allowed. `save_config` writes the resolved tree; `load_config` on that file gives an
equal tree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from gld.configtypes import ConfigError, deep_merge, from_dict, set_dotted, to_dict
from gld.data.config import DataConfig
from gld.diffusion.config import DiffusionConfig
from gld.encoders.da3.config import PATCH_SIZE, resolve_variant
from gld.latents.config import LatentConfig
from gld.models.config import ModelConfig
from gld.models.decoder_loss import DecoderLossConfig
from gld.train.config import TrainConfig
from gld.train.job_config import JobConfig

__all__ = ["ConfigError", "Config", "load_config", "load_config_or_exit", "save_config", "parse_overrides"]


@dataclass
class LossConfig:
    """The stages' losses besides flow matching (whose settings are in `diffusion`)."""

    decoder: DecoderLossConfig = field(default_factory=DecoderLossConfig)


@dataclass
class Config:
    name: str = "gld"
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    job: JobConfig = field(default_factory=JobConfig)

    def validate(self) -> "Config":
        # Images enter the DA3 encoder, so every resolution must be a whole number of its patches.
        self.data.validate("data", patch_size=PATCH_SIZE)
        self.diffusion.validate("diffusion")
        self.latent.validate("latent")
        # The networks' channel counts follow from the encoder: one level is 2C wide.
        self.model.validate("model", level_channels=self.level_channels)
        self.loss.decoder.validate("loss.decoder")
        self.train.validate("train")
        self.job.validate("job")
        return self

    @property
    def level_channels(self) -> int:
        """2C: channels of one DA3 level (a latent token) for `latent.encoder`."""
        return 2 * resolve_variant(self.latent.encoder).dim

    def to_dict(self) -> dict:
        return to_dict(self)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'extends' must be a file name, got {base!r}")
        data = deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)
    return data


def parse_overrides(args: Sequence[str]) -> dict:
    """`["--data.seed=1", "--data.num_views", "4"]` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = body, args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key.replace("-", "_"), value)
        i += 1
    return tree


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (with `extends`) <- dotted overrides, then validated."""
    data: dict = {}
    if path is not None:
        data = _read_yaml(Path(path))
    data = deep_merge(data, parse_overrides(overrides))
    return from_dict(Config, data).validate()


def load_config_or_exit(path: Optional[str | os.PathLike] = None,
                        overrides: Sequence[str] = ()) -> Config:
    """`load_config` for entry points: a ConfigError ends the process with "config error: ..."
    (exit status 1), without a traceback."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved tree atomically; `load_config(path)` gives an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
