"""Where the trainer's metrics go (rank 0 only): `<out_dir>/metrics.jsonl` (one JSON object per
log step), wandb when `train.wandb.mode` is not "off", and helpers for throughput and memory.

A record holds: step, loss (mean over micro-batches and ranks), the stage's extra scalars
(same mean), grad_norm, lr (of the next step), samples_per_s, tokens_per_s (global, over the
window since the last record), mfu (None without a known peak), peak_mem_gib, skipped_steps,
samples_seen. A resumed run appends: a later record of the same step supersedes an earlier one.

wandb: "online" only when WANDB_API_KEY is set, otherwise "offline" (files under
`<out_dir>/wandb`, `wandb sync` later). The config given to wandb is the resolved run config
with every key that looks secret (key, token, secret, password, credential) dropped; the
environment is never logged.
"""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Optional

import torch

__all__ = ["MetricsLog", "peak_memory_gib", "device_peak_flops", "scrub_secrets"]

_SECRET_WORDS = ("key", "token", "secret", "password", "credential")

# Dense bf16 peak FLOP/s per device, for MFU (vendor datasheets).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(device: torch.device, peak_tflops: Optional[float] = None
                      ) -> Optional[float]:
    """Peak FLOP/s of one device: train.peak_tflops if given, else a known CUDA device's
    dense bf16 peak, else None (no MFU, e.g. on CPU)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _PEAK_BF16.items():
            if key in name:
                return flops
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory in GiB: CUDA max_memory_allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def scrub_secrets(tree):
    """A copy of a config tree without keys that look like secrets."""
    if isinstance(tree, dict):
        return {k: scrub_secrets(v) for k, v in tree.items()
                if not any(w in str(k).lower() for w in _SECRET_WORDS)}
    if isinstance(tree, (list, tuple)):
        return [scrub_secrets(v) for v in tree]
    return tree


class MetricsLog:
    """Rank 0's sink: JSONL file + optional wandb. Other ranks hold an inert instance."""

    def __init__(self, out_dir: str | os.PathLike, rank: int, wandb_cfg=None,
                 run_config: Optional[dict] = None):
        self.active = rank == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg is not None and wandb_cfg.mode != "off":
            import wandb  # only when asked for: importing it costs seconds

            mode = "online" if wandb_cfg.mode == "online" and os.environ.get("WANDB_API_KEY") \
                else "offline"
            self.wandb = wandb.init(project=wandb_cfg.project, mode=mode,
                                    name=wandb_cfg.name or Path(out_dir).name,
                                    dir=str(out_dir), config=scrub_secrets(run_config or {}),
                                    resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
