"""The training loop over a stage (what a batch's loss is), torchtitan style:
`forward_backward_step` (one micro-batch), `train_step` (one optimizer step over grad_accum
micro-batches), `train` (the loop: resume, log, sample, save).

    seed_everything(cfg.train.seed)                 # same model init on every rank
    stage = DecoderStage(...)                       # any object of the Stage protocol
    loader = build_loader(cfg.data, "train")
    Trainer(stage, cfg.train, loader, run_config=cfg.to_dict()).train()

Steps are counted in optimizer steps; step k (1-based) is the k-th optimizer step, its loss
is logged as step k and checkpoint step_k holds the state after it. The stage's `loss` gets the
step it contributes to. Training randomness is seeded with train.seed + rank.

Non-finite values are checked without a host sync per step where the mode allows: a device
tensor keeps the first step whose loss or gradient norm was non-finite; it is read at log
steps, before a save and at the end ("stop": NonFiniteLossError naming that step, nothing
saved after it). "skip" must decide before the optimizer step, so it all-reduces a flag every
step (one small collective + sync): a non-finite loss on any rank skips the optimizer step on
all (weights, moments untouched; the data and the LR-schedule slot are consumed) and counts
it; more than max_skipped raises. A non-finite gradient norm with a finite loss cannot be
skipped (DeepSpeed has applied it) and raises in both modes.
"""
from __future__ import annotations

import random
import time
from typing import Any, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from gld.train import checkpoint as ckpt
from gld.train.config import TrainConfig
from gld.train.ema import EMA
from gld.train.engine import TrainEngine, build_engine, setup_distributed
from gld.train.metrics_log import MetricsLog, device_peak_flops, peak_memory_gib

__all__ = ["Stage", "Callback", "Trainer", "NonFiniteLossError", "seed_everything"]


@runtime_checkable
class Stage(Protocol):
    """What a training stage provides (gld/train/ stages: decoder, diffusion).

    model: the trainable nn.Module (DeepSpeed wraps it); frozen parts (a DA3 encoder) are not
    inside it and are moved by `to(device)`. `loss(model, batch, step)` gets the engine-wrapped
    module and a batch (gld/data/streaming.py keys, tensors on the device) and returns
    (scalar loss, {name: float or 0-d tensor} to log). checkpoint_modules: block classes to
    wrap with activation checkpointing. Optional: `sample_grid(model, batch, step, out_dir)`
    (called on every rank every train.sample_every steps; write files on rank 0 only).
    """

    name: str
    model: nn.Module
    checkpoint_modules: list

    def to(self, device) -> "Stage": ...

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[Tensor, dict]: ...

    def samples_in(self, batch: dict) -> int: ...

    def tokens_in(self, batch: dict) -> int: ...

    def flops_per_sample(self, batch: dict) -> Optional[float]: ...


class Callback:
    """Hooks, called on every rank (so they may run collectives, e.g. an evaluation under
    ZeRO-3). Override what you need."""

    def on_step(self, trainer: "Trainer", step: int, metrics: Optional[dict]) -> None:
        """After optimizer step `step`; metrics is the logged dict on log steps, else None."""

    def on_checkpoint_written(self, trainer: "Trainer", step: int, folder) -> None:
        """All files of checkpoint `step` written, before COMPLETE and `latest`."""

    def on_save(self, trainer: "Trainer", step: int, folder) -> None:
        """Checkpoint `step` published."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """After the last step and its checkpoint."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became non-finite; the message names the first bad step."""


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with seed + rank."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
            for k, v in batch.items()}


class Trainer:
    """Train `stage` per `cfg` (the train section) on `loader` (a MultiViewLoader: iterable by
    epochs, state_dict / load_state_dict, its dataset's batch_size is the micro batch).

    run_config: the resolved config tree (dict) saved in every checkpoint and given to wandb.
    time_shift / extra: saved in every checkpoint's meta.json. callbacks: `Callback`s.
    progress: rank 0 tqdm bar. micro_batch: default loader.dataset.batch_size.
    After construction: `te` (TrainEngine), `engine`, `ema` (or None), `step` (resumed),
    `resumed_from` (folder or None), `resume_meta`.
    """

    def __init__(self, stage: Stage, cfg: TrainConfig, loader, run_config: dict, *,
                 callbacks: Sequence[Callback] = (), time_shift: Optional[float] = None,
                 extra: Optional[dict] = None, device=None, progress: bool = True,
                 micro_batch: Optional[int] = None):
        cfg.validate()
        self.stage, self.cfg, self.loader, self.run_config = stage, cfg, loader, run_config
        self.callbacks, self.time_shift, self.extra = list(callbacks), time_shift, extra
        self.progress = progress
        rank, world, device = setup_distributed(device)
        self.rank, self.world_size, self.device = rank, world, device
        self.out_dir = cfg.out_dir
        self.resumed_from = ckpt.resolve_resume(cfg.resume, cfg.out_dir)
        self.resume_meta = None
        universal = False
        if self.resumed_from is not None:
            if ckpt.read_meta(self.resumed_from)["world_size"] != world:
                ckpt.load_weights_into_module(stage.model, self.resumed_from)
                universal = ckpt.uses_universal(self.resumed_from, world, cfg.zero_stage)
        mb = micro_batch if micro_batch is not None else loader.dataset.batch_size
        self.te: TrainEngine = build_engine(stage, cfg, mb, device, load_universal=universal)
        self.engine = self.te.engine
        self.ema = EMA(self.engine.module, cfg.ema_decay) if cfg.ema_decay > 0 else None
        seed_everything(cfg.seed, rank)
        self.step = 0
        self.skipped_steps = 0
        self.samples_seen = 0
        if self.resumed_from is not None:
            meta = ckpt.load_checkpoint(
                self.te, self.resumed_from, loader=loader, ema=self.ema,
                scheduler=self.te.scheduler,
                universal_dir=ckpt.checkpoints_root(cfg.out_dir) / "universal")
            self.resume_meta = meta
            self.step, self.samples_seen = meta["step"], meta["samples_seen"]
            self.skipped_steps = meta["skipped_steps"]
        self.peak_flops = device_peak_flops(device, cfg.peak_tflops)
        # First non-finite step (-1: none), on the device: no host sync per step in "stop".
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._batches: Optional[Iterator[dict]] = None
        self.log = MetricsLog(cfg.out_dir, rank, cfg.wandb, run_config)

    # ---- data ---------------------------------------------------------------------------------
    def _batch_stream(self) -> Iterator[dict]:
        while True:  # one `for` over the loader is the rest of an epoch
            yield from self.loader

    def next_batch(self) -> dict:
        if self._batches is None:
            self._batches = self._batch_stream()
        return _to_device(next(self._batches), self.device)

    # ---- steps ----------------------------------------------------------------------------------
    def forward_backward_step(self, batch: dict, step: int) -> tuple[Tensor, dict]:
        """Loss of one micro-batch and its backward (DeepSpeed scales by 1/grad_accum and
        reduces gradients at the accumulation boundary). Returns (detached loss, extras)."""
        loss, extras = self.stage.loss(self.engine, batch, step)
        self.engine.backward(loss)
        return loss.detach(), extras

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` over grad_accum micro-batches. Returns device-side values
        {loss (mean over micro-batches, this rank), extras, samples, tokens, flops, skipped}."""
        losses, extras_sum, samples, tokens, flops = [], {}, 0, 0, 0.0
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        last_batch, data_s = None, 0.0
        for micro in range(self.cfg.grad_accum):
            t0 = time.perf_counter()
            batch = self.next_batch()     # host time waiting for the loader (prefetched)
            data_s += time.perf_counter() - t0
            last_batch = batch
            loss, extras = self.forward_backward_step(batch, step)
            bad |= ~torch.isfinite(loss)
            losses.append(loss.float())
            for k, v in extras.items():
                extras_sum[k] = extras_sum.get(k, 0.0) + (v.detach().float()
                                                          if isinstance(v, Tensor) else float(v))
            n = self.stage.samples_in(batch)
            samples += n
            tokens += self.stage.tokens_in(batch)
            fps = self.stage.flops_per_sample(batch)
            flops = None if fps is None or flops is None else flops + fps * n
            norm0 = None
            if micro == self.cfg.grad_accum - 1:
                skipped = self._decide_skip(bad, step)
                if self.cfg.zero_stage == 0:    # DeepSpeed reports no norm without ZeRO
                    grads = [p.grad for p in self.engine.module.parameters()
                             if p.grad is not None]
                    norm0 = torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
                        if grads else None
            self.engine.step()  # the optimizer steps at the accumulation boundary
        self.te.scheduler.step()
        if not skipped and self.ema is not None and step % self.cfg.ema_every == 0:
            self.ema.update()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = norm0
        bad_norm = (torch.zeros((), dtype=torch.bool, device=self.device) if norm is None
                    or skipped else ~torch.isfinite(torch.as_tensor(norm, device=self.device)))
        flag = bad_norm if self.cfg.nonfinite == "skip" else (bad | bad_norm)
        self._first_bad = torch.where((self._first_bad < 0) & flag,
                                      torch.as_tensor(step, device=self.device), self._first_bad)
        self.samples_seen += samples * self.world_size
        return {"loss": torch.stack(losses).mean(),
                "extras": {k: v / self.cfg.grad_accum for k, v in extras_sum.items()},
                "samples": samples, "tokens": tokens, "flops": flops, "grad_norm": norm,
                "skipped": skipped, "batch": last_batch, "data_s": data_s}

    def _decide_skip(self, bad: Tensor, step: int) -> bool:
        opt = self.te.optimizer
        opt.skip_next = False
        if self.cfg.nonfinite != "skip":
            return False
        flag = bad.to(torch.float32).reshape(1)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return False
        self.skipped_steps += 1
        if self.skipped_steps > self.cfg.max_skipped:
            raise NonFiniteLossError(
                f"non-finite loss at step {step}: {self.skipped_steps} steps skipped, more than "
                f"train.max_skipped={self.cfg.max_skipped}")
        opt.skip_next = True
        return True

    def check_finite(self) -> None:
        """Raise NonFiniteLossError naming the first bad step of any rank, if any (a
        collective: one small all-reduce and host sync; every rank raises alike)."""
        never = torch.iinfo(torch.long).max
        first_t = torch.where(self._first_bad < 0, torch.as_tensor(never, device=self.device),
                              self._first_bad).reshape(1)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(first_t, op=dist.ReduceOp.MIN)
        first = int(first_t.item())
        first = -1 if first == never else first
        if first >= 0:
            what = "gradient norm" if self.cfg.nonfinite == "skip" else "loss or gradient norm"
            raise NonFiniteLossError(
                f"non-finite {what} at step {first} (train.nonfinite={self.cfg.nonfinite!r}); "
                f"nothing saved after it")

    # ---- logging --------------------------------------------------------------------------------
    def _global_mean(self, values: list[Tensor]) -> list[float]:
        t = torch.stack([v.float().reshape(()) for v in values])
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(t)
            t /= self.world_size
        return t.tolist()

    def _metrics(self, out: dict, window: dict) -> dict:
        keys = ["loss", *out["extras"]]
        vals = [out["loss"], *[torch.as_tensor(v, device=self.device)
                               for v in out["extras"].values()]]
        means = dict(zip(keys, self._global_mean(vals)))
        dt = max(time.perf_counter() - window["t0"], 1e-9)
        samples_s = window["samples"] * self.world_size / dt
        norm = out["grad_norm"]
        m = {"loss": means.pop("loss"), **means,
             "grad_norm": None if norm is None else float(norm),
             "lr": self.te.scheduler.get_last_lr()[0],
             "samples_per_s": samples_s, "tokens_per_s": window["tokens"] * self.world_size / dt,
             "mfu": None, "peak_mem_gib": peak_memory_gib(self.device),
             "skipped_steps": self.skipped_steps, "samples_seen": self.samples_seen,
             "data_ms": 1e3 * window["data_s"] / max(window["steps"], 1)}
        if window["flops"] is not None and self.peak_flops:
            m["mfu"] = window["flops"] * self.world_size / dt / (self.peak_flops * self.world_size)
        return m

    # ---- saving ---------------------------------------------------------------------------------
    def save(self) -> Any:
        """Checkpoint the current step (every rank). Refuses after a non-finite step."""
        self.check_finite()
        step = self.step

        def before_publish(folder):
            for cb in self.callbacks:
                cb.on_checkpoint_written(self, step, folder)

        folder = ckpt.save_checkpoint(
            self.te, self.out_dir, step, loader=self.loader, ema=self.ema,
            run_config=self.run_config, scheduler_state=self.te.scheduler.state_dict(),
            samples_seen=self.samples_seen, skipped_steps=self.skipped_steps,
            time_shift=self.time_shift, extra=self.extra, before_publish=before_publish,
            keep_last=self.cfg.keep_last)
        for cb in self.callbacks:
            cb.on_save(self, step, folder)
        return folder

    # ---- loop ------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run until train.steps; returns the last logged metrics."""
        cfg = self.cfg
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage.name, dynamic_ncols=True)
        window = {"t0": time.perf_counter(), "samples": 0, "tokens": 0, "flops": 0.0,
                          "steps": 0, "data_s": 0.0}
        last: dict = {}
        saved_at = self.step if self.resumed_from is not None else None
        try:
            while self.step < cfg.steps:
                step = self.step + 1
                out = self.train_step(step)
                self.step = step
                window["samples"] += out["samples"]
                window["steps"] += 1
                window["data_s"] += out["data_s"]
                window["tokens"] += out["tokens"]
                window["flops"] = (None if out["flops"] is None or window["flops"] is None
                                   else window["flops"] + out["flops"])
                metrics = None
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self.check_finite()
                    metrics = self._metrics(out, window)
                    self.log.log(step, metrics)
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.3g}")
                    window = {"t0": time.perf_counter(), "samples": 0, "tokens": 0, "flops": 0.0,
                          "steps": 0, "data_s": 0.0}
                    last = metrics
                if cfg.sample_every and step % cfg.sample_every == 0 \
                        and hasattr(self.stage, "sample_grid"):
                    self.stage.sample_grid(self.engine, out["batch"], step, self.out_dir)
                for cb in self.callbacks:
                    cb.on_step(self, step, metrics)
                if bar is not None:
                    bar.update(1)
                if cfg.save_every and step % cfg.save_every == 0:
                    self.save()
                    saved_at = step
            self.check_finite()
            if saved_at != self.step:
                self.save()
            for cb in self.callbacks:
                cb.on_train_end(self)
        finally:
            if bar is not None:
                bar.close()
            self.log.close()
        return last
