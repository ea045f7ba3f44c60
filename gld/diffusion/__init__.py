"""Flow matching for GLD: the path and its loss, training times and the time shift, ODE samplers
with classifier-free guidance. The network only predicts; everything here is shared by training,
validation and sampling, and knows nothing of cameras."""
from gld.diffusion.config import DiffusionConfig, SamplerConfig
from gld.diffusion.flow import (RELEASE_EVAL_SHIFT, RELEASE_TRAIN_SHIFT, flow_loss, interpolate,
                                resolve_time_shift, sample_times, shift_time, velocity_target)
from gld.diffusion.sampler import guided_velocity, initial_noise, sample, time_grid

__all__ = ["DiffusionConfig", "SamplerConfig", "RELEASE_EVAL_SHIFT", "RELEASE_TRAIN_SHIFT",
           "flow_loss", "interpolate", "resolve_time_shift", "sample_times", "shift_time",
           "velocity_target", "guided_velocity", "initial_noise", "sample", "time_grid"]
