"""The main job end to end (launch/train.py on configs/tiny.yaml with few steps): shards,
statistics, the diffusion stage's latent cache, both stages, export, held-out evaluation and
report; then launch/export.py and
launch/sample.py on what it wrote. The quality of the full-length job is recorded in the
README; here the plumbing and the report's contents are checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=900):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "tiny"
    r = run("launch/train.py", "--config", "configs/tiny.yaml", f"--train.out_dir={out}",
            "--job.stages.decoder.steps=4", "--job.stages.diffusion.steps=4",
            "--job.stages.decoder.warmup_steps=0", "--job.stages.diffusion.warmup_steps=0",
            "--job.prepare.train=scenes=4,frames=12,size=56x56,seed=0",
            "--job.stats_batches=2", "--job.eval.batches=1", "--diffusion.sampler.steps=3",
            "--job.latent_cache.epochs=2", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_job_writes_report_checkpoints_and_model(job):
    metrics = json.loads((job / "report" / "metrics.json").read_text())
    for name in ("generated", "scene_mean", "mean_image", "nearest_source", "reconstruction"):
        assert 0 < metrics[name]["psnr"] < 100 and -1 <= metrics[name]["ssim"] <= 1
    assert metrics["targets"] == 2 * metrics["view_sets"] > 0
    assert set(metrics["depth_generated"]) >= {"abs_rel", "delta1"}
    if metrics["generated"]["lpips"] is None:
        assert "LPIPS backbone" in metrics["unavailable"]["generated.lpips"]
    md = (job / "report" / "summary.md").read_text()
    assert "the scene's mean image" in md and "the view set's mean image" in md
    assert "| decoder | 4 |" in md
    assert (job / "report" / "grid.png").is_file()
    for stage in ("decoder", "diffusion"):
        latest = (job / stage / "checkpoints" / "latest").read_text().strip()
        assert (job / stage / "checkpoints" / latest / "COMPLETE").is_file()
        rows = [json.loads(x) for x in (job / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 4 and rows[-1]["grad_norm"] > 0
    model = json.loads((job / "model" / "model.json").read_text())
    assert model["weights"] == "ema" and model["time_shift"] > 1
    assert set(model["files"]) == {"dit.safetensors", "decoder.safetensors",
                                   "latent_stats.safetensors"}


def test_diffusion_stage_trains_from_the_jobs_latent_cache(job):
    # 4 scenes, batch 4: one record per scene and epoch, one step per epoch; the 4 steps
    # repeat the 2 cached epochs
    meta = json.loads((job / "latent_cache" / "latent_cache.json").read_text())
    assert meta["epochs"] == 2 and meta["epoch_records"] == [4, 4]
    assert meta["normalize"] and meta["stats_files"] == [str(job / "latent_stats.safetensors")]
    import yaml
    cfg = yaml.safe_load((job / "config.yaml").read_text())   # the last stage's config
    assert cfg["train"]["stage"] == "diffusion"
    assert cfg["train"]["latent_cache"] == str(job / "latent_cache")
    rows = [json.loads(x) for x in (job / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["encode_ms"] == 0 for r in rows)   # no encoding while training
    rows = [json.loads(x) for x in (job / "decoder" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["encode_ms"] > 0 for r in rows)             # the decoder stage: on the fly
    assert "latent_cache_s" in (job / "report" / "summary.md").read_text()


def test_export_and_sample_from_the_job(job, tmp_path):
    r = run("launch/export.py", "--run", job, "--out", tmp_path / "raw", "--weights", "raw")
    assert r.returncode == 0, r.stderr[-2000:]
    from gld.checkpoints.model_folder import read_model_folder
    from gld.train.checkpoint import export_model
    raw = read_model_folder(tmp_path / "raw")
    live = export_model(job / "diffusion", "raw")
    for k, v in live.items():
        assert raw.dit_state[k].equal(v.to(raw.dit_state[k].dtype)), k
    scene = tmp_path / "scene"
    from tests.data_fixtures import world_sequences, write_npz_folder
    write_npz_folder(world_sequences(n_scenes=1, n_frames=3, size=(56, 56)), scene)
    scene = next(scene.iterdir())
    r = run("launch/sample.py", "--model", job / "model", "--scene", scene, "--sources",
            "frame_0,frame_2", "--targets", "frame_1", "--out", tmp_path / "s", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s" / "generated" / "frame_1.png").is_file()


def test_bad_config_names_the_key(tmp_path):
    r = run("launch/train.py", "--config", "configs/tiny.yaml", "--train.zero_stage=5",
            f"--train.out_dir={tmp_path}")
    assert r.returncode != 0 and "train.zero_stage" in r.stderr
    r = run("launch/train.py", "--config", "configs/tiny.yaml", "--job.latent_cache.epochs=-1",
            f"--train.out_dir={tmp_path}")
    assert r.returncode != 0 and "job.latent_cache.epochs" in r.stderr
