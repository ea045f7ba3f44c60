"""Checkpoints of a run folder: written by every rank, published atomically, resumed exactly,
exported as one consolidated state dict.

Layout:
    <out_dir>/checkpoints/latest                      text: the tag of the newest complete one
    <out_dir>/checkpoints/step_XXXXXXXX/              tag = step_{step:08d}
        (DeepSpeed's files: mp_rank_00_model_states.pt, *_optim_states.pt per rank, ...)
        rank_XXXXX.pt          per rank: RNG states (python, numpy, torch, cuda), data-stream
                               state (`loader.state_dict()`), skipped-step count
        ema_rankXXXXX.safetensors   EMA slices (gld/train/ema.py)
        config.yaml            the resolved run config
        meta.json              step, world_size, micro_batch, grad_accum, samples_seen,
                               zero_stage, precision, time_shift, scheduler, extra
        COMPLETE               written last, after every rank finished (barrier)

Publishing: every rank writes, barrier, rank 0 fsyncs the files, writes COMPLETE, then
replaces `latest` atomically (tmp + fsync + os.replace + fsync of the folder). A kill at any
moment leaves `latest` naming a complete checkpoint, and loading refuses a folder without
COMPLETE. Pruning (keep_last) removes the oldest complete folders, never the one `latest` names,
and leftover incomplete folders older than it.

Resume on the same world size goes through DeepSpeed's `load_checkpoint` (weights, fp32
master, Adam moments: bit-exact). On another world size DeepSpeed's per-rank ZeRO files do not
fit. With the same ZeRO stage (>= 1) rank 0 converts the checkpoint to DeepSpeed's universal
format (`deepspeed.checkpoint.ds_to_universal`, into <out_dir>/checkpoints/universal/, removed
after loading) and the engine, built with `"checkpoint": {"load_universal": true}`, loads fp32
master weights and Adam moments from it. Otherwise (another ZeRO stage, or ZeRO-0) the fp32
master weights come from `get_fp32_state_dict_from_zero_checkpoint` and the Adam moments start
again from zero. Both ways the EMA is re-sliced, and the LR schedule, step and the data position
(in global samples) are restored exactly.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

__all__ = ["CheckpointError", "step_tag", "checkpoints_root", "publish_latest", "read_latest",
           "is_complete", "list_checkpoints", "prune_checkpoints", "resolve_resume",
           "read_meta", "save_checkpoint", "load_checkpoint", "to_universal", "uses_universal", "load_weights_into_module",
           "consolidated_weights", "live_weights", "export_model", "save_safetensors_atomic", "rng_state",
           "set_rng_state"]

LATEST = "latest"
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run; names the folder."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def publish_latest(root: str | os.PathLike, tag: str) -> None:
    """Point `<root>/latest` at `tag` atomically (the folder must be complete)."""
    root = Path(root)
    if not is_complete(root / tag):
        raise CheckpointError(f"{root / tag}: not complete (no {COMPLETE}); refusing to publish")
    _write_atomic(root / LATEST, (tag + "\n").encode())


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def read_latest(root: str | os.PathLike) -> Optional[Path]:
    """The folder `latest` names, or None when there is no `latest`. Raises CheckpointError
    when it names an incomplete or missing folder (which publishing never does)."""
    root = Path(root)
    try:
        tag = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    folder = root / tag
    if not is_complete(folder):
        raise CheckpointError(f"{root / LATEST} names {tag!r}, which is not a complete "
                              f"checkpoint (no {folder / COMPLETE})")
    return folder


def _step_of(folder: Path) -> Optional[int]:
    name = folder.name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def list_checkpoints(root: str | os.PathLike, complete: bool = True) -> list[tuple[int, Path]]:
    """[(step, folder)] sorted by step; only complete ones unless complete=False."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(_step_of(p), p) for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted((s, p) for s, p in out if not complete or is_complete(p))


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` complete checkpoints (0 = keep all) and incomplete
    folders older than `latest`; never the folder `latest` names. Returns what was removed."""
    root = Path(root)
    latest = read_latest(root)
    latest_step = _step_of(latest) if latest is not None else None
    removed = []
    complete = list_checkpoints(root)
    doomed = [p for _, p in complete[:-keep_last]] if keep_last > 0 else []
    if latest_step is not None:
        doomed += [p for s, p in list_checkpoints(root, complete=False)
                   if not is_complete(p) and s < latest_step]
    for p in doomed:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def resolve_resume(resume: str, out_dir: str | os.PathLike) -> Optional[Path]:
    """train.resume -> a complete checkpoint folder or None. "auto": the run folder's latest
    (None if the run has none), "none": None, else a folder (error if not complete)."""
    if resume == "none":
        return None
    if resume == "auto":
        return read_latest(checkpoints_root(out_dir))
    folder = Path(resume)
    if (folder / LATEST).is_file():  # a checkpoints root was given
        return read_latest(folder)
    if not is_complete(folder):
        raise CheckpointError(f"train.resume={resume!r}: not a complete checkpoint folder "
                              f"(no {folder / COMPLETE})")
    return folder


def read_meta(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())


# ---- RNG ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save ----------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(te, out_dir: str | os.PathLike, step: int, *, loader=None, ema=None,
                    run_config: Optional[dict] = None, scheduler_state: Optional[dict] = None,
                    samples_seen: int = 0, skipped_steps: int = 0,
                    time_shift: Optional[float] = None, extra: Optional[dict] = None,
                    before_publish=None, keep_last: int = 0) -> Path:
    """Write checkpoint `step` of the TrainEngine `te` on every rank (a collective) and publish
    it. `before_publish(folder)` runs on every rank after all files are written and before
    COMPLETE / `latest` (a test hook: a kill there must leave the previous one published)."""
    root = checkpoints_root(out_dir)
    tag = step_tag(step)
    folder = root / tag
    if te.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # an incomplete leftover of a killed run, or a re-save of this step
            shutil.rmtree(folder)
    _barrier()
    te.engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    folder.mkdir(parents=True, exist_ok=True)
    rank_state = {"rng": rng_state(), "data": loader.state_dict() if loader is not None else None,
                  "skipped_steps": skipped_steps}
    tmp = folder / f"rank_{te.rank:05d}.pt.tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, folder / f"rank_{te.rank:05d}.pt")
    if ema is not None:
        ema.save(folder)
    if te.rank == 0:
        meta = {"step": step, "world_size": te.world_size,
                "micro_batch": te.config["train_micro_batch_size_per_gpu"],
                "grad_accum": te.config["gradient_accumulation_steps"],
                "global_batch": te.config["train_batch_size"], "samples_seen": samples_seen,
                "zero_stage": te.config["zero_optimization"]["stage"],
                "precision": "bf16" if te.config["bf16"]["enabled"] else "fp32",
                "time_shift": time_shift, "scheduler": scheduler_state,
                "ema": ema is not None, "extra": extra or {}}
        _write_atomic(folder / "meta.json", json.dumps(meta, indent=1, default=str).encode())
        _write_atomic(folder / "config.yaml",
                      yaml.safe_dump(run_config or {}, sort_keys=False).encode())
    _barrier()
    if before_publish is not None:
        before_publish(folder)
    if te.rank == 0:
        for p in folder.rglob("*"):  # DeepSpeed does not fsync; COMPLETE must mean on disk
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _write_atomic(folder / COMPLETE, b"")
        publish_latest(root, tag)
        prune_checkpoints(root, keep_last)
    _barrier()
    return folder


# ---- load ----------------------------------------------------------------------------------------
def consolidated_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 weights {name: tensor} (the model's own names) of a checkpoint folder: the
    fp32 master of ZeRO 1-3 through DeepSpeed's zero_to_fp32, else the saved module."""
    folder = Path(folder)
    if any(folder.glob("*optim_states.pt")) and read_meta(folder)["zero_stage"] >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        return {k: v.float() for k, v in sd.items()}
    model_files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{folder}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
    sd = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def load_weights_into_module(module: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Before `deepspeed.initialize`: the plain module takes the checkpoint's fp32 weights
    (the resume-on-another-world-size path)."""
    sd = consolidated_weights(folder)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k in dict(module.named_parameters())]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")


def _set_master_weights(te, folder: Path) -> None:
    """After `deepspeed.initialize`: the fp32 master partitions take the saved fp32 weights
    exactly (the module's bf16 copy was already rounded from the same values)."""
    from deepspeed.utils import safe_set_full_fp32_param

    sd = consolidated_weights(folder)
    for name, p in te.engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_tensor") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, sd[name].to(te.device))
        else:  # no fp32 master apart from the parameter (ZeRO-0 fp32)
            with torch.no_grad():
                p.copy_(sd[name].to(p.device, p.dtype))


def to_universal(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a ZeRO 1-3 checkpoint folder into DeepSpeed's universal format at `out` (per
    parameter fp32 weights and Adam moments, any world size can load it). One process."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    ds_to_universal(argparse.Namespace(
        input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    return out


def uses_universal(folder: str | os.PathLike, world_size: int, zero_stage: int) -> bool:
    """Whether resuming `folder` on `world_size` ranks with `zero_stage` goes through a
    universal checkpoint: another world size, the same ZeRO stage >= 1 (DeepSpeed's universal
    model-state files differ between ZeRO-3 and 1-2). The engine must be built with
    load_universal=True then."""
    meta = read_meta(folder)
    return (meta["world_size"] != world_size and meta["zero_stage"] >= 1
            and meta["zero_stage"] == zero_stage)


def load_checkpoint(te, folder: str | os.PathLike, *, loader=None, ema=None,
                    scheduler=None, universal_dir: Optional[str | os.PathLike] = None) -> dict:
    """Restore the run from a complete checkpoint folder into TrainEngine `te` (every rank).
    On the saved world size: DeepSpeed's state, RNG and data state per rank, exactly. On another
    one (the weights must already be in the module: `load_weights_into_module` before the
    engine was built): with `universal_dir` (a scratch folder; the engine built with
    load_universal=True when `uses_universal`) rank 0 converts the checkpoint to DeepSpeed's
    universal format there and every rank loads fp32 weights and Adam moments from it; without
    it only the fp32 weights are set and the Adam moments restart. Either way EMA, schedule and
    step are restored and the data continues at the same number of global samples.
    Returns meta.json's dict plus "same_world" and "optimizer_restored" (bools)."""
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {COMPLETE})")
    meta = read_meta(folder)
    same_world = meta["world_size"] == te.world_size
    engine = te.engine
    optimizer_restored = True
    if same_world:
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                         load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed could not load it")
    elif universal_dir is not None and uses_universal(folder, te.world_size,
                                                      te.config["zero_optimization"]["stage"]):
        target = Path(universal_dir) / folder.name
        if te.rank == 0:
            to_universal(folder, target)
        _barrier()
        # DeepSpeed's universal loader (ZeRO-3, 0.19.8) copies group 0's hyperparameters onto
        # every group, which would put weight decay on the no-decay group: keep the groups' own
        # (they come from the config; the lr is set from the schedule below).
        hyper = [{k: v for k, v in g.items() if k not in ("params", "lr")}
                 for g in te.optimizer.param_groups]
        path, _ = engine.load_checkpoint(str(target.parent), tag=target.name,
                                         load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed could not load its universal form "
                                  f"{target}")
        for group, own in zip(te.optimizer.param_groups, hyper):
            group.update(own)
        # ...and it gives every group's Adam state the same `step` tensor, which torch's AdamW
        # increments in place once per group: each group needs its own.
        for state in te.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        _barrier()
        if te.rank == 0:
            shutil.rmtree(target, ignore_errors=True)
    else:
        _set_master_weights(te, folder)
        optimizer_restored = False
    if not same_world:
        engine.global_steps = meta["step"]
        engine.global_samples = meta["samples_seen"]
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(te.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    rank_file = folder / f"rank_{te.rank:05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    if rank_state is not None and same_world:
        set_rng_state(rank_state["rng"])
    if loader is not None:
        if same_world and rank_state is not None and rank_state["data"] is not None:
            loader.load_state_dict(rank_state["data"])
        else:
            _seek_global_samples(loader, folder, meta, te)
    if ema is not None:
        if not meta.get("ema"):
            raise CheckpointError(f"{folder}: has no EMA but train.ema_decay > 0")
        ema.load(folder)
    meta["same_world"] = same_world
    meta["optimizer_restored"] = optimizer_restored
    meta["skipped_steps"] = rank_state["skipped_steps"] if rank_state else 0
    return meta


def _seek_global_samples(loader, folder: Path, meta: dict, te) -> None:
    """Continue the data stream at the same number of global samples on another world size
    (epoch from rank 0's saved state; batches per rank rescaled)."""
    saved = torch.load(folder / "rank_00000.pt", weights_only=False)["data"]
    per_step_then = meta["micro_batch"] * meta["world_size"]
    per_step_now = te.config["train_micro_batch_size_per_gpu"] * te.world_size
    samples = saved["step"] * per_step_then
    if samples % per_step_now:
        raise CheckpointError(
            f"{folder}: {samples} samples of epoch {saved['epoch']} consumed with "
            f"{meta['micro_batch']} x {meta['world_size']} ranks per batch; cannot continue with "
            f"{per_step_now} per batch (data.batch_size x ranks must divide it)")
    loader.epoch, loader.step = int(saved["epoch"]), samples // per_step_now


# ---- export -------------------------------------------------------------------------------------
def live_weights(te) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the live engine on rank 0 ({} elsewhere); a collective under
    ZeRO-3 (every rank calls it). The fp32 master where DeepSpeed keeps one."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in te.engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            full = p.data
        if te.rank == 0:
            out[name] = full.detach().float().cpu().clone()
    return out


def export_model(source, which: str = "ema", ema=None) -> dict[str, torch.Tensor]:
    """Consolidated full fp32 state dict (the model's own key names).

    source: a checkpoint folder, a run folder or checkpoints root (its latest), or a live
    TrainEngine (then every rank must call it, rank 0 gets the dict, and which="ema" needs
    the EMA object `ema`). which="raw": the trained (fp32 master) weights; "ema": the EMA
    weights over the raw ones (parameters without EMA, e.g. frozen, keep their raw values)."""
    if which not in ("ema", "raw"):
        raise ValueError(f"which must be 'ema' or 'raw', got {which!r}")
    if hasattr(source, "engine"):
        state = live_weights(source)
        if which == "ema":
            if ema is None:
                raise ValueError("export_model(engine, 'ema') needs the EMA (ema=...)")
            state.update(ema.consolidated_state_dict())
        return state
    folder = Path(source)
    if not is_complete(folder):
        for root in (folder, checkpoints_root(folder)):
            if (root / LATEST).is_file():
                folder = read_latest(root)
                break
        else:
            raise CheckpointError(f"{source}: neither a complete checkpoint folder nor a run "
                                  f"folder with {LATEST}")
    state = consolidated_weights(folder)
    if which == "ema":
        from gld.train.ema import consolidate_ema_files

        if not read_meta(folder).get("ema"):
            raise CheckpointError(f"{folder}: was trained without EMA (train.ema_decay = 0)")
        state.update(consolidate_ema_files(folder))
    return state


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Optional[dict[str, str]] = None) -> Path:
    """Write `state` as safetensors at `path` via a temporary file and os.replace."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
              metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
