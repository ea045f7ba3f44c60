"""DeepSpeed set-up in one place: the process group, the DeepSpeed config, activation
checkpointing applied from outside the model, the optimizer, the LR schedule and the engine.

    rank, world, device = setup_distributed()          # torchrun, deepspeed or plain python
    te = build_engine(stage, cfg.train, cfg.data.batch_size, device)
    te.engine(...), te.engine.backward(loss), te.engine.step(); te.scheduler.step()

The optimizer is a `torch.optim.AdamW` (fused only on CUDA) and the schedule a torch
`LambdaLR` stepped by the trainer after every optimizer step (not handed to DeepSpeed, so a
skipped step and a resume on another world size follow one rule: the schedule is a function of
the optimizer-step count). Nothing here JIT-builds a DeepSpeed op: no "optimizer" section in the
config (DeepSpeed's CPU Adam is a C++ build), and DeepSpeed's shared-memory all-reduce
(`deepspeed_shm_comm`, about 100 s to build on first use) is switched off on CPU; DeepSpeed uses it
only for inference all-reduce, training goes through torch.distributed (gloo).
train.compile compiles each block of the stage's `checkpoint_modules` (torch.compile per block:
the blocks repeat, so one graph serves all, and the glue between them stays eager), before
activation checkpointing wraps the compiled forward.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from gld.train.config import TrainConfig

__all__ = ["TrainEngine", "SkippableAdamW", "ds_config", "setup_distributed", "build_engine",
           "build_optimizer", "lr_factor", "apply_activation_checkpointing", "compile_blocks",
           "is_zero3_param", "misaligned_parameters"]


def ds_config(cfg: TrainConfig, micro_batch: int, world_size: int) -> dict:
    """The DeepSpeed config of `cfg` for `micro_batch` samples per rank per micro-step on
    `world_size` data-parallel ranks. The global batch is derived here and nowhere else:
    train_batch_size = micro_batch x grad_accum x world_size."""
    if micro_batch < 1:
        raise ValueError(f"micro batch (data.batch_size) must be >= 1, got {micro_batch}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Small parameters are otherwise kept whole on every rank (persistence threshold
        # 1e5 elements): 0 partitions every parameter, which the sharding tests rely on and
        # which costs nothing on real models whose parameters are large.
        zero.update(stage3_param_persistence_threshold=0,
                    stage3_gather_16bit_weights_on_model_save=False)
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=cfg.overlap_comm, contiguous_gradients=True)
    if cfg.zero_stage in (1, 2):
        # Every parameter starts 16-byte aligned in ZeRO's flat buffer (else a parameter after
        # one of odd size sits at any 4-byte offset). Compiled blocks need it: inductor's
        # kernels take parameters as aligned, and a misaligned one stops the first step with
        # "CUDA error: misaligned address". Costs at most 3 fp32 elements per parameter; always
        # on, so that a checkpoint resumes with or without train.compile.
        zero["parameter_alignment"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # bf16 as the release trains: torch autocast over fp32 weights (fp32 master, fp32
        # gradients of norms, bf16 matmuls), applied by the engine around the forward. (With
        # DeepSpeed's "bf16" section the weights themselves become bf16 and the engine turns
        # any outer autocast off, so fp32 inputs would meet bf16 weights.)
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": cfg.precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 1 << 30,  # the trainer logs; DeepSpeed's own progress print is noise
        "wall_clock_breakdown": False,
        # DeepSpeed vets optimizers by exact class; SkippableAdamW is torch's AdamW plus a skip.
        "zero_allow_untested_optimizer": True,
    }
    if cfg.offload_optimizer:
        # A torch AdamW on the offloaded fp32 partitions; DeepSpeedCPUAdam would be a JIT build.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disable_shm_comm() -> None:
    """DeepSpeed's CPU backend JIT-builds its shared-memory all-reduce when the process group
    starts (about 100 s into TORCH_EXTENSIONS_DIR) although training never calls it (only
    `inference_all_reduce` does). Its compatibility table is the documented switch: DeepSpeed
    caches it in `deepspeed.ops` so that edits persist."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def setup_distributed(device: Optional[torch.device | str] = None
                      ) -> tuple[int, int, torch.device]:
    """Start the process group (gloo on CPU, nccl on CUDA) through `deepspeed.init_distributed`
    and return (rank, world size, device). Under `deepspeed` / `torchrun` the launcher's
    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK are used; a plain `python` run
    becomes a world of 1. device: None = cuda:LOCAL_RANK when CUDA is available, else cpu."""
    import deepspeed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _disable_shm_comm()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size(), device


def apply_activation_checkpointing(model: nn.Module, module_types: Iterable[type]) -> int:
    """Recompute the forward of every submodule of `model` whose type is in `module_types` in
    the backward pass (torch.utils.checkpoint, non-reentrant). The instance's `forward` is
    replaced, not the module wrapped, so parameter names and state-dict keys stay the model's
    own (DeepSpeed's consolidation and the EMA use them). Returns how many were wrapped."""
    types = tuple(module_types)
    if not types:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, types) and not getattr(module, "_gld_checkpointed", False):
            inner = module.forward

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            module._gld_checkpointed = True
            count += 1
    return count


def compile_blocks(model: nn.Module, module_types: Iterable[type]) -> int:
    """torch.compile the forward of every submodule whose type is in `module_types` (instance
    attribute, so names and state-dict keys stay the model's own); returns how many."""
    types = tuple(module_types)
    count = 0
    for module in model.modules():
        if types and isinstance(module, types) and not getattr(module, "_gld_compiled", False):
            module.forward = torch.compile(module.forward)
            module._gld_compiled = True
            count += 1
    return count


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next `step()` can be skipped (`skip_next = True`): the trainer sets it
    on every rank alike when a micro-batch loss of the step was non-finite (nonfinite="skip").
    Under ZeRO the step runs on this rank's fp32 partitions; skipping leaves them, the Adam
    moments and Adam's step count as they were."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> SkippableAdamW:
    """AdamW over the trainable parameters: weight decay on matrices (ndim >= 2) only, none on
    biases, norms and embeddings' scalars/vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("the stage's model has no trainable parameters")
    return SkippableAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                          fused=device.type == "cuda")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """LR / train.lr for optimizer step `step` (0-based): linear warmup from 0 over
    `warmup_steps`, then constant, or cosine from lr to min_lr at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainEngine:
    """What `build_engine` returns. `engine` is the DeepSpeed engine (call it as the model);
    `optimizer` the torch AdamW inside it; `scheduler` the LambdaLR the trainer steps."""

    engine: Any
    optimizer: SkippableAdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: dict
    rank: int
    world_size: int
    device: torch.device


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def misaligned_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters whose storage does not start 16-byte aligned (compiled blocks
    need none: see ds_config's parameter_alignment); empty ZeRO-3 partitions are left out."""
    return [n for n, p in model.named_parameters() if p.numel() and p.data_ptr() % 16]


def build_engine(stage, cfg: TrainConfig, micro_batch: int,
                 device: Optional[torch.device | str] = None,
                 load_universal: bool = False) -> TrainEngine:
    """DeepSpeed engine over `stage.model` (only the trainable module: frozen parts such as the
    encoder stay outside ZeRO and are moved by `stage.to(device)`). Activation checkpointing of
    `stage.checkpoint_modules` is applied here when cfg.activation_checkpointing.
    load_universal: the engine will load a DeepSpeed universal checkpoint (a resume on another
    world size, gld/train/checkpoint.py)."""
    import deepspeed

    rank, world, device = setup_distributed(device)
    model = stage.model
    if cfg.compile:
        if cfg.zero_stage == 3:
            # ZeRO-3 gathers parameters into views of coalesced buffers at offsets that change
            # from step to step (no per-parameter alignment at stage 3), while inductor's kernels
            # would take parameters as 16-byte aligned: give up its divisibility hints instead.
            import torch._inductor.config as inductor_config

            inductor_config.triton.divisible_by_16 = False
        compile_blocks(model, getattr(stage, "checkpoint_modules", ()))
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, getattr(stage, "checkpoint_modules", ()))
    model.to(device)
    stage.to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    config = ds_config(cfg, micro_batch, world)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return TrainEngine(engine, optimizer, scheduler, config, rank, world, device)
