"""Flow path, time shift, loss and samplers (gld/diffusion) against closed forms."""
import math

import pytest
import torch

from gld.configtypes import ConfigError
from gld.diffusion import (RELEASE_EVAL_SHIFT, RELEASE_TRAIN_SHIFT, DiffusionConfig,
                           SamplerConfig, flow_loss, guided_velocity, initial_noise, interpolate,
                           resolve_time_shift, sample, sample_times, shift_time, time_grid,
                           velocity_target)


def test_shift_fixes_the_ends_is_monotone_and_one_is_identity():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    for a in (0.5, 3.0, RELEASE_EVAL_SHIFT):
        s = shift_time(t, a)
        assert s[0] == 0 and abs(s[-1].item() - 1) < 1e-15
        assert torch.all(s[1:] > s[:-1])
    # a > 1 moves every interior time towards the noise end
    assert torch.all(shift_time(t[1:-1], 4.0) > t[1:-1])


def test_release_shift_values_and_final_sampler_time():
    assert RELEASE_TRAIN_SHIFT == pytest.approx(19.596, abs=1e-3)
    assert RELEASE_EVAL_SHIFT == pytest.approx(31.177, abs=1e-3)
    grid = time_grid(SamplerConfig(steps=50, t_min=0.001), RELEASE_EVAL_SHIFT)
    assert grid.shape == (50,) and grid[0] == 1.0
    assert grid[-1].item() == pytest.approx(0.030, abs=5e-4)      # the release stops here
    assert time_grid(SamplerConfig(), RELEASE_TRAIN_SHIFT)[-1].item() == pytest.approx(0.019, abs=5e-4)


def test_resolve_time_shift():
    cfg = DiffusionConfig()
    assert resolve_time_shift(cfg, latent_dim=1536 * 1296 * 8) == pytest.approx(math.sqrt(3888))
    with pytest.raises(ValueError, match="needs the latent size"):
        resolve_time_shift(cfg)
    assert resolve_time_shift(DiffusionConfig(time_shift="release_eval")) == RELEASE_EVAL_SHIFT
    assert resolve_time_shift(DiffusionConfig(time_shift=2.5)) == 2.5


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"diffusion.sampler.cfg_interval"):
        DiffusionConfig(sampler=SamplerConfig(cfg_interval=(0.8, 0.2))).validate()
    with pytest.raises(ConfigError, match=r"diffusion.time_shift: must be > 0"):
        DiffusionConfig(time_shift=0.0).validate()
    with pytest.raises(ConfigError, match=r"diffusion.sampler.steps"):
        SamplerConfig(steps=1).validate("diffusion.sampler")


def test_path_and_target():
    x, eps = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = interpolate(x, eps, t)
    assert torch.equal(xt[0], x[0]) and torch.equal(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.5 * (x[1] + eps[1]))
    # the target is the time derivative of the path
    t0, h = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64), 1e-3
    fd = (interpolate(x.double(), eps.double(), t0 + h) - interpolate(x.double(), eps.double(), t0)) / h
    torch.testing.assert_close(fd, velocity_target(x.double(), eps.double()), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="one time per sample"):
        interpolate(x, eps, torch.zeros(2))


def test_flow_loss_all_views_and_masked():
    x, eps = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    target = eps - x
    assert flow_loss(target, x, eps).item() == 0.0
    pred = target.clone()
    pred[:, 0] += 1.0                                      # error only in view 0
    assert flow_loss(pred, x, eps).item() == pytest.approx(1 / 3)
    mask = torch.tensor([[False, True, True], [False, True, True]])
    assert flow_loss(pred, x, eps, mask).item() == 0.0
    assert flow_loss(pred, x, eps, ~mask).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"view_mask must be \(B, V\)"):
        flow_loss(pred, x, eps, mask[:, :2])


def test_training_times_are_shifted_draws_and_seeded():
    cfg = DiffusionConfig(t_max=0.999)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_times(4096, cfg, 3.0, g1)
    assert torch.equal(a, sample_times(4096, cfg, 3.0, g2))
    assert a.min() >= 0 and a.max() <= shift_time(torch.tensor(0.999), 3.0)
    # undo the shift: uniform on [0, t_max] (mean t_max / 2 within 5 standard errors)
    u = a / (3.0 - 2.0 * a)
    assert abs(u.mean().item() - 0.4995) < 5 * 0.2885 / math.sqrt(4096)
    ln = sample_times(4096, DiffusionConfig(time_dist="logit_normal", logit_mean=1.0, t_max=1.0),
                      1.0, torch.Generator().manual_seed(0))
    z = torch.logit(ln.double())
    assert abs(z.mean().item() - 1.0) < 5 / math.sqrt(4096)


def _point_mass_denoiser(x0):
    """Exact velocity of the path towards a single data point x0: (x_t - x0) / t."""
    return lambda x, t, drop: (x - x0) / t.view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_are_exact_on_a_straight_path(method):
    x0 = torch.randn(2, 3, 4, dtype=torch.float64)
    noise = initial_noise((2, 3, 4), seed=1).double()
    cfg = SamplerConfig(method=method, steps=7, t_min=0.01, cfg_scale=1.0)
    out = sample(_point_mass_denoiser(x0.float()), noise, 2.0, cfg)
    t_end = time_grid(cfg, 2.0)[-1]
    torch.testing.assert_close(out.double(), x0 + t_end * (noise - x0), rtol=0, atol=1e-5)


def test_heun_beats_euler_on_a_curved_field():
    """Data N(m, s^2): the exact ODE solution from noise e is x(t) = (1-t) m + sqrt((1-t)^2 s^2 + t^2) e."""
    m, s = 2.0, 0.5

    def den(x, t, drop):
        t = t.view(-1, 1)
        sig2 = (1 - t) ** 2 * s ** 2 + t ** 2
        mean = (1 - t) * m
        dsig = ((t - 1) * s ** 2 + t) / sig2.sqrt()
        return -m + (x - mean) / sig2.sqrt() * dsig
    e = initial_noise((256, 1), seed=0)
    errs = {}
    for method in ("euler", "heun"):
        cfg = SamplerConfig(method=method, steps=9, t_min=0.05, cfg_scale=1.0)
        t1 = time_grid(cfg, 1.0)[-1].item()
        exact = (1 - t1) * m + math.sqrt((1 - t1) ** 2 * s ** 2 + t1 ** 2) * e
        errs[method] = (sample(den, e, 1.0, cfg) - exact).abs().max().item()
    assert errs["heun"] < errs["euler"] / 5, errs


def test_cfg_combines_branches_in_one_batch_and_scale_one_is_conditional():
    calls = []

    def den(x, t, drop):
        calls.append((x.shape[0], None if drop is None else drop.tolist()))
        out = torch.full_like(x, 1.0)
        if drop is not None:
            out[drop] = 3.0                                   # unconditional rows
        return out
    x = torch.zeros(2, 4)
    v = guided_velocity(den, x, 0.5, SamplerConfig(cfg_scale=1.5))
    assert calls[-1] == (4, [False, False, True, True])
    torch.testing.assert_close(v, torch.full_like(x, 3.0 + 1.5 * (1.0 - 3.0)))
    v = guided_velocity(den, x, 0.5, SamplerConfig(cfg_scale=1.0))
    assert calls[-1] == (2, None) and torch.equal(v, torch.ones_like(x))
    v = guided_velocity(den, x, 0.9, SamplerConfig(cfg_scale=4.0, cfg_interval=(0.0, 0.5)))
    assert calls[-1] == (2, None) and torch.equal(v, torch.ones_like(x))


def test_sampling_is_reproducible_by_seed():
    den = _point_mass_denoiser(torch.zeros(1, 5))
    cfg = SamplerConfig(steps=5, cfg_scale=1.0)
    a = sample(den, initial_noise((1, 5), seed=7), 3.0, cfg)
    b = sample(den, initial_noise((1, 5), seed=7), 3.0, cfg)
    c = sample(den, initial_noise((1, 5), seed=8), 3.0, cfg)
    assert torch.equal(a, b) and not torch.equal(a, c)
