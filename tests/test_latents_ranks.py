"""Latent statistics over several ranks equal those of one: the merge over a gloo process group,
and `launch/compute_stats.py` end to end on the synthetic world with a tiny random encoder,
alone and under torchrun with 2 ranks.

Tolerances. 1 and 2 ranks see bit-identical features (the same samples, encoded one at a time
in processes with the same thread count) and differ only in the order of the float64 merges:
tests/test_latents_stats.py derives that bound (`merge_bounds`). Against a reference computed
here, whose encoder may run with another thread count, features may also differ by fp32
summation order: docs in tests/test_da3.py (`fp32_bound`), EPS32 sqrt(4C) per block.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gld.config import load_config
from gld.data.streaming import build_loader
from gld.latents import Moments, build_latent_space, load_stats
from gld.latents.collect import take_batches
from gld.latents.ranks import merge_across_ranks
from tests.test_latents_stats import chunks, merge_bounds

ROOT = Path(__file__).resolve().parents[1]
F32 = torch.finfo(torch.float32).eps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        parts = {lv: chunks(seed=lv) for lv in (0, 2)}
        mine = {}
        for lv, ps in parts.items():
            m = Moments.empty(8)
            for p in ps[rank::world]:  # a disjoint share of the chunks per rank
                m = m.add(p)
            mine[lv] = m
        merged = merge_across_ranks(mine)
        try:  # a rank holding other levels is refused by name, on every rank
            merge_across_ranks({lv + rank: m for lv, m in mine.items()})
            refused = ""
        except ValueError as err:
            refused = str(err)
        torch.save({"merged": {lv: (m.count, m.mean, m.m2) for lv, m in merged.items()},
                    "refused": refused}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_merge_across_two_gloo_ranks_equals_one_process(tmp_path):
    out = str(tmp_path / "merged")
    mp.spawn(_rank, args=(2, _free_port(), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for lv in (0, 2):
        x = torch.cat(chunks(seed=lv))
        single = Moments.of(x)
        counts = [res["merged"][lv][0] for res in results]
        (c0, mean0, m20), (_, mean1, m21) = results[0]["merged"][lv], results[1]["merged"][lv]
        assert counts == [x.shape[0]] * 2
        # Every rank holds the same result, to the bit.
        assert torch.equal(mean0, mean1) and torch.equal(m20, m21)
        mean_tol, var_tol = merge_bounds(x)
        assert ((mean0 - single.mean).abs() <= mean_tol).all()
        assert ((m20 / c0 - single.var).abs() <= var_tol).all()
    assert "rank 1 holds levels [1, 3], this rank [0, 2]" in results[0]["refused"]
    assert "rank 0 holds levels [0, 2], this rank [1, 3]" in results[1]["refused"]


def _compute_stats(out: Path, ranks: int, *extra: str) -> dict:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable])
    cmd = launcher + [str(ROOT / "launch" / "compute_stats.py"), "--config",
                      str(ROOT / "configs" / "tiny.yaml"), "--batches", "3", "--batch-size", "4",
                      "--levels", "all", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _reference(batches: int, batch_size: int):
    """({level: raw features over the same samples, concatenated (M, 2C) float64}, space)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    space = build_latent_space(cfg.latent)
    loader = build_loader(replace(cfg.data, batch_size=batch_size), "train", rank=0, world_size=1)
    feats: dict[int, list] = {lv: [] for lv in range(4)}
    for batch in take_batches(loader, batches):
        for i in range(batch_size):
            levels = space.encode_levels(batch["images"][i:i + 1].float() / 255)
            for lv in range(4):
                feats[lv].append(levels[lv].features.reshape(-1, space.channels))
    return {lv: torch.cat(f).double() for lv, f in feats.items()}, space


@pytest.mark.slow
def test_compute_stats_one_rank_equals_two(tmp_path):
    one = _compute_stats(tmp_path / "one.safetensors", 1)
    two = _compute_stats(tmp_path / "two.safetensors", 2)
    assert one["ranks"] == 1 and two["ranks"] == 2 and one["samples"] == two["samples"] == 12
    a, b = load_stats(tmp_path / "one.safetensors"), load_stats(tmp_path / "two.safetensors")
    assert a.levels == b.levels == (0, 1, 2, 3) and a.encoder == b.encoder == "da3-small"
    assert torch.equal(a.count, b.count) and a.info["samples"] == "12"
    feats, space = _reference(batches=3, batch_size=4)
    cfg = space.encoder.config
    for lv in a.levels:
        x = feats[lv]
        assert a.count[lv].item() == x.shape[0]
        mean_tol, var_tol = merge_bounds(x)
        assert ((a.mean[lv] - b.mean[lv]).abs() <= mean_tol).all()
        assert ((a.var[lv] - b.var[lv]).abs() <= var_tol).all()
        # Against torch's statistics of features encoded here: fp32 order (per feature, see
        # the module docstring) on top of the merge bound.
        feat_tol = F32 * (4 * cfg.dim) ** 0.5 * (cfg.out_layers[lv] + 1) * x.abs().max().item()
        spread = (x - x.mean(0)).abs().amax(0)
        assert ((a.mean[lv] - x.mean(0)).abs() <= mean_tol + feat_tol).all()
        assert ((a.var[lv] - x.var(0, unbiased=False)).abs()
                <= var_tol + 2 * spread * feat_tol + feat_tol ** 2).all()


def test_compute_stats_refuses_uneven_shares(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "compute_stats.py"), "--config",
           str(ROOT / "configs" / "tiny.yaml"), "--batches", "1", "--batch-size", "3",
           "--encode-batch", "2", "--out", str(tmp_path / "x.safetensors")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode != 0
    assert "--batch-size 3 must be a multiple of ranks x --encode-batch = 1 x 2" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
