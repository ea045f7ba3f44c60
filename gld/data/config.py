"""The `data` config section, read by the data stream (gld/data/streaming.py).

Resolutions are (H, W) in pixels. Whether they fit the encoder's patch is checked where the
sections meet (gld/config.py), which passes the patch size to `DataConfig.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from gld.configtypes import ConfigError

__all__ = ["DataConfig", "EvalDataConfig"]


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _check_resolution(hw, key: str, patch_size: int) -> None:
    h, w = hw
    _check(h > 0 and w > 0 and h % patch_size == 0 and w % patch_size == 0, key,
           f"H and W must be positive multiples of the patch size {patch_size}, got {tuple(hw)}")


def _check_paths(paths, key: str) -> None:
    for i, p in enumerate(paths):
        _check(isinstance(p, str) and p != "", f"{key}[{i}]",
               f"must be a local folder or an s3:// URL, got {p!r}")
        if p.startswith("s3://"):
            bucket = p[5:].split("/", 1)[0]
            _check(len(bucket) >= 3, f"{key}[{i}]",
                   f"S3 bucket names need at least 3 characters, got {bucket!r}")


@dataclass
class EvalDataConfig:
    """The eval split: fixed views (evenly spaced in the centred window), no shuffle. Unset
    values follow the training settings of the section."""

    paths: list[str] = field(default_factory=list)  # empty: data.paths
    num_views: Optional[int] = None  # None: data.num_views
    num_sources: Optional[int] = None  # None: data.max_sources
    # "interpolate": sources evenly spaced among the views; "first": the first ones;
    # "fixed": a random choice fixed per sample.
    source_selection: Literal["interpolate", "first", "fixed"] = "interpolate"
    resolution: Optional[tuple[int, int]] = None  # None: data.resolutions (one per batch)
    # add `scene_mean` (B, 3, H, W) float32 in [0, 1]: the mean image of ALL the frames of each
    # sample's sequence (a baseline for the report; decodes every frame of the sequence)
    scene_mean: bool = False


@dataclass
class DataConfig:
    """Multi-view samples: V posed frames of one scene."""

    source: Literal["synthetic", "mds", "wds"] = "synthetic"
    paths: list[str] = field(default_factory=list)  # local folders or s3:// URLs
    weights: list[float] = field(default_factory=list)  # mixing proportions, one per path
    s3_endpoint: Optional[str] = None  # else S3_ENDPOINT_URL from the environment
    num_views: int = 8
    min_sources: int = 1
    max_sources: int = 4
    view_window: int = 32  # frames of the sequence the views are drawn from
    resolutions: list[tuple[int, int]] = field(
        default_factory=lambda: [(504, 504), (336, 504), (280, 504)]
    )
    batch_size: int = 1  # per rank, per micro-step
    num_workers: int = 2
    seed: int = 0
    shuffle: bool = True
    skip_bad: bool = False  # skip-and-count corrupt samples instead of raising
    synthetic_scenes: int = 64
    load_depth: bool = False  # add `depth` (B, V, H, W) to batches (0 where unknown)
    cache_dir: Optional[str] = None  # local shard cache for s3:// MDS; None = $TMPDIR/gld-cache
    prefetch_factor: int = 2  # batches prefetched per DataLoader worker
    # page-locked batches, so the trainer's host-to-device copy is asynchronous and does not
    # wait for the GPU's queue; None = when CUDA is available
    pin_memory: Optional[bool] = None
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)

    # ---- what a split reads --------------------------------------------------------------
    def split_paths(self, split: str) -> list[str]:
        return list(self.eval.paths) if split == "eval" and self.eval.paths else list(self.paths)

    def split_resolutions(self, split: str) -> list[tuple[int, int]]:
        if split == "eval" and self.eval.resolution is not None:
            return [tuple(self.eval.resolution)]
        return [tuple(r) for r in self.resolutions]

    def eval_views(self) -> tuple[int, int]:
        """(views, sources) of an eval sample."""
        ev = self.eval
        return (self.num_views if ev.num_views is None else ev.num_views,
                self.max_sources if ev.num_sources is None else ev.num_sources)

    # ---- validation --------------------------------------------------------------------------
    def validate(self, key: str = "data", patch_size: int = 1) -> None:
        """Raise ConfigError naming the first bad key; resolutions must be multiples of
        `patch_size` (the encoder's, passed in by gld/config.py)."""
        _check(self.num_views >= 2, f"{key}.num_views", f"must be >= 2, got {self.num_views}")
        _check(1 <= self.min_sources <= self.max_sources, f"{key}.min_sources",
               f"must be in [1, data.max_sources={self.max_sources}], got {self.min_sources}")
        _check(self.max_sources < self.num_views, f"{key}.max_sources",
               f"must leave at least one target view: max_sources={self.max_sources} >= "
               f"num_views={self.num_views}")
        _check(self.view_window >= self.num_views, f"{key}.view_window",
               f"must be >= data.num_views={self.num_views}, got {self.view_window}")
        _check(len(self.resolutions) >= 1, f"{key}.resolutions", "needs at least one (H, W)")
        for i, hw in enumerate(self.resolutions):
            _check_resolution(hw, f"{key}.resolutions[{i}]", patch_size)
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"{key}.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.source != "synthetic":
            _check(len(self.paths) >= 1, f"{key}.paths",
                   f"data.source={self.source!r} needs at least one path")
        if self.weights:
            _check(len(self.weights) == len(self.paths), f"{key}.weights",
                   f"has {len(self.weights)} entries for {len(self.paths)} data.paths")
            _check(all(w > 0 for w in self.weights), f"{key}.weights", "must all be > 0")
        _check(self.synthetic_scenes >= 1, f"{key}.synthetic_scenes", "must be >= 1")
        _check(self.prefetch_factor >= 1, f"{key}.prefetch_factor", "must be >= 1")
        _check_paths(self.paths, f"{key}.paths")
        _check_paths(self.eval.paths, f"{key}.eval.paths")
        if self.source == "wds" and len(set(self.weights)) > 1:
            raise ConfigError(f"{key}.weights: mixing proportions need data.source='mds' "
                              "(webdataset shards are read once each per epoch)")
        views, sources = self.eval_views()
        _check(2 <= views <= self.view_window, f"{key}.eval.num_views",
               f"must be in [2, data.view_window={self.view_window}], got {views}")
        _check(1 <= sources < views, f"{key}.eval.num_sources",
               f"must be in [1, data.eval.num_views-1={views - 1}], got {sources}")
        if self.eval.resolution is not None:
            _check_resolution(self.eval.resolution, f"{key}.eval.resolution", patch_size)
