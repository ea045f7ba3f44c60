"""GPU benchmark of the DA3 encoder (gld.encoders.da3) against the official package.

    python launch/bench_encoder.py --out $OUT/da3_encode.json
    [--variants da3-small,da3-base,da3-large] [--sizes 504x504,280x504] [--views 8]
    [--modes eager,graph,compile,compile+graph] [--compile-variants ...] [--official]

For each variant and size (batch 1, V views, random weights, bf16 autocast as the official API;
heads in fp32): median CUDA-event time of `encode`, of `encode` + `geometry` (DPT head and
camera decoder) and of `propagate` from level 1, after warm-up, rotating 4 input batches
(`gld.encoders.da3.measure.encoder_calls`). Modes: "graph" replays each call as one CUDA graph
(gld.encoders.da3.cuda_graph), "compile" applies torch.compile to each backbone block (the model
stays a plain module). Reports images/s, achieved TFLOP/s (backbone FLOPs counted analytically,
heads with torch's FlopCounterMode: gld.encoders.da3.measure) and the fraction of the bf16
matmul ceiling measured in the same run (docs/gpu.md). `--official` also times
depth-anything-3==0.1.1 on the same GPU (its backbone with the API's default reference-view
selection, and its whole network), and checks our bf16 levels against it with identical
weights. Writes a table and JSON; the JSON is rewritten after every measurement.
"""
from __future__ import annotations

import argparse
import sys

import torch

from gld.checkpoints.da3 import ours_to_official
from gld.encoders.da3 import DA3, resolve_variant
from gld.encoders.da3.measure import (
    backbone_flops, compile_blocks, encoder_calls, head_flops, randomize_,
)
from kernels.benchmarking import (
    PeakMemory, env_info, markdown_table, matmul_ceiling_tflops, require_cuda, tflops, time_ms_rotating,
    write_results,
)

BF16 = torch.bfloat16
ANCHORS_MS = {("da3-base", "504x504", "encode"): 35.1}  # official package, H200 (docs/gpu.md)
COLUMNS = ("impl", "variant", "size", "what", "mode", "ms", "images_per_s", "tflop", "tflops",
           "frac_ceiling", "peak_mem_gib", "anchor_ms")  # JSON row fields, as in earlier results
HEADER = ("impl", "variant", "size", "what", "mode", "ms", "images/s", "TFLOP", "TFLOP/s",
          "of ceiling", "peak GiB", "anchor ms")


def parse_args(argv=None) -> argparse.Namespace:
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
    return ap.parse_args(argv)


def level_diff(got, want) -> list:
    """[max relative difference over the levels' features, bit-exact]."""
    return [max((a.features - b).abs().max().item() / b.abs().max().item()
                for a, b in zip(got, want)),
            all(torch.equal(a.features, b) for a, b in zip(got, want))]


class Run:
    """One run's rows and checks; the JSON is rewritten after each one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.result = {**env_info(), "views": args.views, "batch": 1,
                       "precision": "backbone bf16 autocast, heads fp32 (TF32 allowed)",
                       "ceiling_tflops": round(matmul_ceiling_tflops(), 1), "rows": [], "checks": []}

    def time(self, impl, variant, size, what, mode, fn, inputs, flop) -> None:
        with PeakMemory() as mem:
            ms = time_ms_rotating(lambda a: fn(*a), inputs, self.args.warmup, self.args.iters)
            peak = mem.base + mem.now_mib() * 2 ** 20
        rate = tflops(flop, ms)
        row = dict(zip(COLUMNS, (impl, variant, size, what, mode, round(ms, 3),
                                 round(self.args.views * 1000.0 / ms, 1), round(flop / 1e12, 3),
                                 round(rate, 1), round(rate / self.result["ceiling_tflops"], 3),
                                 round(peak / 2 ** 30, 2), ANCHORS_MS.get((variant, size, what)))))
        self.result["rows"].append(row)
        print(row, flush=True)
        write_results(self.args.out, self.result)

    def check(self, variant, size, check, value) -> None:
        self.result["checks"].append({"variant": variant, "size": size, "check": check,
                                      "value": value})
        write_results(self.args.out, self.result)


def official_net(variant: str, model: DA3):
    """depth-anything-3's network with `model`'s weights, or None without the package."""
    try:
        from depth_anything_3.cfg import create_object, load_config
    except ImportError as err:
        print(f"official package unavailable: {err}", file=sys.stderr)
        return None
    net = create_object(load_config(f"depth_anything_3.configs.{variant}")).eval().cuda()
    net.load_state_dict({k[len("model."):]: v for k, v in
                         ours_to_official(model.state_dict()).items()})
    return net


def bench_official(run: Run, model: DA3, net, variant, size, imgs, eager, flop) -> None:
    x = [(model.normalize_images(i),) for i in imgs]

    @torch.no_grad()
    def official(xi, whole=False, **kw):
        with torch.autocast("cuda", dtype=BF16):
            return net(xi) if whole else net.backbone(xi, cam_token=None, export_feat_layers=[],
                                                      **kw)

    ref = [feat for feat, _ in official(x[0][0], ref_view_strategy="first")[0]]
    run.check(variant, size, "bf16 levels vs official (same weights), max rel diff / "
              "bit-exact", level_diff(eager, ref))
    backend = model.attention_backend
    try:  # the SDPA backend the official call gets by default
        mine = model.set_attention_backend("sdpa_flash").encode(imgs[0], amp=BF16)
    finally:
        model.set_attention_backend(backend)
    run.check(variant, size, "bf16 levels vs official, both on SDPA flash, max rel diff / "
              "bit-exact", level_diff(mine, ref))
    run.time("official", variant, size, "encode", "eager", official, x, flop["encode"])
    run.time("official", variant, size, "encode+heads", "eager",
             lambda xi: official(xi, whole=True), x, flop["encode+heads"])


def bench_size(run: Run, model: DA3, net, variant: str, H: int, W: int) -> None:
    args, cfg, size = run.args, model.config, f"{H}x{W}"
    g = torch.Generator().manual_seed(H * W)
    imgs = [torch.rand(1, args.views, 3, H, W, generator=g).cuda() for _ in range(4)]
    eager = model.encode(imgs[0], amp=BF16)
    flop = {"encode": backbone_flops(cfg, args.views, H, W), "propagate 1->3": float("nan")}
    flop["encode+heads"] = flop["encode"] + head_flops(model, eager, (H, W))
    inputs = {"encode": [(x,) for x in imgs], "encode+heads": [(x,) for x in imgs],
              "propagate 1->3": [(eager[1].features, eager[1].cam_token)]}
    for mode in args.modes.split(","):
        if "compile" in mode and variant not in args.compile_variants.split(","):
            continue
        compile_blocks(model, "compile" in mode)
        try:
            examples = {k: v[0] for k, v in inputs.items()} if "graph" in mode else None
            calls = encoder_calls(model, (H, W), BF16, examples)
            for what, fn in calls.items():
                run.time("gld", variant, size, what, mode, fn, inputs[what], flop[what])
            run.check(variant, size, f"{mode} vs eager levels, max rel diff / bit-exact",
                      level_diff(calls["encode"](imgs[0]), [lv.features for lv in eager]))
            del calls
        except Exception as err:  # noqa: BLE001 (one failing mode must not end the run)
            print(f"{variant} {size} {mode} failed: {type(err).__name__}: {err}", file=sys.stderr)
            run.check(variant, size, f"{mode} failed", str(err)[:300])
        torch.cuda.empty_cache()
    compile_blocks(model, False)
    if net is not None:
        try:
            bench_official(run, model, net, variant, size, imgs, eager, flop)
        except Exception as err:  # noqa: BLE001
            print(f"official {variant} {size} failed: {err}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    require_cuda("launch/bench_encoder.py")
    torch.backends.cuda.matmul.allow_tf32 = True  # heads' fp32 convs/matmuls as the official API
    for name in ("cache_size_limit", "recompile_limit"):  # blocks x sizes x rope on/off
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    run = Run(args)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    for variant in args.variants.split(","):
        model = randomize_(DA3(resolve_variant(variant))).cuda()
        net = official_net(variant, model) if args.official else None
        for H, W in sizes:
            bench_size(run, model, net, variant, H, W)
        del model, net
        torch.cuda.empty_cache()
    rows = [[f"{r['ms']:.2f}" if c == "ms" else f"{100 * r[c]:.1f}%" if c == "frac_ceiling"
             else "" if r[c] is None else r[c] for c in COLUMNS] for r in run.result["rows"]]
    run.result["table_md"] = markdown_table(HEADER, rows)
    write_results(args.out, run.result)
    print(f"\n{run.result['device']}, torch {run.result['torch']}, CUDA {run.result['cuda']}, "
          f"{args.views} views, batch 1, bf16 autocast\n{run.result['table_md']}")
    for c in run.result["checks"]:
        print(c)


if __name__ == "__main__":
    main()
