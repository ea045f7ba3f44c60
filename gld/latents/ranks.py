"""Merging per-rank `Moments` over a torch.distributed process group.

Every rank sends its (level, count, mean, M2) per level; every rank then merges all of them in rank
order, so all ranks hold the same result, and it equals a single process's over the same
values up to float64 rounding (`Moments.merge` is exact in exact arithmetic). Counts travel as
float64, exact up to 2^53 values. The latent statistics live here, not in model code (which
never imports torch.distributed, tests/test_boundaries.py).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.distributed as dist

from gld.latents.moments import Moments

__all__ = ["merge_across_ranks"]


def _pack(moments: Mapping[int, Moments], levels: list[int], device) -> torch.Tensor:
    rows = [torch.cat([torch.tensor([float(lv), float(moments[lv].count)], dtype=torch.float64),
                       moments[lv].mean.double().cpu(), moments[lv].m2.double().cpu()])
            for lv in levels]
    return torch.stack(rows).to(device)


def merge_across_ranks(moments: Mapping[int, Moments], group: Optional[dist.ProcessGroup] = None
                       ) -> dict[int, Moments]:
    """{level: Moments} of this rank -> {level: Moments} of all ranks (identical on every
    rank). Without an initialised process group (one process) the input is returned as is.
    Every rank must pass the same levels with the same channel count."""
    levels = sorted(moments)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(moments)
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    on_cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    mine = _pack(moments, levels, device)
    shapes = [torch.zeros(2, dtype=torch.int64, device=device)
              for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, torch.tensor(mine.shape, dtype=torch.int64, device=device), group=group)
    for rank, shape in enumerate(shapes):
        if tuple(shape.tolist()) != tuple(mine.shape):
            raise ValueError(f"merge_across_ranks: rank {rank} sent {tuple(shape.tolist())} "
                             f"(levels x [level, count, mean, M2]), this rank "
                             f"{tuple(mine.shape)}: every rank must hold the same levels and "
                             "channels")
    gathered = [torch.empty_like(mine) for _ in shapes]
    dist.all_gather(gathered, mine, group=group)
    gathered = [g.cpu() for g in gathered]
    for rank, packed in enumerate(gathered):
        theirs = [int(v) for v in packed[:, 0].tolist()]
        if theirs != levels:
            raise ValueError(f"merge_across_ranks: rank {rank} holds levels {theirs}, this rank "
                             f"{levels}")
    C = moments[levels[0]].channels
    out = {}
    for i, lv in enumerate(levels):
        total = Moments.empty(C)
        for packed in gathered:
            total = total.merge(Moments(int(packed[i, 1].item()), packed[i, 2:2 + C],
                                        packed[i, 2 + C:]))
        out[lv] = total
    return out
