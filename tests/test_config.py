"""Config tree: round trip, overrides, and each kind of error with its message."""
from pathlib import Path

import pytest
import yaml

from gld.config import Config, ConfigError, load_config, parse_overrides, save_config
from gld.data.config import DataConfig

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
    assert cfg.data.resolutions == [(504, 504), (336, 504), (280, 504)]
    assert cfg.data.batch_size * 8 == 48  # the paper's global batch on 8 GPUs
    assert (cfg.data.eval.num_views, cfg.data.eval.num_sources) == (8, 4)
    assert cfg.data.eval.resolution == (280, 504)
    assert cfg.diffusion.sampler.cfg_scale == 1.5 and cfg.diffusion.sampler.steps == 50
    assert cfg.diffusion.sampler.method == "euler" and cfg.diffusion.time_dist == "uniform"


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "tiny.yaml", ["--diffusion.logit_std=0.5", "--data.num_views", "3",
                                              "--data.resolutions=[[28, 42]]",
                                              "--data.s3_endpoint=http://127.0.0.1:9",
                                              "--data.eval.resolution=null"])
    assert cfg.diffusion.logit_std == 0.5 and isinstance(cfg.diffusion.logit_std, float)
    assert cfg.data.num_views == 3
    assert cfg.data.resolutions == [(28, 42)]
    assert cfg.data.s3_endpoint == "http://127.0.0.1:9"
    assert cfg.data.eval.resolution is None
    # Untouched values come from the file, not the defaults.
    raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    assert cfg.data.view_window == raw["data"]["view_window"] != DataConfig().view_window
    assert cfg.diffusion.sampler.steps == raw["diffusion"]["sampler"]["steps"] != 50


def test_int_is_accepted_for_float_and_stays_float():
    cfg = load_config(None, ["--diffusion.logit_std=1"])
    assert cfg.diffusion.logit_std == 1.0 and isinstance(cfg.diffusion.logit_std, float)


def test_defaults_validate():
    assert Config().validate() == Config()


def test_extends(tmp_path):
    (tmp_path / "child.yaml").write_text(
        f"extends: {CONFIGS / 'tiny.yaml'}\ndata:\n  seed: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.data.seed == 3 and cfg.data.num_views == 4 and cfg.name == "tiny"


def test_only_sections_with_code():
    """The tree holds the sections whose code exists; the others arrive with their code."""
    assert list(Config().to_dict()) == ["name", "data", "diffusion", "latent", "model", "loss",
                                        "train", "job"]
    with pytest.raises(ConfigError, match=r"unknown key 'optim'; allowed keys here: name, data, "
                                          r"diffusion, latent, model, loss, train, job"):
        load_config(None, ["--optim.lr=1e-4"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["--data.seeed=1"],
         r"unknown key 'data.seeed' \(did you mean 'data.seed'\?\); allowed keys"),
        (["--nosuch.x=1"], r"unknown key 'nosuch'"),
        (["--diffusion.logit_std=fast"],
         r"diffusion.logit_std: expected float, got 'fast' \(str\)"),
        (["--data.num_views=2.5"], r"data.num_views: expected int, got 2.5 \(float\)"),
        (["--data.shuffle=1"], r"data.shuffle: expected bool, got 1 \(int\)"),
        (["--data.source=tar"],
         r"data.source: expected one of 'synthetic', 'mds', 'wds', got 'tar'"),
        (["--data.eval.resolution=[1, 2, 3]"],
         r"data.eval.resolution: expected list of 2 items"),
        (["--data.resolutions=[[504, 'x']]"], r"data.resolutions\[0\]\[1\]: expected int"),
        (["--data.seed=1", "--data.seed.x=1"], r"'data.seed' is a value, not a section"),
        (["--data.seed.x=1"], r"data.seed: expected int, got \{'x': 1\} \(dict\)"),
        (["seed=1"], r"expected --section.key=value"),
        (["--data.seed"], r"has no value"),
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
        (["--data.resolutions=[[50, 56]]"],
         r"data.resolutions\[0\]: H and W must be positive multiples of the patch size 14, "
         r"got \(50, 56\)"),
        (["--data.eval.resolution=[56, 60]"], r"data.eval.resolution: .*patch size 14"),
        (["--data.source=mds"], r"data.paths: data.source='mds' needs at least one path"),
        (["--data.paths=[a]", "--data.weights=[1, 2]", "--data.source=mds"],
         r"data.weights: has 2 entries for 1 data.paths"),
        (["--data.eval.num_sources=4"],
         r"data.eval.num_sources: must be in \[1, data.eval.num_views-1=3\]"),
        (["--data.view_window=8", "--data.eval.num_views=9"],
         r"data.eval.num_views: must be in \[2, data.view_window=8\]"),
        (["--data.eval.paths=['s3://ab/x']"],
         r"data.eval.paths\[0\]: S3 bucket names need at least 3 characters"),
        (["--diffusion.sampler.cfg_interval=[0.8, 0.2]"], r"diffusion.sampler.cfg_interval"),
    ],
)
def test_impossible_combinations(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "tiny.yaml", overrides)


def test_patch_size_comes_from_the_encoder():
    """The data section knows no patch size: the composed tree checks resolutions against
    the DA3 encoder's (one definition), a section alone against what it is given."""
    from gld.data.config import DataConfig
    from gld.encoders.da3.config import PATCH_SIZE

    cfg = DataConfig(resolutions=[(50, 56)])
    cfg.validate()
    with pytest.raises(ConfigError, match=f"multiples of the patch size {PATCH_SIZE}"):
        cfg.validate(patch_size=PATCH_SIZE)
    load_config(None, [f"--data.resolutions=[[{2 * PATCH_SIZE}, {3 * PATCH_SIZE}]]"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
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
