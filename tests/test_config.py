"""Config tree: round trip, overrides, and each kind of error with its message."""
from pathlib import Path

import pytest

from gld.config import Config, ConfigError, load_config, parse_overrides, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "gld_da3_base.yaml"])
def test_presets_load_and_round_trip(tmp_path, name):
    cfg = load_config(CONFIGS / name)
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert not (tmp_path / "resolved.yaml.tmp").exists()


def test_authors_settings_in_base_preset():
    cfg = load_config(CONFIGS / "gld_da3_base.yaml")
    assert cfg.model.dit.widths == (768, 2048) and cfg.model.dit.depths == (28, 6)
    assert cfg.model.dit.widths[0] // cfg.model.dit.heads[0] == 48  # backbone head dim
    assert cfg.model.dit.widths[1] // cfg.model.dit.heads[1] == 128  # DDT head dim
    assert cfg.optim.lr == 5e-5 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.ema_decay == 0.9995
    assert cfg.data.resolutions == [(504, 504), (336, 504), (280, 504)]
    assert cfg.diffusion.cfg_scale == 1.5 and cfg.diffusion.camera_dropout == 0.1
    assert cfg.latent.channels == 1536
    assert cfg.data.batch_size * 8 == 48


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "tiny.yaml", ["--optim.lr=1e-3", "--data.num_views", "6",
                                              "--model.dit.widths=[32, 64]",
                                              "--logging.wandb_project=proj", "--train.resume=null"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.num_views == 6
    assert cfg.model.dit.widths == (32, 64)
    assert cfg.logging.wandb_project == "proj"
    assert cfg.train.resume is None
    # Untouched values come from the file, not the defaults.
    assert cfg.model.dit.depths == (2, 1)


def test_int_is_accepted_for_float_and_stays_float():
    cfg = load_config(None, ["--optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_defaults_validate():
    assert Config().validate() == Config()


def test_extends(tmp_path):
    (tmp_path / "child.yaml").write_text(
        f"extends: {CONFIGS / 'tiny.yaml'}\noptim:\n  lr: 0.01\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.optim.lr == 0.01 and cfg.name == "tiny"


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["--optim.lrr=1"], r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\); allowed keys"),
        (["--nosuch.x=1"], r"unknown key 'nosuch'"),
        (["--optim.lr=fast"], r"optim.lr: expected float, got 'fast' \(str\)"),
        (["--data.num_views=2.5"], r"data.num_views: expected int, got 2.5 \(float\)"),
        (["--data.shuffle=1"], r"data.shuffle: expected bool, got 1 \(int\)"),
        (["--distributed.precision=fp8"],
         r"distributed.precision: expected one of 'bf16', 'fp16', 'fp32', got 'fp8'"),
        (["--model.dit.widths=[1, 2, 3]"], r"model.dit.widths: expected list of 2 items"),
        (["--data.resolutions=[[504, 'x']]"], r"data.resolutions\[0\]\[1\]: expected int"),
        (["--optim.lr=1", "--optim.lr.x=1"], r"'optim.lr' is a value, not a section"),
        (["--optim.lr.x=1"], r"optim.lr: expected float, got \{'x': 1\} \(dict\)"),
        (["lr=1"], r"expected --section.key=value"),
        (["--optim.lr"], r"has no value"),
    ],
)
def test_key_and_type_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "tiny.yaml", overrides)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["--data.max_sources=4"], r"data.max_sources: must leave at least one target view"),
        (["--data.min_sources=3"], r"data.min_sources: must be in \[1, data.max_sources=2\]"),
        (["--data.resolutions=[[50, 56]]"], r"data.resolutions\[0\]: .*multiples of the patch"),
        (["--model.dit.heads=[5, 4]"], r"model.dit.widths\[0\]: width 64 is not divisible"),
        (["--latent.boundary_level=4"], r"latent.boundary_level: must be in \[0, 3\]"),
        (["--train.stage=cascade", "--latent.boundary_level=0"],
         r"latent.boundary_level: train.stage='cascade'"),
        (["--data.source=mds"], r"data.paths: data.source='mds' needs at least one path"),
        (["--data.paths=[a]", "--data.weights=[1, 2]", "--data.source=mds"],
         r"data.weights: has 2 entries for 1 data.paths"),
        (["--distributed.zero_stage=4"], r"distributed.zero_stage: must be one of 0, 1, 2, 3"),
        (["--eval.num_sources=4"], r"eval.num_sources: must be in \[1, eval.num_views-1=3\]"),
        (["--eval.metrics=[psnr, fid]"], r"eval.metrics\[1\]: unknown metric 'fid'"),
        (["--optim.betas=[0.9, 1.0]"], r"optim.betas\[1\]: must be in \[0, 1\)"),
    ],
)
def test_impossible_combinations(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "tiny.yaml", overrides)


def test_prope_head_dim_message():
    with pytest.raises(ConfigError, match=r"PRoPE needs a head dim divisible by 8, got 60/5=12"):
        load_config(None, ["--model.dit.widths=[60, 2048]", "--model.dit.heads=[5, 16]"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text("extends: cyc.yaml\n")
    with pytest.raises(ConfigError, match="'extends' cycle"):
        load_config(cyc)


def test_parse_overrides_nested():
    assert parse_overrides(["--a.b.c=1", "--a.d", "[1, 2]", "--e=x"]) == {
        "a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x"}
