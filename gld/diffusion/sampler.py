"""ODE samplers for the flow path (Euler as the release runs it, and Heun) with CFG.

The sampler knows nothing of cameras or views: it integrates `dx/dt = v(x, t)` from t = 1
(noise) down the shifted grid of `SamplerConfig`, calling a *denoiser*
`denoiser(x, t, drop) -> v` with x (B, ...), t (B,) and `drop` None (conditional only) or (B,)
bool, True for the rows that are the unconditional (camera-dropped) branch. With CFG active the
conditional and unconditional branches run as one batch of 2B rows: the first B conditional.
Conditions (sources, cameras) are the denoiser's business: it repeats them for 2B rows.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from gld.diffusion.config import SamplerConfig
from gld.diffusion.flow import shift_time

__all__ = ["Denoiser", "time_grid", "initial_noise", "guided_velocity", "sample"]

Denoiser = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def time_grid(cfg: SamplerConfig, shift: float) -> Tensor:
    """(steps,) float64 times from 1 down to shift(t_min): shift(1 - linspace(0, 1 - t_min))."""
    base = 1.0 - torch.linspace(0.0, 1.0 - cfg.t_min, cfg.steps, dtype=torch.float64)
    return shift_time(base, shift)


def initial_noise(shape: tuple[int, ...], seed: int, device=None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, I) drawn on the CPU from `seed`, so a seed gives the same start on every device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def guided_velocity(denoiser: Denoiser, x: Tensor, t: float, cfg: SamplerConfig) -> Tensor:
    """v at scalar time t: `v_u + s (v_c - v_u)` inside cfg_interval (one 2B batch), else v_c."""
    B = x.shape[0]
    lo, hi = cfg.cfg_interval
    guided = cfg.cfg_scale != 1.0 and lo <= t <= hi
    if not guided:
        return denoiser(x, torch.full((B,), t, device=x.device, dtype=torch.float32), None)
    drop = torch.arange(2 * B, device=x.device) >= B
    v = denoiser(torch.cat([x, x]), torch.full((2 * B,), t, device=x.device,
                                               dtype=torch.float32), drop)
    v_c, v_u = v[:B], v[B:]
    return v_u + cfg.cfg_scale * (v_c - v_u)


@torch.no_grad()
def sample(denoiser: Denoiser, noise: Tensor, shift: float, cfg: SamplerConfig,
           progress: bool = False) -> Tensor:
    """Integrate from `noise` (t = 1) to the grid's last time; returns the final state.

    Euler: `x += (t_{i+1} - t_i) v(x, t_i)`. Heun: the trapezoid of v at both ends (the Euler
    point as predictor). The state is kept in fp32 whatever the denoiser's dtype.
    """
    grid = time_grid(cfg, shift).tolist()
    x = noise.float()
    steps = range(len(grid) - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"{cfg.method} sampling", leave=False)
    for i in steps:
        t0, t1 = grid[i], grid[i + 1]
        dt = t1 - t0
        v0 = guided_velocity(denoiser, x, t0, cfg).float()
        if cfg.method == "euler":
            x = x + dt * v0
        elif cfg.method == "heun":
            v1 = guided_velocity(denoiser, x + dt * v0, t1, cfg).float()
            x = x + dt * 0.5 * (v0 + v1)
        else:
            raise ValueError(f"sampler method: unknown {cfg.method!r}; choose euler or heun")
    return x
