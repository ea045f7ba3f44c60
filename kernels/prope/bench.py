"""What the PRoPE benchmarks (launch/profile_kernels.py, bench_bwd.py, bench_fwd_ws.py) and the
GPU kernel tests share: the benchmark shapes, random inputs, attention FLOP counts, one
backend's timing and peak memory, and the error against a float64 reference.

A backend is a function fn(q, k, v, w2c, K, patches, image) -> o on (B, h, N, d) tensors. FLOPs
follow the usual convention (PRoPE's transforms are not counted; d = 48 is counted at 48 although
the kernels pad it to 64): forward 4 B h N^2 d, backward `BACKWARD_FLOPS` times that. The generic
parts (timers, peak memory, environment, JSON) are kernels/benchmarking.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from kernels.benchmarking import PeakMemory, markdown_table, rel_error, tflops, time_ms
from kernels.prope.reference import prope_attention_ref

__all__ = ["profile_table", "accuracy_table", "Shape", "SHAPES", "PATCH", "BACKWARD_FLOPS", "random_cameras", "random_inputs",
           "make_inputs", "attention_flops", "profile", "outputs_and_grads", "float64_errors",
           "accuracy"]

PATCH = 14            # pixels per patch side (DA3's ViT)
BACKWARD_FLOPS = 2.5  # backward FLOPs per forward FLOP


@dataclass(frozen=True)
class Shape:
    """One attention call: batch, heads, head dim, views of ph x pw patches (N = views ph pw)."""

    batch: int
    heads: int
    head_dim: int
    views: int
    patches: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.views * self.patches[0] * self.patches[1]


SHAPES = {
    "backbone_d48": Shape(2, 16, 48, 8, (36, 36)),   # GLD backbone
    "d64": Shape(2, 16, 64, 8, (36, 36)),
    "head_d128": Shape(2, 16, 128, 8, (36, 36)),     # GLD head
    "short_d48": Shape(4, 16, 48, 8, (18, 18)),
    "short_d64": Shape(4, 16, 64, 8, (18, 18)),
}


def random_cameras(B: int, V: int, image: tuple[int, int],
                   gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random rotations and translations, plausible intrinsics (focal 0.8-1.2 x the image's
    longer side, principal point at the centre): w2c (B, V, 4, 4), K (B, V, 3, 3), float64."""
    A = torch.randn(B * V, 3, 3, generator=gen, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    Q[torch.linalg.det(Q) < 0, :, 0] *= -1
    w2c = torch.eye(4, dtype=torch.float64).repeat(B * V, 1, 1)
    w2c[:, :3, :3] = Q
    w2c[:, :3, 3] = torch.randn(B * V, 3, generator=gen, dtype=torch.float64)
    H, W = image
    K = torch.zeros(B * V, 3, 3, dtype=torch.float64)
    f = (0.8 + 0.4 * torch.rand(B * V, generator=gen, dtype=torch.float64)) * max(H, W)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = f, f, W / 2, H / 2, 1
    return w2c.reshape(B, V, 4, 4), K.reshape(B, V, 3, 3)


def random_inputs(B: int, h: int, d: int, V: int, patches: tuple[int, int], dtype: torch.dtype,
                  device="cuda", seed: int = 0):
    """(q, k, v (B, h, N, d) standard normal in dtype, w2c, K (fp32), patches, image (PATCH
    pixels per patch)) on device, all from one seeded generator."""
    N = V * patches[0] * patches[1]
    gen = torch.Generator().manual_seed(seed)
    image = (PATCH * patches[0], PATCH * patches[1])
    q, k, v = (torch.randn(B, h, N, d, generator=gen).to(device, dtype) for _ in range(3))
    w2c, K = random_cameras(B, V, image, gen)
    return q, k, v, w2c.float().to(device), K.float().to(device), patches, image


def make_inputs(shape: Shape, dtype: torch.dtype, device="cuda", seed: int = 0,
                batch: Optional[int] = None, heads: Optional[int] = None):
    """`random_inputs` of a benchmark shape (batch / heads: other than the shape's)."""
    return random_inputs(batch or shape.batch, heads or shape.heads, shape.head_dim, shape.views,
                         shape.patches, dtype, device, seed)


def attention_flops(shape: Shape, batch: Optional[int] = None) -> float:
    """Forward FLOPs of attention over the shape's tokens: 4 B h N^2 d."""
    return 4.0 * (batch or shape.batch) * shape.heads * shape.tokens ** 2 * shape.head_dim


def profile(fn: Callable, q: Tensor, k: Tensor, v: Tensor, cam: Sequence, flop: float) -> dict:
    """Median times (triton do_bench) and peak memory above the inputs of fn: forward with
    grad, forward + backward, and forward without grad ("infer"); TFLOP/s of each (backward:
    the difference of the two)."""
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    do = torch.randn_like(q)
    fwd = time_ms(lambda: fn(qg, kg, vg, *cam), warmup=50, rep=300)

    def step():
        fn(qg, kg, vg, *cam).backward(do)
    both = time_ms(step, warmup=50, rep=400, grad_to_none=[qg, kg, vg])
    with torch.no_grad():   # inference: no graph, nothing saved
        infer = time_ms(lambda: fn(q, k, v, *cam), warmup=50, rep=300)
        with PeakMemory() as m_infer:
            o = fn(q, k, v, *cam)
        del o
    for t in (qg, kg, vg):
        t.grad = None
    with PeakMemory() as m:
        o = fn(qg, kg, vg, *cam)
        peak_fwd = m.now_mib()
        o.backward(do)
    del o
    bwd = both - fwd
    return dict(infer_ms=infer, infer_tflops=tflops(flop, infer), peak_infer_mib=m_infer.mib,
                fwd_ms=fwd, bwd_ms=bwd, both_ms=both, fwd_tflops=tflops(flop, fwd),
                bwd_tflops=tflops(BACKWARD_FLOPS * flop, bwd),
                both_tflops=tflops((1 + BACKWARD_FLOPS) * flop, both),
                peak_fwd_mib=peak_fwd, peak_both_mib=m.mib)


def outputs_and_grads(fn: Callable, q: Tensor, k: Tensor, v: Tensor, cam: Sequence,
                      do: Optional[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """[o, dq, dk, dv] of fn on copies of q, k, v in dtype (o alone, without a graph, when do
    is None)."""
    ins = [t.detach().to(dtype=dtype).clone().requires_grad_(do is not None) for t in (q, k, v)]
    if do is None:
        with torch.no_grad():
            return [fn(*ins, *cam)]
    o = fn(*ins, *cam)
    o.backward(do.to(dtype))
    return [o.detach()] + [t.grad for t in ins]


NAMES = ("o", "dq", "dk", "dv")


def float64_errors(fn: Callable, q: Tensor, k: Tensor, v: Tensor, cam: Sequence,
                   do: Optional[Tensor], dtype: torch.dtype, want: Sequence[Tensor]) -> dict:
    """name -> relative error (||a - b|| / ||b||) of fn's output and gradients in dtype against
    `want` (the same from the float64 reference, `outputs_and_grads`)."""
    got = outputs_and_grads(fn, q, k, v, cam, do, dtype)
    for name, a in zip(NAMES, got):
        if not torch.isfinite(a).all():
            raise FloatingPointError(f"{name} has non-finite values")
    return {name: rel_error(a, w.to(a.device)) for name, a, w in zip(NAMES, got, want)}


def accuracy(candidates: dict, shape: Shape, dtype: torch.dtype, device="cuda",
             convention: str = "textbook") -> dict:
    """Errors against the float64 reference (B 1, 2 heads, the shape's N; `convention`) of each
    candidate (name -> fn) and of the reference, run in dtype: output and gradients, and the
    no-grad output ("o_infer"); "ratio": name -> candidate / reference, per quantity. A
    candidate that cannot run here or gives non-finite values gets {"error": why}."""
    q, k, v, w2c, K, patches, image = make_inputs(shape, torch.float64, device, seed=1, batch=1,
                                                  heads=2)
    cam = (w2c, K, patches, image)
    do = torch.randn_like(q)
    ref = partial(prope_attention_ref, convention=convention)
    want = outputs_and_grads(ref, q, k, v, cam, do, torch.float64)
    out = {}
    for name, fn in [("reference", ref)] + list(candidates.items()):
        try:
            out[name] = float64_errors(fn, q, k, v, cam, do, dtype, want)
            out[name]["o_infer"] = float64_errors(fn, q, k, v, cam, None, dtype, want[:1])["o"]
        except (ValueError, RuntimeError, FloatingPointError) as e:
            if name == "reference":
                raise
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    ref_errors = out["reference"]
    out["ratio"] = {name: {n: out[name][n] / ref_errors[n] for n in ref_errors}
                    for name in candidates if "error" not in out[name]}
    return out


PROFILE_COLUMNS = ("inference fwd TFLOP/s", "fwd TFLOP/s", "bwd TFLOP/s", "fwd+bwd TFLOP/s",
           "inference fwd ms", "fwd ms", "fwd+bwd ms", "peak inference fwd MiB", "peak fwd MiB",
           "peak fwd+bwd MiB")
PROFILE_KEYS = (("infer_tflops", "0f"), ("fwd_tflops", "0f"), ("bwd_tflops", "0f"), ("both_tflops", "0f"),
        ("infer_ms", "3f"), ("fwd_ms", "3f"), ("both_ms", "3f"), ("peak_infer_mib", "0f"),
        ("peak_fwd_mib", "0f"), ("peak_both_mib", "0f"))


def profile_table(results: dict) -> str:
    """The markdown table of `profile` rows per shape and backend (why, where one did not run)."""
    rows = []
    for shape, by_backend in results.items():
        for name, r in by_backend.items():
            why = next((w for w in ("unavailable", "unsupported", "error") if w in r), None)
            cells = ([f"{why}: {r[why][:60]}"] + [""] * (len(PROFILE_KEYS) - 1) if why else
                     [format(r[key], "." + fmt) for key, fmt in PROFILE_KEYS])
            rows.append([shape, name] + cells)
    return markdown_table(("shape", "backend") + PROFILE_COLUMNS, rows)


def accuracy_table(check: dict) -> str:
    """Error ratios (backend / bf16 reference, against float64) per shape and convention."""
    quantities = ("o", "dq", "dk", "dv", "o_infer")
    rows = []
    for shape, by_conv in check.items():
        for conv, res in by_conv.items():
            for name in (n for n in res if n not in ("reference", "ratio")):
                r = res["ratio"].get(name)
                rows.append([shape, conv, name] + ([f"{r[n]:.2f}" for n in quantities] if r else
                                                   [res[name]["error"][:60]] + [""] * 4))
    return markdown_table(("shape", "convention", "backend", "o", "dq", "dk", "dv", "o no grad"),
                          rows)
