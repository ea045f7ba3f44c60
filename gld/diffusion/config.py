"""The `diffusion` config section: the flow path's training times and the sampler."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from gld.configtypes import ConfigError

__all__ = ["DiffusionConfig", "SamplerConfig"]


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class SamplerConfig:
    """ODE sampler from t = 1 (noise) down to `t_min`.

    The grid is `shift(1 - linspace(0, 1 - t_min, steps))`: `steps` time points, `steps - 1`
    updates, ending at shift(t_min) without a last update to 0 (the release's sampler with
    steps = 50, t_min = 0.001). Heun costs two network calls per update.
    CFG: `v_u + cfg_scale (v_c - v_u)` for t inside `cfg_interval`, the conditional prediction
    elsewhere; scale 1 (or an empty interval) runs the conditional branch alone.
    """

    method: Literal["euler", "heun"] = "euler"
    steps: int = 50
    t_min: float = 0.001
    cfg_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def validate(self, key: str = "diffusion.sampler") -> None:
        _require(self.steps >= 2, f"{key}.steps", f"must be >= 2 time points, got {self.steps}")
        _require(0.0 <= self.t_min < 1.0, f"{key}.t_min", f"must be in [0, 1), got {self.t_min}")
        _require(self.cfg_scale >= 0, f"{key}.cfg_scale", f"must be >= 0, got {self.cfg_scale}")
        lo, hi = self.cfg_interval
        _require(0.0 <= lo <= hi <= 1.0, f"{key}.cfg_interval",
                 f"must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")


@dataclass
class DiffusionConfig:
    """Flow matching `x_t = (1 - t) x + t eps` (t = 1 noise), velocity target `eps - x`.

    time_shift: a number, "auto" (sqrt(latent_dim / shift_base) from one sample's latent size),
    or the release's "release_train" (19.60) / "release_eval" (31.18). The resolved number is
    stored in every checkpoint (see gld/diffusion/flow.py).
    """

    time_dist: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_max: float = 0.999
    time_shift: Union[float, Literal["auto", "release_train", "release_eval"]] = "auto"
    shift_base: int = 4096
    loss_views: Literal["all", "targets"] = "all"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def validate(self, key: str = "diffusion") -> None:
        _require(self.logit_std > 0, f"{key}.logit_std", f"must be > 0, got {self.logit_std}")
        _require(0.0 < self.t_max <= 1.0, f"{key}.t_max", f"must be in (0, 1], got {self.t_max}")
        if not isinstance(self.time_shift, str):
            _require(self.time_shift > 0, f"{key}.time_shift",
                     f"must be > 0 (1 = no shift), got {self.time_shift}")
        _require(self.shift_base > 0, f"{key}.shift_base", f"must be > 0, got {self.shift_base}")
        self.sampler.validate(f"{key}.sampler")
