"""GPU benchmark of the DA3 encoder (gld.encoders.da3) against the official package.

    PYTHONPATH=$PWD python3 launch/bench_encoder.py --out $OUT/da3_encode.json
    [--variants da3-small,da3-base,da3-large] [--sizes 504x504,280x504] [--views 8]
    [--modes eager,graph,compile,compile+graph] [--compile-variants ...] [--official]

For each variant and size (batch 1, V views, random weights, bf16 autocast as the official API;
heads in fp32): median CUDA-event time of `encode`, of `encode` + `geometry` (DPT head and
camera decoder) and of `propagate` from level 1, after warm-up, rotating 4 input batches. Modes:
"graph" replays each call as one CUDA graph (gld.encoders.da3.cuda_graph), "compile" applies
torch.compile to each backbone block from here (the model stays a plain module). Reports images/s, achieved TFLOP/s
(backbone FLOPs counted analytically: 24 T C^2 per block + 4 n^2 C per attention + patch
embedding; heads counted with torch's FlopCounterMode) and the fraction of the measured bf16
matmul ceiling (docs/gpu.md). `--official` also times depth-anything-3==0.1.1 on the same GPU
(its backbone with the API's default reference-view selection, and its whole network), and
checks our bf16 levels against it with identical weights. Writes a table and JSON; partial
results are written after every measurement.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gld.checkpoints.da3 import ours_to_official
from gld.encoders import DA3, Level
from gld.encoders.da3.cuda_graph import GraphedCall
from kernels.attention import use_backend
from gld.encoders.da3.config import resolve_variant

CEILING_TFLOPS = 751.0  # bf16 dense matmul 8192^3, H100 (docs/gpu.md)
ANCHORS_MS = {  # official release on the same H100 model (docs/gpu.md), 8 views, bf16
    ("da3-base", "504x504", "encode"): 35.8, ("da3-base", "280x280", "encode"): 34.2,
    ("da3-base", "504x504", "encode+heads"): 61.7, ("da3-small", "504x504", "encode"): 28.9,
    ("da3-large", "504x504", "encode"): 74.1,
}


def backbone_flops(cfg, views: int, H: int, W: int, batch: int = 1) -> float:
    n = 1 + (H // 14) * (W // 14)
    tokens = batch * views * n
    C = cfg.dim
    linear = 24 * tokens * C * C * cfg.depth
    attn = 0
    for i in range(cfg.depth):
        attn += 4 * batch * (views * n) ** 2 * C if cfg.is_global(i) else 4 * batch * views * n * n * C
    patch = 2 * batch * views * (n - 1) * C * 3 * 14 * 14
    return float(linear + attn + patch)


def time_cuda(fn, inputs, warmup: int, iters: int) -> float:
    """Median milliseconds of fn(x) over `iters` calls, inputs rotating."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def head_flops(model, levels, size) -> float:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            model.geometry(levels, size)
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 (a counting failure must not stop the benchmark)
        print(f"head FLOP count failed: {err}", file=sys.stderr)
        return float("nan")


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g).to(p.device)
            if p.dim() == 1:
                p.copy_(1 + 0.1 * r if p.shape[0] > 8 else 0.1 * r)
            else:
                p.copy_(r * (0.5 if p.shape[0] == 1 else p[0].numel() ** -0.5))


def official_net(variant: str):
    from depth_anything_3.cfg import create_object, load_config

    return create_object(load_config(f"depth_anything_3.configs.{variant}")).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="da3-small,da3-base,da3-large")
    ap.add_argument("--sizes", default="504x504,280x504")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--modes", default="eager,graph,compile,compile+graph")
    ap.add_argument("--compile-variants", default="da3-small,da3-base,da3-large",
                    help="variants that also run the 'compile' mode (compile time is minutes)")
    ap.add_argument("--official", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="da3_encode.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_encoder: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # heads' fp32 convs/matmuls as the official API
    for name in ("cache_size_limit", "recompile_limit"):  # blocks x sizes x rope on/off
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    dev = torch.device("cuda")
    V = args.views
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "views": V, "batch": 1,
        "precision": "backbone bf16 autocast, heads fp32 (TF32 allowed)",
        "ceiling_tflops": CEILING_TFLOPS, "rows": [], "checks": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=1))

    def record(impl, variant, H, W, what, ms, flops, mode, mem):
        row = {"impl": impl, "variant": variant, "size": f"{H}x{W}", "what": what, "mode": mode,
               "ms": round(ms, 3), "images_per_s": round(V * 1000.0 / ms, 1),
               "tflop": round(flops / 1e12, 3), "tflops": round(flops / ms / 1e9, 1),
               "frac_ceiling": round(flops / ms / 1e9 / CEILING_TFLOPS, 3),
               "peak_mem_gib": round(mem / 2 ** 30, 2),
               "anchor_ms": ANCHORS_MS.get((variant, f"{H}x{W}", what))}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    modes = args.modes.split(",")
    for variant in args.variants.split(","):
        cfg = resolve_variant(variant)
        model = DA3(cfg).to(dev)
        randomize(model)
        net = None
        if args.official:
            try:
                net = official_net(variant).to(dev)
                net.load_state_dict({k[len("model."):]: v for k, v in
                                     ours_to_official(model.state_dict()).items()})
            except Exception as err:  # noqa: BLE001
                print(f"official package unavailable: {err}", file=sys.stderr)
                net = None
        for H, W in sizes:
            g = torch.Generator(device="cpu").manual_seed(H * W)
            imgs = [torch.rand(1, V, 3, H, W, generator=g).to(dev) for _ in range(4)]
            flops_bb = backbone_flops(cfg, V, H, W)
            bf16 = torch.bfloat16
            lv = model.encode(imgs[0], amp=bf16)
            grid = (H // 14, W // 14)
            flops_head = head_flops(model, lv, (H, W))
            for mode in modes:
                use_compile, use_graph = "compile" in mode, "graph" in mode
                if use_compile and variant not in args.compile_variants.split(","):
                    continue
                for blk in model.backbone.blocks:
                    if use_compile:
                        blk.compile()
                    else:
                        blk._compiled_call_impl = None  # eager
                torch.cuda.reset_peak_memory_stats()
                try:
                    def enc(x):
                        return model.encode(x, amp=bf16)

                    def full(x):
                        return model.geometry(model.encode(x, amp=bf16), (H, W))

                    def prop(f, c):
                        return model.propagate(Level(f, c, grid), 1, amp=bf16)

                    if use_graph:
                        enc, full, prop = (GraphedCall(enc, imgs[0]), GraphedCall(full, imgs[0]),
                                           GraphedCall(prop, lv[1].features, lv[1].cam_token))
                    ms = time_cuda(enc, imgs, args.warmup, args.iters)
                    record("gld", variant, H, W, "encode", ms, flops_bb, mode,
                           torch.cuda.max_memory_allocated())
                    ms = time_cuda(full, imgs, args.warmup, args.iters)
                    record("gld", variant, H, W, "encode+heads", ms, flops_bb + flops_head, mode,
                           torch.cuda.max_memory_allocated())
                    ms = time_cuda(lambda lv_: prop(lv_.features, lv_.cam_token), [lv[1]],
                                   args.warmup, args.iters)
                    record("gld", variant, H, W, "propagate 1->3", ms, float("nan"), mode,
                           torch.cuda.max_memory_allocated())
                    got = enc(imgs[0])
                    diff = max((a.features - b.features).abs().max().item() /
                               b.features.abs().max().item() for a, b in zip(got, lv))
                    exact = all(torch.equal(a.features, b.features) for a, b in zip(got, lv))
                    result["checks"].append({"variant": variant, "size": f"{H}x{W}",
                                             "check": f"{mode} vs eager levels, max rel diff / "
                                             "bit-exact", "value": [diff, exact]})
                    del enc, full, prop, got
                except Exception as err:  # noqa: BLE001
                    print(f"{variant} {H}x{W} {mode} failed: {type(err).__name__}: {err}",
                          file=sys.stderr)
                    result["checks"].append({"variant": variant, "size": f"{H}x{W}",
                                             "check": f"{mode} failed", "value": str(err)[:300]})
                    save()
                torch.cuda.empty_cache()
            for blk in model.backbone.blocks:
                blk._compiled_call_impl = None
            if net is not None:
                try:
                    x = [model.normalize_images(i) for i in imgs]
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                        ref, _ = net.backbone(x[0], cam_token=None, export_feat_layers=[],
                                              ref_view_strategy="first")
                        diff = max((a.features - b[0]).abs().max().item() / b[0].abs().max().item()
                                   for a, b in zip(lv, ref))
                        exact = all(torch.equal(a.features, b[0]) for a, b in zip(lv, ref))
                    result["checks"].append({"variant": variant, "size": f"{H}x{W}",
                                             "check": "bf16 levels vs official (same weights), max rel "
                                             "diff / bit-exact", "value": [diff, exact]})
                    # Same again with the SDPA backend the official call gets by default.
                    with use_backend("sdpa_flash"):
                        mine = model.encode(imgs[0], amp=bf16)
                    diff = max((a.features - b[0]).abs().max().item() / b[0].abs().max().item()
                               for a, b in zip(mine, ref))
                    exact = all(torch.equal(a.features, b[0]) for a, b in zip(mine, ref))
                    result["checks"].append({"variant": variant, "size": f"{H}x{W}",
                                             "check": "bf16 levels vs official, both on SDPA flash, "
                                             "max rel diff / bit-exact", "value": [diff, exact]})

                    def off_encode(xi):
                        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                            return net.backbone(xi, cam_token=None, export_feat_layers=[])

                    def off_full(xi):
                        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                            return net(xi)

                    torch.cuda.reset_peak_memory_stats()
                    ms = time_cuda(off_encode, x, args.warmup, args.iters)
                    record("official", variant, H, W, "encode", ms, flops_bb, "eager",
                           torch.cuda.max_memory_allocated())
                    ms = time_cuda(off_full, x, args.warmup, args.iters)
                    record("official", variant, H, W, "encode+heads", ms, flops_bb + flops_head,
                           "eager", torch.cuda.max_memory_allocated())
                except Exception as err:  # noqa: BLE001
                    print(f"official {variant} {H}x{W} failed: {err}", file=sys.stderr)
        del model, net
        torch.cuda.empty_cache()

    lines = ["| impl | variant | size | what | mode | ms | images/s | TFLOP | TFLOP/s | "
             "of ceiling | peak GiB | anchor ms |", "|" + "---|" * 12]
    for r in result["rows"]:
        lines.append(f"| {r['impl']} | {r['variant']} | {r['size']} | {r['what']} | {r['mode']} | "
                     f"{r['ms']:.2f} | {r['images_per_s']} | {r['tflop']} | {r['tflops']} | "
                     f"{100 * r['frac_ceiling']:.1f}% | {r['peak_mem_gib']} | "
                     f"{r['anchor_ms'] or ''} |")
    result["table_md"] = "\n".join(lines)
    save()
    print(f"\n{result['device']}, torch {result['torch']}, CUDA {result['cuda']}, {V} views, "
          "batch 1, bf16 autocast\n" + result["table_md"])
    for c in result["checks"]:
        print(c)


if __name__ == "__main__":
    main()
