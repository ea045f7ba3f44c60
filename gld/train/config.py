"""The `train` config section, read by the trainer (gld/train/trainer.py) and the DeepSpeed config
builder (gld/train/engine.py).

The micro batch per rank is `data.batch_size` (gld/data/config.py); the global batch,
micro batch x grad_accum x world size, is derived once, in `engine.ds_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from gld.configtypes import ConfigError

__all__ = ["TrainConfig", "WandbConfig"]


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class WandbConfig:
    """wandb logging. "online" logs online only when WANDB_API_KEY is set, else offline."""

    mode: Literal["off", "offline", "online"] = "off"
    project: str = "gld"
    name: Optional[str] = None  # None: the run folder's name


@dataclass
class TrainConfig:
    """Optimisation, sharding, checkpoints and logging of one training stage.

    steps: optimizer steps in total; lr: peak learning rate, reached after `warmup_steps`
    (linear from 0), then constant or cosine down to `min_lr` at `steps`. grad_clip: max global
    L2 norm (0 = off). zero_stage 0..3; offload_params needs ZeRO-3, offload_optimizer ZeRO >= 1.
    ema_decay: 0 = no EMA; else updated every `ema_every` optimizer steps. save_every: 0 = only
    at the end; keep_last: 0 = keep every checkpoint. resume: "auto" (the run folder's latest
    checkpoint if any), "none", or a checkpoint folder. sample_every: 0 = never (calls the
    stage's optional `sample_grid`). nonfinite: "stop" raises naming the first bad step;
    "skip" skips such optimizer steps, at most `max_skipped` of them. peak_tflops: the
    device's dense peak for MFU (None: known CUDA devices only). latent_cache: a folder (local
    or s3://) of latents cached offline by launch/cache_latents.py (gld/train/latent_cache.py);
    the diffusion stage then trains from it instead of encoding every batch on the fly (None,
    the default: on the fly). Only with stage diffusion; its latent_cache.json must match the
    config's encoder, boundary level, statistics, resolution and view count. overlap_comm:
    ZeRO >= 1 reduces and copies gradients on a side stream while the backward runs
    (DeepSpeed's overlap_comm; more memory for its buckets); off, they run in line.
    """

    stage: Literal["decoder", "diffusion"] = "diffusion"
    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    zero_stage: int = 2
    precision: Literal["bf16", "fp32"] = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    overlap_comm: bool = False
    ema_decay: float = 0.0
    ema_every: int = 1
    out_dir: str = "runs/gld"
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    log_every: int = 10
    sample_every: int = 0
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped: int = 10
    seed: int = 0
    peak_tflops: Optional[float] = None
    latent_cache: Optional[str] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, key: str = "train") -> None:
        """Raise ConfigError naming the first bad key."""
        _require(self.steps >= 1, f"{key}.steps", f"must be >= 1, got {self.steps}")
        _require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"{key}.min_lr",
                 f"must be in [0, train.lr={self.lr}], got {self.min_lr}")
        _require(0 <= self.warmup_steps <= self.steps, f"{key}.warmup_steps",
                 f"must be in [0, train.steps={self.steps}], got {self.warmup_steps}")
        _require(self.weight_decay >= 0, f"{key}.weight_decay",
                 f"must be >= 0, got {self.weight_decay}")
        for i, b in enumerate(self.betas):
            _require(0 <= b < 1, f"{key}.betas[{i}]", f"must be in [0, 1), got {b}")
        _require(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps}")
        _require(self.grad_clip >= 0, f"{key}.grad_clip", f"must be >= 0 (0 = off), got "
                 f"{self.grad_clip}")
        _require(self.grad_accum >= 1, f"{key}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage",
                 f"must be one of 0, 1, 2, 3, got {self.zero_stage}")
        _require(not self.offload_params or self.zero_stage == 3, f"{key}.offload_params",
                 f"needs train.zero_stage=3, got zero_stage={self.zero_stage}")
        _require(not self.offload_optimizer or self.zero_stage >= 1, f"{key}.offload_optimizer",
                 f"needs train.zero_stage >= 1, got zero_stage={self.zero_stage}")
        _require(0 <= self.ema_decay < 1, f"{key}.ema_decay",
                 f"must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        _require(self.ema_every >= 1, f"{key}.ema_every", f"must be >= 1, got {self.ema_every}")
        _require(self.out_dir != "", f"{key}.out_dir", "must name the run folder")
        _require(self.save_every >= 0, f"{key}.save_every",
                 f"must be >= 0 (0 = only at the end), got {self.save_every}")
        _require(self.keep_last >= 0, f"{key}.keep_last",
                 f"must be >= 0 (0 = keep all), got {self.keep_last}")
        _require(self.resume != "", f"{key}.resume",
                 "must be 'auto', 'none' or a checkpoint folder, got ''")
        _require(self.log_every >= 1, f"{key}.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.sample_every >= 0, f"{key}.sample_every",
                 f"must be >= 0 (0 = never), got {self.sample_every}")
        _require(self.max_skipped >= 0, f"{key}.max_skipped",
                 f"must be >= 0, got {self.max_skipped}")
        _require(self.peak_tflops is None or self.peak_tflops > 0, f"{key}.peak_tflops",
                 f"must be > 0 or null, got {self.peak_tflops}")
        _require(self.latent_cache is None or self.latent_cache.strip() != "",
                 f"{key}.latent_cache", "must be a cache folder or null, got an empty string")
        _require(self.latent_cache is None or self.stage == "diffusion", f"{key}.latent_cache",
                 f"only the diffusion stage trains from a latent cache, but {key}.stage is "
                 f"{self.stage!r} (unset {key}.latent_cache)")
        _require(self.wandb.project != "", f"{key}.wandb.project", "must not be empty")
