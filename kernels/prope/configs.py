"""Which PRoPE kernels run and how they are launched: `PRoPEKernels`, the launch configs and
their per-head-dim defaults. Plain dataclasses (no triton), so a caller can build a choice
anywhere; `kernels.prope.fused.resolve` turns one into the concrete kernels for an input.

The defaults were picked by sweeps on the H100 (launch/profile_kernels.py --sweep,
launch/bench_bwd.py, launch/bench_fwd_ws.py; what each measured is summarised in
launch/results/prope_kernels_history.md). They are keyed by the padded head dim (the next power
of two >= d; d < 64 uses the d = 64 entry), the warp-specialised forward's by d itself.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

__all__ = ["PRoPEKernels", "BlockConfig", "AtomicConfig", "WSConfig", "TransformConfig",
           "CORES", "FORWARDS", "BACKWARDS", "WS_HEAD_DIMS", "DEFAULT_CORE", "padded",
           "default_config", "default_core"]

CORES = ("auto", "fused", "sdpa")
FORWARDS = ("auto", "prepass", "ws")
BACKWARDS = ("auto", "two_kernel", "atomic")

# The attention core that PRoPEKernels(core="auto") runs, per head dim (others: "fused"). The
# one place to change it; launch/bench_train_step.py's per-path results decide. H200, 2026-12-04
# (launch/results/bench_train_step_h200_2026-12-04.md): the SDPA core (cuDNN) is faster at every
# head dim, with and without gradients (fwd+bwd TFLOP/s d48 327 vs 279, d64 410 vs 377, d128 474
# vs 358; the level-1 training step 3.15 vs 2.88 samples/s at batch 4, same peak memory). The
# fused core stays for its lower transient memory (no-grad warp-specialised forward) and GPUs
# without cuDNN's fast path: PRoPEKernels(core="fused").
DEFAULT_CORE = {48: "sdpa", 64: "sdpa", 128: "sdpa"}


def default_core(d: int) -> str:
    """The core that "auto" picks for head dim d (`DEFAULT_CORE`)."""
    return DEFAULT_CORE.get(d, "fused")


@dataclass(frozen=True)
class BlockConfig:
    """Launch config of a Triton attention kernel: the pre-pass forward and the dq kernel take
    block_m query rows per program and block_n keys per step; the dk/dv kernel block_n keys per
    program and block_m queries per step. tma: primed operands through TMA descriptors where
    they can be (contiguous scratch on a Hopper+ GPU; else pointer loads)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = True


@dataclass(frozen=True)
class AtomicConfig:
    """Launch config of the one-kernel backward (block_n keys per program, block_m queries per
    step). dq_tma: dq' partial sums by one TMA reduce-add per tile (True: required, an error
    where it cannot run), per-element atomic adds (False), or the former where it runs (None)."""

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    dq_tma: Optional[bool] = None


@dataclass(frozen=True)
class TransformConfig:
    """Launch config of the per-token transform pass: `block` tokens per program."""

    block: int = 64
    num_warps: int = 4


@dataclass(frozen=True)
class WSConfig:
    """Launch config of the warp-specialised forward (kernels/prope/forward_ws.py): two consumer
    warpgroups of block_m query rows and num_warps warps each, one producer of 4 warps, `stages`
    shared-memory stages of block_n keys; the register split (setmaxnreg) between them;
    consumer_transforms: each consumer transforms its own query and output rows (o' kept in
    fp32) instead of the producer; pipe: a consumer issues tile i's q k^T with tile i-1's P v and
    runs tile i's softmax under the latter; prefetch: the producer cp.async-copies the next raw
    k, v tile while it transforms the current one (whole rows: not at d = 48); ping: FA3's
    ping-pong, the consumers issue their wgmma in turns (needs pipe)."""

    consumer_regs: int
    producer_regs: int
    consumer_transforms: bool
    pipe: bool
    prefetch: bool
    ping: bool
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    stages: int = 2

    def __post_init__(self):
        if self.block_n != 64:
            raise ValueError(f"WSConfig.block_n={self.block_n}: the producer's layout takes 64")
        if self.ping and not self.pipe:
            raise ValueError("WSConfig: ping (consumers issuing in turns) needs pipe=True")


_DEFAULTS = {
    "prepass": {64: BlockConfig(128, 64, 4, 4), 128: BlockConfig(128, 128, 8, 3)},
    "dq": {64: BlockConfig(128, 64, 4, 4), 128: BlockConfig(128, 64, 8, 3)},
    "dkdv": {64: BlockConfig(32, 128, 4, 4), 128: BlockConfig(64, 128, 8, 3)},
    "atomic": {64: AtomicConfig(32, 128, 4, 4), 128: AtomicConfig(64, 128, 8, 3)},
    "transform": {64: TransformConfig(64, 4), 128: TransformConfig(64, 4)},
}
# Under the Triton interpreter (CPU tests): small blocks, launch settings unused.
_INTERPRETER = {"prepass": BlockConfig(16, 16, 1, 1), "dq": BlockConfig(16, 16, 1, 1),
                "dkdv": BlockConfig(16, 16, 1, 1), "atomic": AtomicConfig(16, 16, 1, 1),
                "transform": TransformConfig(16, 4)}
# d = 48 runs in 64-wide rows without prefetch, its query / output transforms on the producer
# (227 TFLOP/s against 193 with consumer transforms on the H100); d = 128 without pipe (spills).
_WS_DEFAULTS = {48: WSConfig(208, 96, False, True, False, True),
                64: WSConfig(208, 96, True, True, True, True),
                128: WSConfig(200, 112, False, False, True, False)}
WS_HEAD_DIMS = tuple(sorted(_WS_DEFAULTS))


def padded(d: int) -> int:
    """The next power of two >= d: the width the Triton kernels compute in."""
    return 1 << (d - 1).bit_length()


def default_config(kind: str, d: int, interpret: bool = False):
    """Default launch config of kernel `kind` ("prepass", "dq", "dkdv", "atomic", "transform",
    "ws") for head dim d; `interpret`: the Triton interpreter's."""
    if kind == "ws":
        return _WS_DEFAULTS[d]
    if interpret:
        return _INTERPRETER[kind]
    table = _DEFAULTS[kind]
    return table[128 if padded(d) > 64 else 64]


_CONFIG_TYPES = {"prepass": BlockConfig, "dq": BlockConfig, "dkdv": BlockConfig,
                 "atomic": AtomicConfig, "ws": WSConfig, "transform": TransformConfig}


@dataclass(frozen=True)
class PRoPEKernels:
    """One choice of PRoPE kernels, passed per call (`prope_attention(..., kernels=)`,
    `kernels.attention(..., prope_kernels=)`).

    core: "fused" (the Triton attention kernels with the transforms inside: forward and backward
    below), "sdpa" (Triton transform passes around PyTorch SDPA, cuDNN first on CUDA:
    kernels/prope/sdpa_core.py) or "auto" (`DEFAULT_CORE` per head dim; "fused" when forward or
    backward names a fused kernel). forward: "prepass" (a pass writes k', v' to transient scratch, then a flash-attention kernel
    on them: the fastest), "ws" (the warp-specialised Gluon forward: no scratch, plain
    attention's peak memory; Hopper sm_90, fp16 / bf16, d 48 / 64 / 128 only) or "auto".
    backward: "two_kernel" (a dq kernel and a dk/dv kernel), "atomic" (one kernel, dq summed in
    fp32 by reduce-adds: one more tensor's memory) or "auto". "auto" follows the policy written
    in `kernels.prope.fused.resolve`. The other fields override a kernel's launch config (None:
    the per-head-dim default of this module, with smaller fallbacks if the compiler runs out of
    resources; a config given here runs as given, for benchmarks and sweeps).
    """

    core: str = "auto"
    forward: str = "auto"
    backward: str = "auto"
    prepass: Optional[BlockConfig] = None
    dq: Optional[BlockConfig] = None
    dkdv: Optional[BlockConfig] = None
    atomic: Optional[AtomicConfig] = None
    ws: Optional[WSConfig] = None
    transform: Optional[TransformConfig] = None

    def __post_init__(self):
        for name, allowed in (("core", CORES), ("forward", FORWARDS), ("backward", BACKWARDS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"PRoPEKernels.{name}={value!r}; choose one of "
                                 f"{', '.join(map(repr, allowed))}")
        if self.core == "sdpa" and (self.forward, self.backward) != ("auto", "auto"):
            raise ValueError(f"PRoPEKernels(core='sdpa') runs no fused forward or backward; got "
                             f"forward={self.forward!r}, backward={self.backward!r} (leave them "
                             f"'auto', or use core='fused')")
        for f in fields(self):
            want, value = _CONFIG_TYPES.get(f.name), getattr(self, f.name)
            if want is not None and value is not None and not isinstance(value, want):
                raise TypeError(f"PRoPEKernels.{f.name} must be a {want.__name__} or None, got "
                                f"{type(value).__name__}")

    def config(self, kind: str, d: int, interpret: bool = False):
        """(launch config of kernel `kind` for head dim d, whether it was given here)."""
        given = getattr(self, kind)
        if given is not None:
            return given, True
        return default_config(kind, d, interpret), False
