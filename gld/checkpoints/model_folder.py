"""Our model folder: what the trainer's export writes and the pipeline and evaluation read.

    <folder>/
      model.json               format "gld-model", version 1; what the folder holds (below)
      config.yaml              the resolved run config (gld.config.save_config)
      dit.safetensors          DiT-DH weights (optional: a decoder-only export lacks it)
      decoder.safetensors      RGB decoder weights (optional: a diffusion-only export lacks it)
      latent_stats.safetensors the boundary level's statistics (when the latent is normalised)

model.json holds: `dit` / `decoder` (the full DiTConfig / DecoderConfig field values, so the
networks are rebuilt without presets), `time_shift` (the number the DiT was trained with and
samples with), `convention` (the DiT's camera convention, gld/models/cameras.py),
`boundary_level`, `encoder` (the DA3 variant), `weights` ("ema" or "raw": which copy was
exported), `step`, and `files` (name -> sha256 of every weight file, checked on read, so a
truncated or swapped file is an error naming it). Weight keys are the modules' own names, the
release's (gld/checkpoints/gld_release.py), so a folder's DiT loads into a release-built DiT
and back. The frozen DA3 weights are not copied: `config.yaml`'s latent section names them.

Writing is atomic for the folder as a whole: everything goes into a temporary sibling folder,
model.json last, which then replaces the target by rename; a crash leaves the previous folder
(or none), never a partial one that reads as valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import Tensor

from gld.checkpoints.loading import CheckpointError, PathLike, read_state_dict
from gld.configtypes import ConfigError, from_dict, to_dict
from gld.latents.stats import LatentStats, save_stats
from gld.models import DecoderConfig, DiTConfig

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "ModelFolder", "write_model_folder",
           "read_model_folder", "is_model_folder"]

MODEL_FORMAT, MODEL_VERSION = "gld-model", 1
_WEIGHTS = {"dit": "dit.safetensors", "decoder": "decoder.safetensors"}


@dataclass
class ModelFolder:
    """A model folder as read: configs rebuilt, weights on the CPU (None where absent)."""

    path: Path
    config: Any                       # gld.config.Config
    dit_config: Optional[DiTConfig]
    decoder_config: Optional[DecoderConfig]
    dit_state: Optional[dict[str, Tensor]]
    decoder_state: Optional[dict[str, Tensor]]
    stats_path: Optional[Path]
    time_shift: Optional[float]
    convention: Optional[str]
    meta: dict


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def is_model_folder(path: PathLike) -> bool:
    return (Path(path) / "model.json").is_file()


def write_model_folder(folder: PathLike, config, *, dit_state: Optional[Mapping[str, Tensor]] = None,
                       dit_config: Optional[DiTConfig] = None,
                       decoder_state: Optional[Mapping[str, Tensor]] = None,
                       decoder_config: Optional[DecoderConfig] = None,
                       stats: Optional[LatentStats] = None, time_shift: Optional[float] = None,
                       weights: str = "ema", step: Optional[int] = None,
                       extra: Optional[dict] = None) -> Path:
    """Write a model folder atomically (see the module doc); returns its path.

    config: the resolved `gld.config.Config`. A DiT needs its config and `time_shift`; a
    decoder its config. Tensors are written contiguous on the CPU; shared storage is copied.
    """
    from safetensors.torch import save

    from gld.config import save_config

    folder = Path(folder)
    if dit_state is None and decoder_state is None:
        raise ValueError("write_model_folder: nothing to write (no DiT and no decoder weights)")
    if dit_state is not None and (dit_config is None or time_shift is None):
        raise ValueError("write_model_folder: a DiT needs dit_config and time_shift")
    if decoder_state is not None and decoder_config is None:
        raise ValueError("write_model_folder: a decoder needs decoder_config")
    if weights not in ("ema", "raw"):
        raise ValueError(f"write_model_folder: weights must be 'ema' or 'raw', got {weights!r}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        files = {}
        for name, state in (("dit", dit_state), ("decoder", decoder_state)):
            if state is None:
                continue
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
            _write_bytes(tmp / _WEIGHTS[name], save(tensors, metadata={"format": MODEL_FORMAT}))
            files[_WEIGHTS[name]] = _sha256(tmp / _WEIGHTS[name])
        if stats is not None:
            save_stats(stats, tmp / "latent_stats.safetensors")
            files["latent_stats.safetensors"] = _sha256(tmp / "latent_stats.safetensors")
        save_config(config, tmp / "config.yaml")
        meta = dict(format=MODEL_FORMAT, version=MODEL_VERSION, weights=weights, step=step,
                    encoder=config.latent.encoder, boundary_level=config.latent.boundary_level,
                    time_shift=None if time_shift is None else float(time_shift),
                    convention=None if dit_config is None else dit_config.convention,
                    dit=None if dit_config is None else to_dict(dit_config),
                    decoder=None if decoder_config is None else to_dict(decoder_config),
                    files=files, extra=extra or {})
        _write_bytes(tmp / "model.json", json.dumps(meta, indent=1).encode())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _build(cls, data, path: Path, key: str):
    if data is None:
        return None
    try:
        return from_dict(cls, data, prefix=f"{key}.")
    except ConfigError as e:
        raise CheckpointError(path / "model.json", f"bad {key} config: {e}") from None


def read_model_folder(folder: PathLike, load_weights: bool = True) -> ModelFolder:
    """Read and check a model folder. Errors (`CheckpointError`, FileNotFoundError) name the
    file: a missing model.json, another format or a newer version, a weight file missing or
    whose checksum differs from model.json's."""
    from gld.config import load_config

    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no model.json); write one with "
                                "launch/export.py")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(meta_path, f"not valid JSON ({e})") from None
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(meta_path, f"format {meta.get('format')!r}, expected "
                              f"{MODEL_FORMAT!r}")
    if not isinstance(meta.get("version"), int) or meta["version"] > MODEL_VERSION:
        raise CheckpointError(meta_path, f"version {meta.get('version')!r}; this code reads "
                              f"versions up to {MODEL_VERSION}")
    for name, digest in meta.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(p, "listed in model.json but missing")
        if load_weights and _sha256(p) != digest:
            raise CheckpointError(p, "checksum differs from model.json (truncated or replaced)")
    try:
        config = load_config(folder / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(folder / "config.yaml", str(e)) from None
    states = {}
    for name, fname in _WEIGHTS.items():
        present = fname in meta.get("files", {})
        states[name] = read_state_dict(folder / fname) if present and load_weights else None
    stats = folder / "latent_stats.safetensors"
    return ModelFolder(path=folder, config=config,
                       dit_config=_build(DiTConfig, meta.get("dit"), folder, "dit"),
                       decoder_config=_build(DecoderConfig, meta.get("decoder"), folder,
                                             "decoder"),
                       dit_state=states["dit"], decoder_state=states["decoder"],
                       stats_path=stats if stats.is_file() else None,
                       time_shift=meta.get("time_shift"), convention=meta.get("convention"),
                       meta=meta)

