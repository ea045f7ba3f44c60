"""Attention kernel benchmark (GPU): TFLOP/s and peak memory per backend and shape, forward,
backward and both, with and without gradients; the PRoPE backends' error against float64
(--check, both camera conventions) and a block-config sweep (--sweep).

Backends: `fused_prope` (the PRoPE kernels with their default choice, kernels/prope/fused.py
`resolve`), the same with one attention core forced (`fused_prope_fused_core`: the fused Triton
kernels; `fused_prope_sdpa_core`: Triton transform passes around PyTorch SDPA, cuDNN first) or
one fused kernel (`fused_prope_prepass_fwd`, `fused_prope_ws_fwd`, `fused_prope_two_kernel_bwd`,
`fused_prope_atomic_bwd`), `reference_prope`
(the PyTorch reference: transforms around SDPA), plain `sdpa_flash` (FA2) and `sdpa_cudnn`,
`flash_attn` when installed (kernels.attention's choice: the FA2 API, else FA4's
flash_attn.cute) and `flash_attn_4` (FA4 itself; "unavailable" and why when it does not import:
launch/fa4_wheels.sh carries it to the GPU machine; "unsupported" outside its head dims).
Shapes and FLOP counts: kernels/prope/bench.py. --sweep times the kernels' candidate configs
(kernels/prope/sweeps.py) on --sweep-shapes and runs the table with the fastest per padded d.
--check measures every PRoPE backend asked for (`*_prope*`) in bf16, textbook and release
conventions; timings use --convention (the conventions differ only in matrix values).

    python launch/profile_kernels.py --out DIR [--check] [--sweep] [--shapes d64,backbone_d48]
                                     [--backends fused_prope,sdpa_cudnn] [--convention release]
    python launch/profile_kernels.py --list [--backends ...]
Writes DIR/profile_kernels.json (after every row) and DIR/profile_kernels.md; prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention import attention, flash_attn_available
from kernels.benchmarking import env_info, require_cuda, write_results
from kernels.prope.bench import (SHAPES, accuracy, accuracy_table, attention_flops,
                                  make_inputs, profile, profile_table)
from kernels.prope.configs import PRoPEKernels, padded
from kernels.prope.fused import prope_attention
from kernels.prope.reference import CONVENTIONS, prope_attention_ref
from kernels.prope.sweeps import BLOCK_CANDIDATES, sweep_blocks


class Unsupported(Exception):
    """A backend that cannot run this shape (e.g. a head dim its kernels lack): its row says
    "unsupported" and why, and the run goes on."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def flash_attn_4():
    """FlashAttention-4 (pip `flash-attn-4`, module `flash_attn.cute`) as a backend, or the
    one-line reason it does not import. Imported only when asked for (CuTe-DSL's MLIR libraries
    are ~235 MB; a failed import must not stop the other backends). Its `flash_attn_func` takes
    (B, N, h, d) fp16 / bf16 (our transposed views pass without a copy), returns (out, lse) and
    is differentiable; its head-dim / arch assertions become "unsupported" rows."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # ImportError, or cutlass failing to load its libraries
        return _one_line(e)

    def f(q, k, v, *cam):
        try:
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                softmax_scale=q.shape[-1] ** -0.5)
        except (AssertionError, NotImplementedError) as e:
            raise Unsupported(_one_line(e)) from e
        return (o[0] if isinstance(o, tuple) else o).transpose(1, 2)
    return f


def backends(names=(), base: PRoPEKernels = PRoPEKernels(), convention: str = "textbook") -> dict:
    """Backend name -> fn(q, k, v, w2c, K, patches, image), or -> why it is unavailable, for
    `names` in their order (default all); `base`: the fused kernels' choice (a sweep's);
    `convention`: the PRoPE backends' camera convention."""
    def sdpa(kind):
        def f(q, k, v, *cam):
            with sdpa_kernel([kind]):
                return F.scaled_dot_product_attention(q, k, v)
        return f

    def fused(**force):
        choice = replace(base, **force)
        return lambda q, k, v, *cam: prope_attention(q, k, v, *cam, kernels=choice,
                                                     convention=convention)
    out = {"fused_prope": fused(), "fused_prope_fused_core": fused(core="fused"),
           "fused_prope_sdpa_core": fused(core="sdpa"),
           "fused_prope_prepass_fwd": fused(forward="prepass"),
           "fused_prope_ws_fwd": fused(forward="ws"),
           "fused_prope_two_kernel_bwd": fused(backward="two_kernel"),
           "fused_prope_atomic_bwd": fused(backward="atomic"),
           "reference_prope": lambda q, k, v, *cam: prope_attention_ref(
               q, k, v, *cam, convention=convention),
           "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
           "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    if flash_attn_available():
        out["flash_attn"] = lambda q, k, v, *cam: attention(q, k, v, backend="flash_attn")
    if not names or "flash_attn_4" in names:
        out["flash_attn_4"] = flash_attn_4()
    return {n: out[n] for n in (names or out) if n in out}   # in the order asked for


def run_backend(fn, q, k, v, cam, flop) -> dict:
    if isinstance(fn, str):   # not importable: the reason
        return dict(unavailable=fn)
    try:
        return profile(fn, q, k, v, cam, flop)
    except Unsupported as e:
        return dict(unsupported=str(e)[:300])
    except Exception as e:
        return dict(error=_one_line(e)[:300])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--backends", default="", help="comma-separated (default all)")
    ap.add_argument("--check", action="store_true",
                    help="bf16 error vs float64 of the PRoPE backends and the reference")
    ap.add_argument("--convention", default="textbook", choices=CONVENTIONS,
                    help="PRoPE camera convention of the timed rows")
    ap.add_argument("--sweep", action="store_true", help="pick block configs per head dim")
    ap.add_argument("--sweep-shapes", default="d64,head_d128",
                    help="shapes to sweep on (configs are per padded head dim: d48 runs as 64)")
    ap.add_argument("--sweep-kinds", default="", help="kernels to sweep (default all): "
                    + ",".join(list(BLOCK_CANDIDATES) + ["transform"]))
    ap.add_argument("--list", action="store_true",
                    help="print the backends (those of --backends) and whether each can run")
    args = ap.parse_args()
    require_cuda("launch/profile_kernels.py")
    wanted = [x for x in args.backends.split(",") if x]
    shapes = args.shapes.split(",")
    missing = [n for n in wanted if n not in backends(wanted)]
    if missing:
        print(f"not run (no such backend here): {', '.join(missing)}", flush=True)
    if args.list:
        for name, fn in backends(wanted).items():
            print(f"{name}: {'unavailable: ' + fn if isinstance(fn, str) else 'available'}")
        return 0
    out = Path(args.out)
    report = dict(env=env_info(("flash-attn-4", "nvidia-cutlass-dsl")),
                  shapes={n: vars(SHAPES[n]) for n in shapes}, convention=args.convention)

    def save():
        write_results(out / "profile_kernels.json", report)

    if args.check:
        report["check"] = {}
        for name in shapes:
            report["check"][name] = {}
            for conv in CONVENTIONS:
                fns = {n: fn for n, fn in backends(wanted, convention=conv).items()
                       if "_prope" in n and n != "reference_prope" and callable(fn)}
                res = accuracy(fns, SHAPES[name], torch.bfloat16, convention=conv)
                report["check"][name][conv] = res
                print("check", name, conv, json.dumps(res["ratio"]), flush=True)
                save()
    chosen = {}   # padded head dim -> the sweep's choice
    if args.sweep:
        report["sweep_log"], report["configs"] = [], {}
        for name in args.sweep_shapes.split(","):
            d = SHAPES[name].head_dim
            chosen[padded(d)] = sweep_blocks(SHAPES[name], torch.bfloat16, report["sweep_log"],
                                             [x for x in args.sweep_kinds.split(",") if x])
            report["configs"][d] = repr(chosen[padded(d)])
            print("best", name, chosen[padded(d)], flush=True)
            save()
    report["results"] = {}
    for name in shapes:
        shape = SHAPES[name]
        q, k, v, w2c, K, patches, image = make_inputs(shape, torch.bfloat16)
        bks = backends(wanted, chosen.get(padded(shape.head_dim), PRoPEKernels()),
                       args.convention)
        report["results"][name] = {}
        for bname, fn in bks.items():
            r = run_backend(fn, q, k, v, (w2c, K, patches, image), attention_flops(shape))
            report["results"][name][bname] = r
            print(name, bname, {k2: round(v2, 3) for k2, v2 in r.items()
                                if isinstance(v2, float)} or r, flush=True)
            save()
        torch.cuda.empty_cache()
    md = profile_table(report["results"])
    if args.check:
        md += "\n\nError against float64 / the bf16 reference's (at most 2 expected):\n\n"
        md += accuracy_table(report["check"])
    (out / "profile_kernels.md").write_text(
        f"# Attention kernels on {report['env']['device']}\n\n{json.dumps(report['env'])}\n\n"
        f"{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
