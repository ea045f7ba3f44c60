"""The training stages (what a batch's loss is) and the main job's configuration, on the CPU
without DeepSpeed: inputs as the release builds them, losses that train, config errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gld.config import ConfigError, load_config
from gld.data.streaming import build_loader
from gld.train.job import stage_config
from gld.train.stages import DecoderStage, DiffusionStage
from gld.train.stages.common import sources_first

ROOT = Path(__file__).resolve().parents[1]


def tiny(*over):
    return load_config(ROOT / "configs" / "tiny.yaml",
                       ["--data.synthetic_scenes=4", "--data.batch_size=2", *over])


def first_batch(cfg):
    return next(iter(build_loader(cfg.data, "train", rank=0, world_size=1)))


def test_sources_first_order_and_errors():
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    order, smin = sources_first({"source_mask": mask})
    assert order.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]] and smin == 1
    with pytest.raises(ValueError, match="1..V-1 sources"):
        sources_first({"source_mask": torch.ones(1, 3, dtype=torch.bool)})


def test_diffusion_inputs_as_the_release_builds_them():
    cfg = tiny("--diffusion.time_shift=auto")
    torch.manual_seed(0)
    stage = DiffusionStage(cfg)
    batch = first_batch(cfg)
    inp = stage.inputs(batch)
    B, V = batch["source_mask"].shape
    for b in range(B):
        order, _ = sources_first({k: v[b:b + 1] for k, v in batch.items()
                                  if k == "source_mask"})
        order = order[0]
        S = int(batch["source_mask"][b].sum())
        assert inp["is_src"][b].tolist() == [True] * S + [False] * (V - S)
        assert not inp["is_src"][b, -1]                           # the pose reference
        imgs = batch["images"][b, order].float()[None] / 255
        torch.testing.assert_close(inp["c2w"][b], batch["c2w"][b, order].float())
        # x: all views encoded together; source: the sources encoded alone, zero for targets
        torch.testing.assert_close(inp["x"][b], stage.space.encode(imgs).z[0].float())
        torch.testing.assert_close(inp["source"][b, :S],
                                   stage.space.encode(imgs[:, :S]).z[0].float())
        assert inp["source"][b, S:].abs().max() == 0
        # encoding the sources alone differs from their encoding among all views (DA3's
        # global attention sees the other views): the two passes are not interchangeable
        assert (inp["source"][b, :S] - inp["x"][b, :S]).abs().max() > 1e-4
    H, W = cfg.data.resolutions[0]
    # "auto": sqrt(2C * tokens * views / 4096)
    expect = (cfg.level_channels * (H // 14) * (W // 14) * cfg.data.num_views / 4096) ** 0.5
    assert stage.time_shift == pytest.approx(expect)
    # a number in the config is taken as it is (the tiny job sets one)
    assert DiffusionStage(tiny("--diffusion.time_shift=16")).time_shift == 16.0


def overfit(stage, batch, steps, lr):
    opt = torch.optim.Adam(stage.model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss, extras = stage.loss(stage.model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_decoder_stage_trains():
    cfg = tiny("--model.decoder.level_dropout=0.0")
    torch.manual_seed(0)
    stage = DecoderStage(cfg)
    batch = first_batch(cfg)
    stage.model.train()
    losses = overfit(stage, batch, 60, 3e-3)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert stage.tokens_in(batch) == 2 * 4 * 16 and stage.samples_in(batch) == 2
    assert stage.flops_per_sample(batch) > 0


def test_diffusion_stage_trains_and_counts():
    cfg = tiny()
    torch.manual_seed(0)
    stage = DiffusionStage(cfg)
    batch = first_batch(cfg)
    stage.model.train()
    torch.manual_seed(1)
    first = [stage.loss(stage.model, batch, 0)[0].item() for _ in range(4)]
    overfit(stage, batch, 60, 2e-3)
    torch.manual_seed(1)
    last = [stage.loss(stage.model, batch, 0)[0].item() for _ in range(4)]
    assert sum(last) < 0.8 * sum(first), (first, last)
    flops = stage.flops_per_sample(batch)
    assert flops > 0
    # ZeRO-3 leaves partitioned parameters' tensors empty between forwards (their size in
    # ds_numel): the count, and so MFU, must not change
    for p in stage.model.parameters():
        p.ds_numel = p.numel()
        p.data = p.data.new_empty(0)
    assert stage.flops_per_sample(batch) == flops


def test_stage_config_overrides_and_job_errors():
    cfg = tiny()
    d = stage_config(cfg, "decoder")
    assert d.train.stage == "decoder" and d.train.steps == cfg.job.stages["decoder"]["steps"]
    assert d.train.out_dir == cfg.train.out_dir and d.train.zero_stage == cfg.train.zero_stage
    with pytest.raises(ConfigError, match=r"job.stages.cascade: unknown stage"):
        tiny("--job.stages.cascade.steps=3")
    with pytest.raises(ConfigError, match=r"job.stages.decoder.stepz: not a train setting"):
        tiny("--job.stages.decoder.stepz=3")
    with pytest.raises(ConfigError, match=r"model.decoder.in_channels: 64 does not match"):
        tiny("--model.decoder.in_channels=64")
    with pytest.raises(ConfigError, match=r"model.dit.preset: expected one of"):
        tiny("--model.dit.preset=huge")
