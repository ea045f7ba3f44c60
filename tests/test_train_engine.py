"""Single-process checks of gld/train/ (no process group, no DeepSpeed engine): the DeepSpeed
config derivation, TrainConfig errors naming keys, the LR schedule, activation checkpointing
from outside, the atomic `latest` and pruning, EMA files across layouts, metrics logging.
The multi-rank behaviour is in tests/test_train_distributed.py."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from gld.configtypes import ConfigError, from_dict
from gld.train import checkpoint as ckpt
from gld.train.config import TrainConfig
from gld.train.ema import EMA, consolidate_ema_files
from gld.train.engine import apply_activation_checkpointing, ds_config, lr_factor
from gld.train.metrics_log import MetricsLog, scrub_secrets
from gld.train.trainer import Stage
from tests.train_stage import TinyBlock, TinyNet, TinyStage


# ---- DeepSpeed config -----------------------------------------------------------------------------
def test_ds_config_derives_the_global_batch_once():
    cfg = TrainConfig(grad_accum=4, zero_stage=2, grad_clip=0.5, precision="bf16")
    c = ds_config(cfg, micro_batch=3, world_size=2)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"],
            c["train_batch_size"]) == (3, 4, 24)
    # bf16 = torch autocast over fp32 weights; DeepSpeed's bf16 section (bf16 weights) stays off
    assert c["gradient_clipping"] == 0.5 and c["bf16"] == {"enabled": False}
    assert c["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert c["zero_optimization"]["stage"] == 2
    # ZeRO-1/2 pad every parameter to 16 bytes in the flat buffer (compiled blocks need it)
    assert c["zero_optimization"]["parameter_alignment"] is True
    assert c["zero_optimization"]["overlap_comm"] is False
    cfg.overlap_comm = True
    assert ds_config(cfg, 3, 2)["zero_optimization"]["overlap_comm"] is True
    # no JIT-built optimizer or scheduler: both are torch objects handed over in code
    assert "optimizer" not in c and "scheduler" not in c
    assert "offload_optimizer" not in c["zero_optimization"]


def test_ds_config_zero3_and_offload():
    cfg = TrainConfig(zero_stage=3, precision="fp32", offload_optimizer=True,
                      offload_params=True)
    cfg.validate()
    z = ds_config(cfg, 1, 8)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 0  # tiny parameters partition too
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    c = ds_config(cfg, 1, 8)
    assert c["bf16"] == {"enabled": False} and c["zero_force_ds_cpu_optimizer"] is False
    assert c["torch_autocast"]["enabled"] is False
    with pytest.raises(ValueError, match="micro batch"):
        ds_config(cfg, 0, 1)


@pytest.mark.parametrize("fields, key", [
    ({"steps": 0}, "train.steps"),
    ({"lr": 1e-3, "min_lr": 1e-2}, "train.min_lr"),
    ({"steps": 10, "warmup_steps": 11}, "train.warmup_steps"),
    ({"betas": (0.9, 1.0)}, "train.betas[1]"),
    ({"grad_accum": 0}, "train.grad_accum"),
    ({"zero_stage": 4}, "train.zero_stage"),
    ({"zero_stage": 2, "offload_params": True}, "train.offload_params"),
    ({"zero_stage": 0, "offload_optimizer": True}, "train.offload_optimizer"),
    ({"ema_decay": 1.0}, "train.ema_decay"),
    ({"keep_last": -1}, "train.keep_last"),
    ({"log_every": 0}, "train.log_every"),
    ({"resume": ""}, "train.resume"),
])
def test_train_config_errors_name_the_key(fields, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        TrainConfig(**fields).validate()


def test_train_config_from_dict_types_and_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' \(did you mean 'train.lr'"):
        from_dict(TrainConfig, {"lrr": 1e-4}, prefix="train.")
    with pytest.raises(ConfigError, match="train.precision: expected one of 'bf16', 'fp32'"):
        from_dict(TrainConfig, {"precision": "fp16"}, prefix="train.")
    with pytest.raises(ConfigError, match="train.wandb.mode"):
        from_dict(TrainConfig, {"wandb": {"mode": "on"}}, prefix="train.")
    cfg = from_dict(TrainConfig, {"lr": "3e-4", "betas": [0.9, 0.95]}, prefix="train.")
    assert cfg.lr == 3e-4 and cfg.betas == (0.9, 0.95)
    cfg.validate()


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2, schedule="cosine")
    f = [lr_factor(cfg, s) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    const = TrainConfig(steps=10, lr=1.0, warmup_steps=0, schedule="constant")
    assert {lr_factor(const, s) for s in range(10)} == {1.0}


# ---- activation checkpointing from outside ------------------------------------------------------------
def test_activation_checkpointing_keeps_names_and_gradients():
    torch.manual_seed(0)
    plain, wrapped = TinyNet(), TinyNet()
    wrapped.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(wrapped, [TinyBlock]) == 2
    assert apply_activation_checkpointing(wrapped, [TinyBlock]) == 0  # not twice
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randn(5, 147)
    for m in (plain, wrapped):
        m(x).square().sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.equal(a.grad, b.grad), n
    with torch.no_grad():
        assert torch.equal(plain(x), wrapped(x))


def test_tiny_stage_is_a_stage():
    assert isinstance(TinyStage(), Stage)


# ---- atomic latest, resume resolution, pruning ---------------------------------------------------------
def _fake_checkpoint(root, step, complete=True):
    folder = root / ckpt.step_tag(step)
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))
    if complete:
        (folder / ckpt.COMPLETE).write_text("")
    return folder


def test_latest_is_published_only_for_complete_folders(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    assert ckpt.read_latest(root) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None
    first = _fake_checkpoint(root, 2)
    ckpt.publish_latest(root, first.name)
    assert ckpt.read_latest(root) == first
    half = _fake_checkpoint(root, 4, complete=False)  # a kill while writing step 4
    with pytest.raises(ckpt.CheckpointError, match="not complete"):
        ckpt.publish_latest(root, half.name)
    (root / "latest.tmp").write_text("step_00000004\n")  # a kill between write and replace
    assert ckpt.read_latest(root) == first
    assert ckpt.resolve_resume("auto", tmp_path) == first
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume(str(first), tmp_path) == first
    assert ckpt.resolve_resume(str(root), tmp_path) == first
    with pytest.raises(ckpt.CheckpointError, match=r"train.resume=.*not a complete checkpoint"):
        ckpt.resolve_resume(str(half), tmp_path)
    (root / "latest").write_text(half.name)  # never written by publish_latest; refused on load
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.read_latest(root)


def test_prune_keeps_the_newest_and_latest(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    for s in (2, 3, 5):
        _fake_checkpoint(root, s)
    _fake_checkpoint(root, 1, complete=False)  # older than latest: a killed write, removed
    _fake_checkpoint(root, 6, complete=False)  # newer: rewritten (cleared) when step 6 is saved
    ckpt.publish_latest(root, ckpt.step_tag(3))  # e.g. resumed from an older one
    removed = ckpt.prune_checkpoints(root, keep_last=1)
    left = sorted(p.name for p in root.glob("step_*"))
    assert left == [ckpt.step_tag(s) for s in (3, 5, 6)], left  # latest survives keep_last=1
    assert {p.name for p in removed} == {ckpt.step_tag(1), ckpt.step_tag(2)}
    ckpt.publish_latest(root, ckpt.step_tag(5))
    ckpt.prune_checkpoints(root, keep_last=1)
    assert sorted(p.name for p in root.glob("step_*")) == [ckpt.step_tag(5), ckpt.step_tag(6)]
    _fake_checkpoint(root, 7)
    ckpt.prune_checkpoints(root, keep_last=0)  # 0 keeps every complete one
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [5, 7]


def test_save_safetensors_atomic(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    path = ckpt.save_safetensors_atomic(state, tmp_path / "sub" / "m.safetensors", {"k": "v"})
    back = load_file(str(path))
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert not list((tmp_path / "sub").glob("*.tmp"))


# ---- EMA files across layouts ------------------------------------------------------------------------
def test_ema_files_reslice_between_layouts(tmp_path):
    """Two ZeRO-3-style partition files (P = ceil(numel / 2), the last padded) load into a
    whole-weights EMA and consolidate to the same tensors, and the reverse."""
    torch.manual_seed(0)
    model = TinyNet()
    full = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    full.update()
    want = full.consolidated_state_dict()
    assert set(want) == {n for n, _ in model.named_parameters()}
    # the same EMA as 2 ranks' partitions, written as 2 files
    two = tmp_path / "two"
    two.mkdir()
    for rank in range(2):
        part = EMA(model, 0.9)
        part.rank, part.world, part.zero3 = rank, 2, True
        for n, flat in full.shadow.items():
            P = -(-flat.numel() // 2)
            padded = torch.cat([flat, flat.new_zeros(2 * P - flat.numel())])
            part.shadow[n] = padded[rank * P:(rank + 1) * P].clone()
            part.offsets[n] = rank * P
        part.num_updates = 1
        part.save(two)
    back = EMA(TinyNet(), 0.9)
    back.load(two)
    assert back.num_updates == 1
    for n, t in back.consolidated_state_dict().items():
        assert torch.equal(t, want[n]), n
    for n, t in consolidate_ema_files(two).items():
        assert torch.equal(t, want[n]), n
    # whole -> rank 1 of 2
    one = tmp_path / "one"
    one.mkdir()
    full.save(one)
    part = EMA(model, 0.9)
    part.rank, part.world, part.zero3 = 1, 2, True
    for n, flat in full.shadow.items():
        P = -(-flat.numel() // 2)
        part.shadow[n], part.offsets[n] = torch.zeros(P), P
    part.load(one)
    for n, flat in full.shadow.items():
        P = -(-flat.numel() // 2)
        assert torch.equal(part.shadow[n][:flat.numel() - P], flat[P:]), n


# ---- metrics ------------------------------------------------------------------------------------------
def test_metrics_log_and_secrets(tmp_path, monkeypatch):
    tree = {"data": {"s3_endpoint": "http://x", "api_key": "k"}, "wandb_token": "t",
            "train": {"lr": 1e-4, "password": "p"}}
    assert scrub_secrets(tree) == {"data": {"s3_endpoint": "http://x"}, "train": {"lr": 1e-4}}
    log = MetricsLog(tmp_path, rank=0)
    log.log(1, {"loss": 0.5, "mfu": None})
    log.log(2, {"loss": 0.25, "mfu": None})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "mfu": None}, {"step": 2, "loss": 0.25, "mfu": None}]
    MetricsLog(tmp_path / "r1", rank=1).log(1, {"loss": 1.0})
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()


def test_wandb_offline_without_key(tmp_path, monkeypatch):
    """mode online without WANDB_API_KEY logs offline; the config it gets has no secrets."""
    pytest.importorskip("wandb", reason="wandb is an install requirement; missing here")
    from gld.train.config import WandbConfig

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, 0, WandbConfig(mode="online", project="gld-test"),
                     {"train": {"lr": 1.0}, "api_key": "secret"})
    try:
        assert log.wandb.settings.mode == "offline"
        assert "api_key" not in dict(log.wandb.config)
        log.log(1, {"loss": 1.0})
    finally:
        log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert not any("secret" in p.read_text(errors="ignore")
                   for p in (tmp_path / "wandb").rglob("*.yaml"))
    assert os.environ.get("WANDB_API_KEY") is None
