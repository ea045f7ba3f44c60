"""What launch/train.py runs: one training stage, or the main job (all of `job.stages`).

    run_stage(cfg)     the stage `cfg.train.stage` in <train.out_dir>/<stage>/ (resumes per
                       train.resume); returns that folder
    export(cfg, out)   the model folder (gld/checkpoints/model_folder.py) from the stages'
                       latest checkpoints under the job folder
    run_job(cfg)       the main job in `cfg.train.out_dir`:
                         1. synthetic shards (job.prepare) -> data.paths / data.eval.paths
                         2. latent statistics (job.stats_batches) -> latent.stats; with
                            job.latent_cache.epochs > 0 the diffusion stage's latent cache
                            (<out_dir>/latent_cache) -> its train.latent_cache
                         3. each stage of job.stages in order, in <out_dir>/<stage>/, with its
                            train.* overrides, streamed from the shards by the data loader
                         4. export -> <out_dir>/model
                         5. novel views of held-out view sets, metrics and the report
                            (<out_dir>/report/: metrics.json, grid.png, summary.md)
Every step is skipped when its result is already there (a re-run resumes the job); ranks > 0
wait at barriers while rank 0 prepares, computes statistics, exports and evaluates.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["build_trainer", "run_stage", "run_job", "export", "stage_config"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def stage_config(cfg, stage: str):
    """`cfg` with train.stage = stage and its job.stages overrides (out_dir: the job's)."""
    from gld.configtypes import from_dict
    from gld.train.config import TrainConfig

    tree = {**copy.deepcopy(cfg.train.__dict__), **cfg.job.stages.get(stage, {}),
            "stage": stage, "out_dir": cfg.train.out_dir}
    tree["wandb"] = cfg.train.wandb.__dict__
    train = from_dict(TrainConfig, tree, prefix="train.")
    train.validate()
    return replace(cfg, train=train)


def _decoder_for_grids(cfg) -> Optional[torch.nn.Module]:
    """The job's trained decoder (its latest checkpoint), for the diffusion stage's grids."""
    from gld.checkpoints.loading import load_into
    from gld.models import RGBDecoder
    from gld.train.checkpoint import export_model, read_latest, checkpoints_root

    root = Path(cfg.train.out_dir) / "decoder"
    if read_latest(checkpoints_root(root)) is None:
        return None
    dec = RGBDecoder(cfg.model.decoder_config(cfg.level_channels))
    load_into(dec, _with_buffers(export_model(root, "raw"), dec), where=root)
    return dec.eval().requires_grad_(False)


def _with_buffers(state: dict, module: torch.nn.Module) -> dict:
    """Fill persistent buffers a consolidated export may lack (fixed tables, saved in the
    module's own state) from the module built with the same seed."""
    own = module.state_dict()
    return {**{k: v for k, v in own.items() if k not in state}, **state}


def build_trainer(cfg, progress: bool = True, callbacks=(), decoder=None):
    """The stage, its loader (the latent cache when train.latent_cache names one) and the
    Trainer for `cfg.train.stage`, writing into <train.out_dir>/<stage>/ (the resolved config
    written to <train.out_dir>/config.yaml). decoder: for the diffusion stage's grids
    (default: the decoder stage's latest checkpoint beside it, if any)."""
    from gld.config import save_config
    from gld.data.streaming import build_loader
    from gld.train.engine import setup_distributed
    from gld.train.stages import build_stage
    from gld.train.trainer import Trainer, seed_everything

    _, _, device = setup_distributed()
    job_dir = Path(cfg.train.out_dir)
    if _rank() == 0:
        save_config(cfg, job_dir / "config.yaml")
    seed_everything(cfg.train.seed)                # the same initial weights on every rank
    kwargs = {}
    if cfg.train.stage == "diffusion":
        kwargs["decoder"] = decoder if decoder is not None else _decoder_for_grids(cfg)
    stage = build_stage(cfg, device, **kwargs)
    if cfg.train.latent_cache and cfg.train.stage == "diffusion":
        from gld.train.latent_cache import build_cache_loader  # meta checked against cfg

        loader = build_cache_loader(cfg, cfg.train.latent_cache, stats=stage.space.stats)
    else:
        loader = build_loader(cfg.data, "train")
    train = replace(cfg.train, out_dir=str(job_dir / cfg.train.stage))
    return Trainer(stage, train, loader, cfg.to_dict(), callbacks=callbacks,
                   time_shift=getattr(stage, "time_shift", None), progress=progress)


def run_stage(cfg, progress: bool = True, callbacks=(), decoder=None) -> Path:
    """Train `cfg.train.stage` (build_trainer) in <train.out_dir>/<stage>/; returns that
    folder."""
    build_trainer(cfg, progress, callbacks, decoder).train()
    return Path(cfg.train.out_dir) / cfg.train.stage


def export(cfg, job_dir: Path, out: Path, weights: str = "ema") -> Path:
    """Model folder at `out` from the latest checkpoints of <job_dir>/{decoder,diffusion}.
    weights "ema" falls back to the raw weights of a stage trained without EMA."""
    from gld.checkpoints.loading import load_into
    from gld.checkpoints.model_folder import write_model_folder
    from gld.latents.stats import load_stats
    from gld.encoders.da3 import resolve_variant
    from gld.models import DiTDH, RGBDecoder
    from gld.train.checkpoint import export_model, read_latest, read_meta, checkpoints_root

    parts, time_shift, step = {}, None, {}
    for name, cls, conf in (("decoder", RGBDecoder, cfg.model.decoder_config),
                            ("dit", DiTDH, cfg.model.dit_config)):
        root = job_dir / ("decoder" if name == "decoder" else "diffusion")
        latest = read_latest(checkpoints_root(root))
        if latest is None:
            continue
        meta = read_meta(latest)
        which = weights if meta.get("ema") else "raw"
        module = cls(conf(cfg.level_channels))
        load_into(module, _with_buffers(export_model(latest, which), module), where=latest)
        parts[name] = module
        step[name] = meta["step"]
        if name == "dit":
            time_shift = meta.get("time_shift")
    if not parts:
        raise FileNotFoundError(f"{job_dir}: no stage checkpoints under decoder/ or diffusion/")
    stats = (load_stats(cfg.latent.stats, resolve_variant(cfg.latent.encoder))
             if cfg.latent.normalize else None)
    dit, dec = parts.get("dit"), parts.get("decoder")
    return write_model_folder(out, cfg, dit_state=None if dit is None else dit.state_dict(),
                              dit_config=None if dit is None else dit.cfg,
                              decoder_state=None if dec is None else dec.state_dict(),
                              decoder_config=None if dec is None else dec.cfg, stats=stats,
                              time_shift=time_shift, weights=weights, step=step.get("dit"),
                              extra={"steps": step})


def _prepare(cfg, job_dir: Path):
    """Write the synthetic shards once; point data at them."""
    from gld.data.formats import convert

    paths = {}
    for split, spec in (("train", cfg.job.prepare.train), ("eval", cfg.job.prepare.eval)):
        if spec is None:
            continue
        out = job_dir / "shards" / split
        if _rank() == 0 and not (out / "gld_meta.json").is_file():
            convert("synthetic", spec, str(out), cfg.job.prepare.writer, overwrite=True)
        paths[split] = str(out)
    _barrier()
    data = cfg.data
    source = "mds" if cfg.job.prepare.writer == "mds" else "wds"
    if "train" in paths:
        data = replace(data, source=source, paths=[paths["train"]], weights=[])
    if "eval" in paths:
        data = replace(data, eval=replace(data.eval, paths=[paths["eval"]]))
    return replace(cfg, data=data)


def _stats(cfg, job_dir: Path):
    """Latent statistics of the boundary level over job.stats_batches training batches."""
    from gld.data.streaming import build_loader
    from gld.latents import build_latent_space, save_stats
    from gld.latents.collect import collect_stats

    if cfg.job.stats_batches == 0:
        return cfg
    path = job_dir / "latent_stats.safetensors"
    if _rank() == 0 and not path.is_file():
        space = build_latent_space(replace(cfg.latent, normalize=False, stats=[]),
                                   "cuda" if torch.cuda.is_available() else "cpu")
        loader = build_loader(cfg.data, "train", rank=0, world_size=1)
        stats = collect_stats(space, loader, cfg.job.stats_batches,
                              [cfg.latent.boundary_level], 1, {"job": str(job_dir)})
        save_stats(stats, path)
    _barrier()
    return replace(cfg, latent=replace(cfg.latent, stats=[str(path)], normalize=True))


def _latent_cache(cfg, job_dir: Path, progress: bool = True):
    """Write the diffusion stage's latent cache once (job.latent_cache.epochs epochs of the
    training loader, encoded as the stage does) and point that stage at it; a stage override
    train.latent_cache is kept as it is."""
    from gld.train.latent_cache import META_FILE, write_latent_cache

    spec = cfg.job.latent_cache
    overrides = cfg.job.stages.get("diffusion")
    if spec.epochs == 0 or overrides is None or overrides.get("latent_cache"):
        return cfg
    path = job_dir / "latent_cache"
    if _rank() == 0 and not (path / META_FILE).is_file():
        write_latent_cache(stage_config(cfg, "diffusion"), str(path), spec.epochs,
                           dtype=spec.dtype, overwrite=True, progress=progress)
    _barrier()
    stages = {**cfg.job.stages, "diffusion": {**overrides, "latent_cache": str(path)}}
    return replace(cfg, job=replace(cfg.job, stages=stages))


def run_job(cfg, progress: bool = True) -> dict:
    """The main job (module doc); returns the report's metrics on rank 0 ({} elsewhere)."""
    from gld.data.streaming import build_loader
    from gld.eval.nvs import evaluate_nvs
    from gld.eval.report import write_report
    from gld.pipeline import NVSPipeline
    from gld.train.engine import setup_distributed

    setup_distributed()
    job_dir = Path(cfg.train.out_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    t_start, times = time.perf_counter(), {}
    cfg = _prepare(cfg, job_dir)
    times["prepare_s"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    cfg = _stats(cfg, job_dir)
    times["stats_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cfg = _latent_cache(cfg, job_dir, progress)
    if cfg.job.latent_cache.epochs:
        times["latent_cache_s"] = time.perf_counter() - t0
    stages = {}
    for name in cfg.job.stages:
        t0 = time.perf_counter()
        scfg = stage_config(cfg, name)
        run_stage(scfg, progress=progress)
        stages[name] = {"steps": scfg.train.steps, "time_s": round(time.perf_counter() - t0, 1)}
    _barrier()
    if _rank() != 0:
        return {}
    model_dir = export(cfg, job_dir, job_dir / "model")
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = NVSPipeline.from_folder(model_dir, device)
    loader = build_loader(cfg.data, "eval", rank=0, world_size=1)
    metrics, grid = evaluate_nvs(pipe, loader, cfg.job.eval.batches,
                                 lpips_net=cfg.job.eval.lpips_net,
                                 depth_align=cfg.job.eval.depth_align)
    times["evaluate_s"] = time.perf_counter() - t0
    gen = metrics["generated"]["psnr"]
    notes = [f"generated target views: PSNR {gen:.2f} dB"]
    for key, what in (("scene_mean", "the scene's mean image (all frames of the sequence)"),
                      ("mean_image", "the view set's mean image (its views, targets included)"),
                      ("nearest_source", "the nearest source view copied"),
                      ("reconstruction", "the decoder's ceiling (the targets' own latents)")):
        if metrics.get(key):
            base = metrics[key]["psnr"]
            verdict = "" if key == "reconstruction" else \
                f" ({'better' if gen > base else 'NOT better'} by {gen - base:+.2f} dB)"
            notes.append(f"{what}: {base:.2f} dB{verdict}")
    summary = {"name": cfg.name, "config": str(job_dir / "config.yaml"),
               "wall_time_s": round(time.perf_counter() - t_start, 1),
               "stages": stages, "model": str(model_dir),
               "notes": [*notes, f"{metrics['targets']} target views of {metrics['view_sets']} "
                         "held-out view sets", *[f"{k}: {v:.1f} s" for k, v in times.items()]]}
    paths = write_report(job_dir, metrics, grid, summary)
    print(json.dumps({"report": paths, "psnr_generated": gen,
                      **{f"psnr_{k}": metrics[k]["psnr"] for k in ("scene_mean", "mean_image")
                         if metrics.get(k)}}))
    return metrics
