"""Replay a frozen encoder call as one CUDA graph (removes the per-kernel launch cost).

The DA3 encoder at GLD's sizes is partly bound by launching ~30 kernels per block from Python
(launch/results/da3_encode_h100_2026-11-24.md: eager, Small and Base take about as long at
280x504 as at 504x504; graph replay removes that). Its inputs have a few fixed shapes (one per
training resolution), it holds no data-dependent control flow once its RoPE tables are cached,
and it needs no autograd: the conditions for graph capture.

    encode = GraphedCall(lambda x: model.encode(x), example_images)
    levels = encode(images)       # same shape / dtype / device as example_images

Outputs live in the graph's static memory and are overwritten by the next replay: clone what
must outlive it. One `GraphedCall` per input shape; keep a dict keyed by shape for several.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["GraphedCall"]


class GraphedCall:
    """fn(*tensors) captured once for the example inputs' shapes, replayed on new values."""

    def __init__(self, fn: Callable[..., Any], *example: Tensor, warmup: int = 3) -> None:
        if not example or not all(isinstance(x, Tensor) and x.is_cuda for x in example):
            raise ValueError("GraphedCall: needs CUDA tensors as example inputs, got "
                             f"{[getattr(x, 'device', type(x).__name__) for x in example]}")
        self.static_in = [x.clone() for x in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up fills caches (RoPE tables, cuDNN plans, compile)
            for _ in range(warmup):
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_in)

    def __call__(self, *inputs: Tensor) -> Any:
        if len(inputs) != len(self.static_in):
            raise ValueError(f"GraphedCall: captured with {len(self.static_in)} inputs, "
                             f"called with {len(inputs)}")
        for i, (dst, src) in enumerate(zip(self.static_in, inputs)):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"GraphedCall: input {i} is {tuple(src.shape)} {src.dtype}, the "
                                 f"graph was captured for {tuple(dst.shape)} {dst.dtype}")
            dst.copy_(src)
        self.graph.replay()
        return self.static_out
