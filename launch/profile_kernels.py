"""Attention kernel benchmark (GPU): TFLOP/s and peak memory, forward, backward and both.

Backends: the fused PRoPE kernel (kernels/prope_triton.py) with its default modes (the
warp-specialised forward where it runs) and with each backward / forward forced
(`fused_prope_two_kernel_bwd`, `fused_prope_atomic_bwd`, `fused_prope_prepass_fwd`,
`fused_prope_merged_fwd`), its PyTorch reference (transforms around SDPA), plain SDPA flash
(FA2), plain SDPA cuDNN, flash-attn when installed (kernels.attention's choice: the FA2 API, else
FA4's flash_attn.cute), and `flash_attn_4` (FA4 itself; a row saying "unavailable" and why when
it does not import: launch/fa4_wheels.sh carries it to the GPU machine). Shapes: GLD backbone
(B 2, 16 heads, d 48, 8 views of 36x36), d 64, GLD head (d 128), and short sequences (B 4, 8
views of 18x18). A backend that cannot run a shape (FA4 outside its head dims) gets an
"unsupported" row with the reason; other failures an "error" row.

FLOPs: forward 4 B h N^2 d, backward 2.5x that (the usual convention; PRoPE's transforms are not
counted). Times: triton.testing.do_bench medians on random bf16 data. Peak memory: the most
allocated above the inputs during one forward without grad ("inference"), one with grad, and a
forward + backward (grads included). `--sweep` times each kernel's block configs (and TMA on /
off) alone and keeps the fastest for the table.

    python launch/profile_kernels.py --out DIR [--check] [--sweep] [--shapes backbone,d64]
    python launch/profile_kernels.py --list [--backends ...]   # names and availability, no GPU
Writes DIR/profile_kernels.json and DIR/profile_kernels.md; prints the table last.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

from kernels import prope_fwd_inloop as fm
from kernels import prope_triton as pt
from kernels.attention import _flash_attn, flash_attn_available
from kernels.prope_ref import prope_attention_ref

SHAPES = {  # name: (B, heads, d, views, (ph, pw))
    "backbone_d48": (2, 16, 48, 8, (36, 36)),
    "d64": (2, 16, 64, 8, (36, 36)),
    "head_d128": (2, 16, 128, 8, (36, 36)),
    "short_d48": (4, 16, 48, 8, (18, 18)),
    "short_d64": (4, 16, 64, 8, (18, 18)),
}
PATCH = 14
SWEEP = {  # (block_m, block_n, num_warps, num_stages); dkdv: block_n keys per program
    "fwd": [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
    "dq": [(128, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 4), (128, 128, 8, 3)],
    "dkdv": [(32, 128, 4, 4), (32, 128, 4, 5), (64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4),
             (64, 128, 4, 3)],
}


def cameras(B, V, image, device, gen):
    """Random look-at-ish cameras: random rotations, translations, plausible intrinsics."""
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
    return (w2c.reshape(B, V, 4, 4).float().to(device), K.reshape(B, V, 3, 3).float().to(device))


def make(shape, dtype, device="cuda", seed=0, B=None, h=None):
    B0, h0, d, V, patches = shape
    B, h = B or B0, h or h0
    N = V * patches[0] * patches[1]
    gen = torch.Generator().manual_seed(seed)
    image = (PATCH * patches[0], PATCH * patches[1])
    q, k, v = (torch.randn(B, h, N, d, generator=gen).to(device, dtype) for _ in range(3))
    w2c, K = cameras(B, V, image, device, gen)
    return q, k, v, w2c, K, patches, image


class Unsupported(Exception):
    """A backend that cannot run this shape (e.g. a head dim its kernels lack): the row records
    the reason as "unsupported" instead of an error, and the run goes on."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def flash_attn_4():
    """FlashAttention-4 (pip `flash-attn-4`, module `flash_attn.cute`): the backend function, or
    the one-line reason it does not import (then its rows say "unavailable").

    Imported here, not at module level: a failed import must not stop the other backends, and
    the import (CuTe-DSL's MLIR libraries, ~235 MB) is paid only when the backend is asked for.
    API (4.0.0b36): `flash_attn_func(q, k, v, softmax_scale=None, causal=False, ...)` on
    (B, N, h, d) fp16/bf16 CUDA tensors (last stride 1: our transposed views pass without a copy),
    returning `(out, lse)` (lse None unless grads or `return_lse`); an autograd function, so
    `.backward()` works. On sm90 (H100) forward and backward both have kernels for head dims 8
    to 256 divisible by 8 (its `_validate_head_dims`; d 48, 64 and 128 pass, not yet run here;
    the sm90 kernels pad d to a multiple of 16, the backward above d 128 to 64); other head dims
    fail that assertion, recorded as unsupported. Each new (head dim, dtype, grad or not)
    compiles on its first call (seconds), which do_bench's untimed first call absorbs.
    """
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # ImportError, or cutlass failing to load its libraries
        return _one_line(e)

    def f(q, k, v, *cam):
        try:
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                softmax_scale=q.shape[-1] ** -0.5)
        except (AssertionError, NotImplementedError) as e:  # its head-dim / arch checks
            raise Unsupported(_one_line(e)) from e
        if isinstance(o, tuple):  # (out, lse)
            o = o[0]
        return o.transpose(1, 2)
    return f


def backends(names=()):
    """Backend name -> function(q, k, v, w2c, K, patches, image) on (B, h, N, d), or -> a string
    saying why it is unavailable. `names` (default all) limits the lazily imported ones."""
    def sdpa(kind):
        def f(q, k, v, *cam):
            with sdpa_kernel([kind]):
                return F.scaled_dot_product_attention(q, k, v)
        return f
    def fused(train=None, infer=None, bwd="auto"):   # None: the module's default forward
        def f(q, k, v, *cam):
            saved = dict(pt._FORWARD), dict(pt._BACKWARD)
            pt.set_forward(train=train, infer=infer)
            pt.set_backward(bwd)      # recorded with the forward call, used by .backward()
            try:
                return pt.prope_attention(q, k, v, *cam)
            finally:
                pt._FORWARD.update(saved[0])
                pt._BACKWARD.update(saved[1])
        return f
    out = {
        "fused_prope": fused(),
        "fused_prope_two_kernel_bwd": fused(bwd="two_kernel"),
        "fused_prope_atomic_bwd": fused(bwd="atomic"),
        "fused_prope_prepass_fwd": fused(train="prepass", infer="prepass"),
        "fused_prope_merged_fwd": fused(train="merged", infer="merged"),
        "reference_prope": lambda q, k, v, *cam: prope_attention_ref(q, k, v, *cam),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    if flash_attn_available():
        out["flash_attn"] = lambda q, k, v, *cam: _flash_attn(q, k, v)
    if not names or "flash_attn_4" in names:
        out["flash_attn_4"] = flash_attn_4()
    return out


def flops(shape, B=None):
    B0, h, d, V, (ph, pw) = shape
    N = V * ph * pw
    return 4.0 * (B or B0) * h * N * N * d


def start():
    """Reset the CUDA peak-memory counter; returns what is allocated now (inputs, ...)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_above(base):
    """Peak bytes allocated since `start()` above its `base`."""
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench(fn, q, k, v, cam, fl):
    from triton.testing import do_bench
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    do = torch.randn_like(q)
    fwd = do_bench(lambda: fn(qg, kg, vg, *cam), warmup=50, rep=300, return_mode="median")

    def step():
        fn(qg, kg, vg, *cam).backward(do)
    both = do_bench(step, warmup=50, rep=400, grad_to_none=[qg, kg, vg], return_mode="median")
    with torch.no_grad():   # inference: no graph, nothing saved
        infer = do_bench(lambda: fn(q, k, v, *cam), warmup=50, rep=300, return_mode="median")
        base = start()
        o = fn(q, k, v, *cam)
        peak_infer = peak_above(base)
        del o
    for t in (qg, kg, vg):
        t.grad = None
    base = start()
    o = fn(qg, kg, vg, *cam)
    peak_fwd = peak_above(base)
    o.backward(do)
    peak_both = peak_above(base)
    del o
    bwd = both - fwd
    return dict(infer_ms=infer, infer_tflops=fl / infer * 1e-9, peak_infer_mib=peak_infer / 2**20,
                fwd_ms=fwd, bwd_ms=bwd, both_ms=both, fwd_tflops=fl / fwd * 1e-9,
                bwd_tflops=2.5 * fl / bwd * 1e-9, both_tflops=3.5 * fl / both * 1e-9,
                peak_fwd_mib=peak_fwd / 2**20, peak_both_mib=peak_both / 2**20)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(shape, dtype):
    """bf16 fused and bf16 reference against a float64 reference (B 1, 2 heads, full N)."""
    q, k, v, w2c, K, patches, image = make(shape, torch.float64, seed=1, B=1, h=2)
    do = torch.randn_like(q)
    res = {}
    for name, fn, dt in (("fp64", prope_attention_ref, torch.float64),
                         ("fused", pt.prope_attention, dtype),
                         ("reference", prope_attention_ref, dtype)):
        ins = [t.detach().to(dtype=dt).clone().requires_grad_(True) for t in (q, k, v)]
        o = fn(*ins, w2c, K, patches, image)
        o.backward(do.to(dt))
        res[name] = [o.detach()] + [t.grad for t in ins]
        with torch.no_grad():   # the inference forward (no graph: see set_forward)
            res[name].append(fn(*(t.detach() for t in ins), w2c, K, patches, image))
    out = {}
    want = res["fp64"][:4] + [res["fp64"][0]]
    for name in ("fused", "reference"):
        out[name] = {n: rel(a, b) for n, a, b in zip(("o", "dq", "dk", "dv", "o_infer"),
                                                       res[name], want)}
    out["ratio"] = {n: out["fused"][n] / out["reference"][n] for n in out["fused"]}
    return out


def sweep(shape, dtype, log, kinds=None):
    """Time each kernel alone for each config; keep the fastest per (kernel, padded d)."""
    from triton.testing import do_bench
    q, k, v, w2c, K, patches, image = make(shape, dtype, seed=2)
    d = q.shape[-1]
    dp = pt._padded(d)
    g = pt._geometry(w2c, K, patches, image, d, q.device)
    o, lse = pt._forward(q, k, v, g)
    do = torch.randn_like(q)
    kp, vp, qp, dop, dq = (torch.empty_like(t) for t in (k, v, q, q, q))
    for x, y, which in ((k, kp, pt.KV), (v, vp, pt.KV), (q, qp, pt.QT), (do, dop, pt.QT)):
        pt._transform(x, y, g, which, False)
    delta = torch.empty_like(lse)
    dk, dv = kp.clone(), vp.clone()
    runs = {"fwd": lambda: pt._launch_fwd(q, kp, vp, o, lse, g),
            "merged": lambda: fm.forward_merged(q, k, v, g, patches),
            "dq": lambda: pt._launch_dq(qp, dop, kp, vp, o, do, dq, lse, delta, g),
            "dkdv": lambda: pt._launch_dkdv(qp, dop, dk, dv, lse, delta)}
    best = {}
    fl = flops(shape)
    sweeps = dict(SWEEP, merged=fm.SWEEP_CONFIGS.get(d, fm.SWEEP_CONFIGS[dp]))
    for kind, cfgs in sweeps.items():
        if kinds and kind not in kinds:
            continue
        tma_choices = (True, False) if kind in ("fwd", "dq", "dkdv") else (pt._TMA,)
        for c, tma in [(c, t) for c in cfgs for t in tma_choices]:
            cfg = pt.FusedConfig(*c)
            pt.set_config(kind, dp, cfg)
            pt._TMA = tma
            try:
                t0 = time.time()
                runs[kind]()
                torch.cuda.synchronize()
                compile_s = time.time() - t0
                ms = do_bench(runs[kind], warmup=25, rep=100, return_mode="median")
            except Exception as e:  # out of shared memory / registers: skip the config
                log.append(dict(kind=kind, d=d, cfg=c, tma=tma, error=repr(e)[:200]))
                print(f"sweep {kind} d={d} {c} tma={tma}: {repr(e)[:120]}", flush=True)
                continue
            share = {"fwd": 1.0, "merged": 1.0, "dq": 1.0, "dkdv": 1.5}[kind]  # rough split of 2.5x
            log.append(dict(kind=kind, d=d, cfg=c, tma=tma, ms=ms, compile_s=compile_s,
                            tflops=share * fl / ms * 1e-9))
            print(f"sweep {kind} d={d} {c} tma={tma}: {ms:.3f} ms "
                  f"{share * fl / ms * 1e-9:.0f} TFLOP/s (compile {compile_s:.1f} s)", flush=True)
            if kind not in best or ms < best[kind][1]:
                best[kind] = (c, ms, tma)
        pt.set_config(kind, dp, pt.FusedConfig(*best[kind][0]) if kind in best else None)
        if kind in best:
            pt._TMA = best[kind][2]
    # the transform pass alone (one tensor), per (tokens per program, warps)
    xf = []
    for bt, warps in ((64, 4), (32, 4), (128, 4), (64, 8), (128, 8), (32, 2)):
        pt._XFORM_BLOCK, pt._XFORM_WARPS = bt, warps
        try:
            ms = do_bench(lambda: pt._transform(k, kp, g, pt.KV, False), warmup=25, rep=100,
                          return_mode="median")
        except Exception as e:
            print(f"xform d={d} {bt} {warps}: {repr(e)[:120]}", flush=True)
            continue
        gbs = 2 * k.numel() * k.element_size() / ms * 1e-6
        log.append(dict(kind="xform", d=d, block=bt, warps=warps, ms=ms, gbs=gbs))
        print(f"xform d={d} tokens {bt} warps {warps}: {ms:.3f} ms {gbs:.0f} GB/s", flush=True)
        xf.append((ms, bt, warps))
    if xf:
        _, pt._XFORM_BLOCK, pt._XFORM_WARPS = min(xf)
    return {k2: (v2[0], v2[2]) for k2, v2 in best.items()}


def env_info():
    def version(dist):  # of an optional package, or None
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
                flash_attn_4=version("flash-attn-4"), cutlass_dsl=version("nvidia-cutlass-dsl"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def table(results):
    lines = ["| shape | backend | inference fwd TFLOP/s | fwd TFLOP/s | bwd TFLOP/s | "
             "fwd+bwd TFLOP/s | inference fwd ms | fwd ms | fwd+bwd ms | peak inference fwd MiB | "
             "peak fwd MiB | peak fwd+bwd MiB |", "|" + "---|" * 12]
    for shape, rows in results.items():
        for name, r in rows.items():
            why = next((k for k in ("unavailable", "unsupported", "error") if k in r), None)
            if why:
                lines.append(f"| {shape} | {name} | {why}: {r[why][:60]} ||||||||||")
                continue
            lines.append(f"| {shape} | {name} | {r['infer_tflops']:.0f} | {r['fwd_tflops']:.0f} | "
                         f"{r['bwd_tflops']:.0f} | {r['both_tflops']:.0f} | {r['infer_ms']:.3f} | "
                         f"{r['fwd_ms']:.3f} | {r['both_ms']:.3f} | {r['peak_infer_mib']:.0f} | "
                         f"{r['peak_fwd_mib']:.0f} | {r['peak_both_mib']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--backends", default="")
    ap.add_argument("--check", action="store_true", help="bf16 error vs float64, fused and ref")
    ap.add_argument("--sweep", action="store_true", help="pick block configs per head dim")
    ap.add_argument("--sweep-shapes", default="d64,head_d128",
                    help="shapes to sweep on (configs are per padded head dim: d48 runs as 64)")
    ap.add_argument("--sweep-kinds", default="", help="kernels to sweep (default all): "
                    + ",".join(SWEEP))
    ap.add_argument("--list", action="store_true",
                    help="print the backends (those of --backends) and whether each is available, "
                         "then exit; needs no GPU")
    args = ap.parse_args()
    wanted = [x for x in args.backends.split(",") if x]
    if args.list:
        for name, fn in backends(wanted).items():
            if not wanted or name in wanted:
                print(f"{name}: {'unavailable: ' + fn if isinstance(fn, str) else 'available'}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16
    report = dict(env=env_info(), shapes={k: SHAPES[k] for k in args.shapes.split(",")})

    def save():
        (out / "profile_kernels.json").write_text(json.dumps(report, indent=1, default=str))

    if args.check:
        report["check"] = {}
        for name in args.shapes.split(","):
            report["check"][name] = check(SHAPES[name], dtype)
            print("check", name, json.dumps(report["check"][name]["ratio"]), flush=True)
            save()
    if args.sweep:
        report["sweep_log"], report["configs"] = [], {}
        for name in args.sweep_shapes.split(","):
            best = sweep(SHAPES[name], dtype, report["sweep_log"],
                         [x for x in args.sweep_kinds.split(",") if x])
            report["configs"][SHAPES[name][2]] = best
            print("best", name, best, flush=True)
            save()
    report["results"] = {}
    bks = backends(wanted)
    if wanted:
        bks = {k: v for k, v in bks.items() if k in wanted}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        q, k, v, w2c, K, patches, image = make(shape, dtype)
        cam = (w2c, K, patches, image)
        report["results"][name] = {}
        for bname, fn in bks.items():
            if isinstance(fn, str):  # not importable: the reason
                r = dict(unavailable=fn)
            else:
                try:
                    r = bench(fn, q, k, v, cam, flops(shape))
                except Unsupported as e:
                    r = dict(unsupported=str(e)[:300])
                except Exception as e:
                    r = dict(error=repr(e)[:300])
            report["results"][name][bname] = r
            times = {k2: round(v2, 3) for k2, v2 in r.items() if isinstance(v2, float)}
            print(name, bname, times or r, flush=True)
            save()
        torch.cuda.empty_cache()
    md = table(report["results"])
    env = report["env"]
    (out / "profile_kernels.md").write_text(
        f"# Attention kernels on {env['device']}\n\n{json.dumps(env)}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
