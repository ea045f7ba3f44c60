"""The `job` config section: the main job's stages, data preparation and report, read by
gld/train/job.py. Empty `stages` (the default) means a single-stage run of `train.stage`.

    job:
      prepare: {train: "scenes=24,frames=12,size=56x56", eval: "scenes=4,frames=12,size=56x56,start=1000"}
      stats_batches: 4               # latent statistics before the diffusion stage
      latent_cache: {epochs: 0}      # > 0: the diffusion stage trains from a latent cache of
                                     # that many epochs of the training loader, written once
      stages:                        # in order; each maps to overrides of the `train` section
        decoder: {steps: 300, lr: 3.0e-4}
        diffusion: {steps: 400}
      eval: {batches: 4}             # held-out view sets sampled for the report
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from gld.configtypes import ConfigError

__all__ = ["JobConfig", "PrepareConfig", "JobEvalConfig", "JobCacheConfig"]

STAGE_NAMES = ("decoder", "diffusion")


@dataclass
class PrepareConfig:
    """Synthetic shards written before training (specs of gld/data/formats/synthetic.py);
    None: use `data.paths` / `data.eval.paths` as they are."""

    train: Optional[str] = None
    eval: Optional[str] = None
    writer: Literal["mds", "wds"] = "mds"


@dataclass
class JobEvalConfig:
    """The report's evaluation: `batches` batches of the eval split through the pipeline."""

    batches: int = 4
    lpips_net: str = "alex"
    depth_align: Literal["median", "lstsq", "lstsq_shift", "none"] = "median"


@dataclass
class JobCacheConfig:
    """The diffusion stage's latent cache (gld/train/latent_cache.py), written by the job into
    <out_dir>/latent_cache after the statistics: `epochs` epochs of the training loader,
    encoded once (0: encode every batch while training). Training repeats the cached epochs
    (the same views of each record, fresh times and noise) past `epochs`; a stage override
    `train.latent_cache` names another cache instead."""

    epochs: int = 0
    dtype: Literal["float16", "float32"] = "float16"


@dataclass
class JobConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    stats_batches: int = 0          # 0: use latent.stats as configured
    latent_cache: JobCacheConfig = field(default_factory=JobCacheConfig)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: JobEvalConfig = field(default_factory=JobEvalConfig)

    def validate(self, key: str = "job") -> None:
        from gld.train.config import TrainConfig

        allowed = {f.name for f in fields(TrainConfig)} - {"stage"}
        for name, overrides in self.stages.items():
            if name not in STAGE_NAMES:
                raise ConfigError(f"{key}.stages.{name}: unknown stage; choose from "
                                  f"{', '.join(STAGE_NAMES)}")
            if not isinstance(overrides, dict):
                raise ConfigError(f"{key}.stages.{name}: expected a mapping of train.* "
                                  f"overrides, got {overrides!r}")
            for k in overrides:
                if k not in allowed:
                    raise ConfigError(f"{key}.stages.{name}.{k}: not a train setting; allowed: "
                                      f"{', '.join(sorted(allowed))}")
        if self.stats_batches < 0:
            raise ConfigError(f"{key}.stats_batches: must be >= 0, got {self.stats_batches}")
        if self.latent_cache.epochs < 0:
            raise ConfigError(f"{key}.latent_cache.epochs: must be >= 0, got "
                              f"{self.latent_cache.epochs}")
        if self.eval.batches < 0:
            raise ConfigError(f"{key}.eval.batches: must be >= 0, got {self.eval.batches}")
