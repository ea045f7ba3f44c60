"""Per-channel statistics of raw DA3 levels, the normalisation they define, and their files.

    stats = load_stats("runs/x/latent_stats.safetensors", encoder=resolve_variant("da3-base"))
    z = stats.normalize(raw_features, level=1)        # (z - mean) / sqrt(var + 1e-5)
    raw_features = stats.denormalize(z, level=1)

Normalisation is per channel of the LAST axis: features (..., 2C), raw form [local | global]
(docs/release-facts.md). The arithmetic follows the release (`stage1/rae_da3.py` there): mean
and var are cast to the features' dtype (at least fp32) and std = sqrt(var + eps) is computed
in it, so release files give the release's numbers to the bit.

Files:
- ours, `.safetensors` (`save_stats`, written atomically: temp file, fsync, rename): per level
  L the tensors `level{L}.mean`, `level{L}.var` (C,) float64 and `level{L}.count` (1,) int64;
  metadata format="gld-latent-stats", version, encoder (DA3 variant), form="raw", eps, levels,
  plus any `info` strings (how they were computed).
- the release's `model_stats/da3/normalization_stats_level{L}.pt`: a torch pickle (read with
  weights_only=True) of {"mean", "var", "std": (1, C, 1, 1) float32, "count": int, "level":
  int}. mean and var are read; std (sqrt(var), without eps) is not used; the level comes from
  "level", else from a `level<L>` in the file name.
Bad files raise `CheckpointError` naming the file and what is wrong.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from gld.checkpoints.loading import TORCH_SUFFIXES, CheckpointError
from gld.encoders.da3.config import DA3Config
from gld.latents.moments import Moments

__all__ = ["EPS", "LatentStats", "save_stats", "load_stats", "read_stats_file"]

EPS = 1e-5  # the release's normalisation epsilon
FORMAT = "gld-latent-stats"
VERSION = "1"
PathLike = Union[str, os.PathLike]


class LatentStats(nn.Module):
    """Per-level, per-channel mean and population variance of raw level features.

    levels: the levels held (any of 0..3), in increasing order; buffers `mean`, `var`
    (len(levels), C) float64 and `count` (len(levels),) int64 (feature vectors each level's
    statistics were computed over); encoder: the DA3 variant ("" when the file does not say,
    as the release's do); info: free-form provenance strings, saved with the file. The
    buffers move with `.to(device)`; keep them float64 (no `.half()`).
    """

    def __init__(self, levels: Sequence[int], mean: Tensor, var: Tensor, count: Sequence[int],
                 encoder: str = "", info: Optional[Mapping[str, str]] = None,
                 where: str = "latent statistics") -> None:
        super().__init__()
        levels = tuple(int(lv) for lv in levels)
        order = sorted(range(len(levels)), key=levels.__getitem__)
        mean, var = torch.as_tensor(mean).double(), torch.as_tensor(var).double()
        count = torch.as_tensor(count, dtype=torch.int64).reshape(-1)
        if len(set(levels)) != len(levels):
            raise ValueError(f"{where}: level listed twice in {levels}")
        if mean.dim() != 2 or mean.shape != var.shape or mean.shape[0] != len(levels) \
                or count.shape != (len(levels),):
            raise ValueError(f"{where}: expected mean and var (levels={len(levels)}, C) and count "
                             f"({len(levels)},); got {tuple(mean.shape)}, {tuple(var.shape)}, "
                             f"{tuple(count.shape)}")
        self.levels = tuple(levels[i] for i in order)
        self.register_buffer("mean", mean[order].clone())
        self.register_buffer("var", var[order].clone())
        self.register_buffer("count", count[order].clone())
        self.encoder, self.info, self.where = encoder, dict(info or {}), where

    @classmethod
    def from_moments(cls, moments: Mapping[int, Moments], encoder: str = "",
                     info: Optional[Mapping[str, str]] = None) -> "LatentStats":
        levels = sorted(moments)
        return cls(levels, torch.stack([moments[lv].mean.cpu() for lv in levels]),
                   torch.stack([moments[lv].var.cpu() for lv in levels]),
                   [moments[lv].count for lv in levels], encoder, info)

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def index(self, level: int) -> int:
        """The row of `level` in mean / var / count; ValueError naming the levels held."""
        if level not in self.levels:
            raise ValueError(f"{self.where}: no statistics for level {level}; they hold levels "
                           f"{list(self.levels)}")
        return self.levels.index(level)

    def _mean_std(self, z: Tensor, level: int) -> tuple[Tensor, Tensor, torch.dtype]:
        if z.shape[-1] != self.channels:
            raise ValueError(f"{self.where}: features have {z.shape[-1]} channels on the last "
                             f"axis, the statistics {self.channels}")
        i = self.index(level)
        dt = torch.promote_types(z.dtype, torch.float32)
        mean = self.mean[i].to(z.device, dt)
        return mean, (self.var[i].to(z.device, dt) + EPS).sqrt(), dt

    def normalize(self, z: Tensor, level: int) -> Tensor:
        """Raw features (..., C) of `level` -> (z - mean) / sqrt(var + eps), computed in at
        least fp32, returned in z's dtype."""
        mean, std, dt = self._mean_std(z, level)
        return ((z.to(dt) - mean) / std).to(z.dtype)

    def denormalize(self, z: Tensor, level: int) -> Tensor:
        """The inverse of `normalize`: z * sqrt(var + eps) + mean."""
        mean, std, dt = self._mean_std(z, level)
        return (z.to(dt) * std + mean).to(z.dtype)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, channels={self.channels}, encoder={self.encoder!r}"


# -- files ---------------------------------------------------------------------------------------

def save_stats(stats: LatentStats, path: PathLike) -> Path:
    """Write `stats` as safetensors at `path`, atomically (a crash leaves the old file or
    none, never a partial one). Returns the path."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {}
    for i, lv in enumerate(stats.levels):
        tensors[f"level{lv}.mean"] = stats.mean[i].detach().cpu().contiguous()
        tensors[f"level{lv}.var"] = stats.var[i].detach().cpu().contiguous()
        tensors[f"level{lv}.count"] = stats.count[i:i + 1].detach().cpu().contiguous()
    meta = {**{str(k): str(v) for k, v in stats.info.items()},
            "format": FORMAT, "version": VERSION, "encoder": stats.encoder, "form": "raw",
            "eps": repr(EPS), "levels": ",".join(map(str, stats.levels))}
    data = save(tensors, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _vector(value, name: str, path: Path) -> Tensor:
    """A per-channel tensor stored as (C,) or (1, C, 1, 1) -> (C,) float64."""
    if not isinstance(value, Tensor):
        raise CheckpointError(path, f"{name!r} is a {type(value).__name__}, expected a tensor")
    if value.dim() == 0 or sum(s != 1 for s in value.shape) > 1:
        raise CheckpointError(path, f"{name!r} has shape {tuple(value.shape)}, expected one "
                              "value per channel: (C,) or (1, C, 1, 1)")
    return value.detach().reshape(-1).double()


def _read_ours(path: Path) -> tuple[dict[int, tuple[Tensor, Tensor, int]], str, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(path, f"not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"not a latent statistics file: metadata format is "
                              f"{meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("form", "raw") != "raw":
        raise CheckpointError(path, f"statistics of the {meta['form']!r} form; the latent is "
                              "the raw form")
    levels = sorted({int(m.group(1)) for k in tensors if (m := re.fullmatch(r"level(\d+)\.\w+", k))})
    if not levels:
        raise CheckpointError(path, f"no level{{L}}.mean / .var / .count tensors; keys are "
                              f"{sorted(tensors)}")
    out = {}
    for lv in levels:
        keys = [f"level{lv}.{n}" for n in ("mean", "var", "count")]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(path, f"missing key(s) {', '.join(missing)} (found "
                                  f"{sorted(tensors)})")
        count = tensors[keys[2]].reshape(-1)
        if count.numel() != 1:
            raise CheckpointError(path, f"{keys[2]} has shape {tuple(tensors[keys[2]].shape)}, "
                                  "expected (1,)")
        out[lv] = (_vector(tensors[keys[0]], keys[0], path),
                   _vector(tensors[keys[1]], keys[1], path), int(count.item()))
    info = {k: v for k, v in meta.items()
            if k not in ("format", "version", "encoder", "form", "eps", "levels")}
    return out, meta.get("encoder", ""), info


def _read_release(path: Path, level: Optional[int]) -> dict[int, tuple[Tensor, Tensor, int]]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe pickles
        first = str(err).strip().split("\n")[0][:200]
        raise CheckpointError(path, f"not loadable with torch.load(weights_only=True) "
                              f"({type(err).__name__}: {first})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict with 'mean' and 'var', found "
                              f"{type(obj).__name__}")
    missing = [k for k in ("mean", "var") if k not in obj]
    if missing:
        raise CheckpointError(path, f"missing key(s) {', '.join(map(repr, missing))}; found "
                              f"{sorted(map(str, obj))}")
    stored = obj.get("level")
    if stored is None:
        named = re.findall(r"level(\d+)", path.name)
        stored = int(named[-1]) if named else level
    if stored is None:
        raise CheckpointError(path, "the file does not say its level (no 'level' key, no "
                              "'level<L>' in the name); pass level=")
    if level is not None and int(stored) != level:
        raise CheckpointError(path, f"holds level {int(stored)}, level {level} was asked for")
    count = obj.get("count", 0)
    count = int(count.item() if isinstance(count, Tensor) else count)
    return {int(stored): (_vector(obj["mean"], "mean", path), _vector(obj["var"], "var", path),
                          count)}


def read_stats_file(path: PathLike, level: Optional[int] = None
                    ) -> tuple[dict[int, tuple[Tensor, Tensor, int]], str, dict]:
    """One file -> ({level: (mean (C,), var (C,), count)}, encoder name or "", info), unchecked
    against any encoder. `level`: for a release file whose level is not stored (or a check)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_ours(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_release(path, level), "", {}
    raise CheckpointError(path, f"unknown statistics format {path.suffix!r}; expected "
                          f".safetensors (ours) or the release's .pt")


def load_stats(paths: Union[PathLike, Sequence[PathLike]], encoder: Optional[DA3Config] = None
               ) -> LatentStats:
    """One or more statistics files (levels combined) -> `LatentStats`, checked.

    Checks, each raising `CheckpointError` naming the file: every vector has the same channel
    count, 2 x the encoder width when `encoder` is given; a file naming another encoder
    variant; non-finite values, negative variances, counts below 1 (release files may omit
    the count: 0 is accepted there); a level found in two files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("load_stats: no statistics file given")
    width = 2 * encoder.dim if encoder is not None else None
    rows: dict[int, tuple[Tensor, Tensor, int]] = {}
    names, infos, origin = set(), {}, {}
    for p in map(Path, paths):
        levels, name, info = read_stats_file(p)
        if name and encoder is not None and name != encoder.name:
            raise CheckpointError(p, f"statistics of {name} levels, the encoder is {encoder.name}")
        for lv, (mean, var, count) in levels.items():
            width = mean.numel() if width is None else width
            for vec, what in ((mean, "mean"), (var, "var")):
                if vec.numel() != width:
                    whose = (f"{encoder.name} levels have {width} (2 x width {encoder.dim})"
                             if encoder is not None else f"first vector read has {width}")
                    raise CheckpointError(p, f"level {lv} {what} has {vec.numel()} channels; "
                                          f"the {whose}")
                if not torch.isfinite(vec).all():
                    raise CheckpointError(p, f"level {lv} {what} has non-finite values")
            if (var < 0).any():
                raise CheckpointError(p, f"level {lv} var has negative values (min "
                                      f"{var.min().item():.3g})")
            if count < (1 if p.suffix == ".safetensors" else 0):
                raise CheckpointError(p, f"level {lv} count is {count}, expected >= 1")
            if lv in rows:
                raise CheckpointError(p, f"level {lv} is also in {origin[lv]}")
            rows[lv], origin[lv] = (mean, var, count), p
        names.add(name)
        infos.update(info)
    levels = sorted(rows)
    where = ", ".join(str(Path(p)) for p in paths)
    return LatentStats(levels, torch.stack([rows[lv][0] for lv in levels]),
                       torch.stack([rows[lv][1] for lv in levels]),
                       [rows[lv][2] for lv in levels],
                       encoder.name if encoder is not None else "/".join(sorted(names - {""})),
                       infos, where=f"latent statistics {where}")
