"""Exponential moving average of the trained weights, sharded like the weights.

Under ZeRO-3 each rank keeps the EMA of only its own partition of every parameter (the
parameter's `ds_tensor`: elements [rank * P, rank * P + P) of the flattened parameter, P =
ceil(numel / world), the last partition padded), never a full copy; under ZeRO 0-2 the weights
are whole on every rank and so is the EMA. The shadow is fp32 whatever the training precision:
`shadow <- shadow + (1 - decay) (weight - shadow)` after an optimizer step.

Saved format (one file per rank that holds something, `ema_rank{r:05d}.safetensors` in the
checkpoint folder): each parameter's flat fp32 slice under its own name (the model's
`named_parameters()` name), and in the safetensors metadata a JSON `layout` {name: [offset,
numel, shape]} (offset and numel of the full flattened parameter; the slice holds elements
[offset, offset + len)), `parts` (files written) and `num_updates`. Any layout loads into any
other: a rank reads the overlap of its own range with every saved slice (lazily, through
`safe_open(...).get_slice`), so ZeRO-3 on 2 ranks resumes on 1 rank, on ZeRO-2, or the reverse.
`consolidate_ema_files(folder)` gives the full tensors without any process group.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = ["EMA", "consolidate_ema_files", "ema_file"]


def ema_file(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"ema_rank{rank:05d}.safetensors"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EMA:
    """EMA of `model`'s trainable parameters (the module DeepSpeed wraps: `engine.module`).

    decay: the default for `update()`. Attributes: `shadow` {name: flat fp32 tensor (this
    rank's slice)}, `offsets` {name: first element held}, `num_updates`.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.rank, self.world = _rank_world()
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.zero3 = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.params.items()}
        self.numels = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in self.params.items()}
        self.shadow: dict[str, torch.Tensor] = {}
        self.offsets: dict[str, int] = {}
        with torch.no_grad():
            for n, p in self.params.items():
                local = self._local(p)
                self.offsets[n] = self.rank * local.numel() if self.zero3 else 0
                self.shadow[n] = local.detach().float().clone()
        self.num_updates = 0

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's weights of `p`, flat: the ZeRO-3 partition (padded) or the whole."""
        return (p.ds_tensor if self.zero3 else p.data).view(-1)

    def _valid(self, name: str) -> int:
        """Elements of this rank's slice that are real (not ZeRO-3 padding)."""
        return max(0, min(self.shadow[name].numel(), self.numels[name] - self.offsets[name]))

    @torch.no_grad()
    def update(self, decay: Optional[float] = None) -> None:
        """One EMA step from the current weights (call after the optimizer step)."""
        d = self.decay if decay is None else float(decay)
        shadows = list(self.shadow.values())
        weights = [self._local(p).float() for p in self.params.values()]
        torch._foreach_lerp_(shadows, weights, 1.0 - d)
        self.num_updates += 1

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Optional[Path]:
        """Write this rank's slices (ZeRO-3: every rank; otherwise rank 0 only, the others hold
        the same). Returns the file written, or None."""
        if not self.zero3 and self.rank != 0:
            return None
        tensors = {n: s[:self._valid(n)].contiguous() for n, s in self.shadow.items()}
        layout = {n: [self.offsets[n], self.numels[n], list(self.shapes[n])] for n in tensors}
        meta = {"layout": json.dumps(layout), "parts": str(self.world if self.zero3 else 1),
                "num_updates": str(self.num_updates)}
        path = ema_file(folder, self.rank)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @torch.no_grad()
    def load(self, folder: str | os.PathLike) -> None:
        """Fill this rank's slices from the files of any saved layout (see module docstring)."""
        pieces = _saved_pieces(folder)
        for n, s in self.shadow.items():
            if n not in pieces:
                raise KeyError(f"{folder}: EMA has no parameter {n!r} (saved: "
                               f"{sorted(pieces)[:5]}...)")
            lo, hi = self.offsets[n], self.offsets[n] + self._valid(n)
            s.zero_()
            covered = 0
            for path, off, length in pieces[n]:
                a, b = max(lo, off), min(hi, off + length)
                if a >= b:
                    continue
                with safe_open(str(path), framework="pt") as f:
                    s[a - lo:b - lo] = f.get_slice(n)[a - off:b - off]
                covered += b - a
            if covered != hi - lo:
                raise ValueError(f"{folder}: EMA slices of {n!r} cover {covered} of the "
                                 f"{hi - lo} elements this rank needs")
        self.num_updates = int(_read_meta(next(iter(pieces.values()))[0][0])["num_updates"])

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights {name: tensor of the parameter's shape} on rank 0 ({} on the
        others). ZeRO-3 gathers the partitions one parameter at a time (a collective: call on
        every rank)."""
        out = {}
        for n, s in self.shadow.items():
            if self.zero3 and self.world > 1:
                parts = [torch.empty_like(s) for _ in range(self.world)]
                dist.all_gather(parts, s.contiguous())
                full = torch.cat(parts)
            else:
                full = s
            if self.rank == 0:
                out[n] = full[:self.numels[n]].view(self.shapes[n]).clone().cpu()
        return out


def _read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _saved_pieces(folder) -> dict[str, list[tuple[Path, int, int]]]:
    """{name: [(file, offset, length)]} over the folder's EMA files."""
    files = sorted(Path(folder).glob("ema_rank*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no EMA files (ema_rank*.safetensors)")
    parts = int(_read_meta(files[0])["parts"])
    if len(files) != parts:
        raise ValueError(f"{folder}: {len(files)} EMA files, the layout says {parts}")
    pieces: dict[str, list] = {}
    for path in files:
        meta = _read_meta(path)
        with safe_open(str(path), framework="pt") as f:
            for n, (off, _numel, _shape) in json.loads(meta["layout"]).items():
                pieces.setdefault(n, []).append((path, off, f.get_slice(n).get_shape()[0]))
    return pieces


def consolidate_ema_files(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 EMA weights {name: tensor} from a checkpoint folder (no process group)."""
    files = sorted(Path(folder).glob("ema_rank*.safetensors"))
    layout = json.loads(_read_meta(files[0])["layout"]) if files else {}
    pieces = _saved_pieces(folder)
    out = {}
    for n, (_off, numel, shape) in layout.items():
        full = torch.empty(numel, dtype=torch.float32)
        for path, off, length in pieces[n]:
            with safe_open(str(path), framework="pt") as f:
                full[off:off + length] = f.get_slice(n)[:]
        out[n] = full.view(shape)
    return out
