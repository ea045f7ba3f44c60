"""The `job` config section: the main job's stages, data preparation and report, read by
gld/train/job.py. Empty `stages` (the default) means a single-stage run of `train.stage`.

    job:
      prepare: {train: "scenes=24,frames=12,size=56x56", eval: "scenes=4,frames=12,size=56x56,start=1000"}
      stats_batches: 4               # latent statistics before the diffusion stage
      stages:                        # in order; each maps to overrides of the `train` section
        decoder: {steps: 300, lr: 3.0e-4}
        diffusion: {steps: 400}
      eval: {batches: 4}             # held-out view sets sampled for the report
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from gld.configtypes import ConfigError

__all__ = ["JobConfig", "PrepareConfig", "JobEvalConfig"]

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
class JobConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    stats_batches: int = 0          # 0: use latent.stats as configured
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
        if self.eval.batches < 0:
            raise ConfigError(f"{key}.eval.batches: must be >= 0, got {self.eval.batches}")
