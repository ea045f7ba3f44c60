"""One rank of a trainer test: `torchrun --nproc_per_node N tests/train_worker.py '<json>'` or
plain `python tests/train_worker.py '<json>'` (a world of 1).

JSON keys: train (TrainConfig fields), data (DataConfig fields), nan_step / nan_rank (the
TinyStage's NaN), step_sleep (seconds slept after every step: time for a test to kill -9),
exit_before_publish_at (os._exit(3) on every rank once checkpoint k's files are written, before
COMPLETE / latest: a kill during the write), reference_ema (rank 0 keeps an EMA of the
gathered full weights, plain torch, to compare with the sharded one), report_at_start (dump the
weights and EMA right after construction/resume).

Writes <train.out_dir>/report_rank{r}.json: sharding (parameter / Adam-state elements held),
seen (step, sample ids), checksums per step (sum of the gathered weights), error (the
exception's message, if any); `pid_rank{r}` (this process's id, for kill -9); and on rank 0 `live.pt` (gathered live weights and the reference
EMA at the end) and `start.pt` (report_at_start).
"""
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gathered(module):
    """{name: full fp32 weights} on every rank (ZeRO-3: GatheredParameters, a collective)."""
    import deepspeed
    import torch

    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().float().clone() for n, p in params}


def main(args: dict) -> None:
    import torch

    from gld.configtypes import from_dict
    from gld.data.config import DataConfig
    from gld.data.streaming import build_loader
    from gld.train.config import TrainConfig
    from gld.train.engine import misaligned_parameters, setup_distributed
    from gld.train.trainer import Callback, Trainer, seed_everything
    from tests.train_stage import TinyStage

    tcfg = from_dict(TrainConfig, args["train"])
    dcfg = from_dict(DataConfig, args["data"])
    rank, world, _ = setup_distributed("cpu")
    seed_everything(tcfg.seed)  # the same initial weights on every rank
    stage = TinyStage(args.get("nan_step"), args.get("nan_rank"))
    loader = build_loader(dcfg, "train")
    report = {"rank": rank, "world": world, "checksums": {}, "error": None}
    out = Path(tcfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid_rank{rank}").write_text(str(os.getpid()))  # for the kill -9 test
    ref_ema: dict = {}

    class Probe(Callback):
        def on_step(self, trainer, step, metrics):
            full = gathered(trainer.engine.module)
            report["checksums"][step] = float(sum(v.double().sum() for v in full.values()))
            if args.get("reference_ema") and rank == 0:
                d = tcfg.ema_decay
                for n, v in full.items():
                    ref_ema[n] = ref_ema[n].lerp(v, 1 - d) if n in ref_ema else v
            if args.get("step_sleep"):
                time.sleep(args["step_sleep"])

        def on_checkpoint_written(self, trainer, step, folder):
            if step == args.get("exit_before_publish_at"):
                os._exit(3)

    trainer = None
    try:
        trainer = Trainer(stage, tcfg, loader, run_config={"train": args["train"],
                                                           "data": args["data"]},
                          callbacks=[Probe()], progress=False)
        report["resume_meta"] = trainer.resume_meta
        if args.get("reference_ema") and rank == 0:
            ref_ema.update(gathered(trainer.engine.module))
        elif args.get("reference_ema"):
            gathered(trainer.engine.module)
        from gld.train.checkpoint import export_model

        if args.get("report_at_start"):
            raw = export_model(trainer.te, "raw")
            ema = export_model(trainer.te, "ema", ema=trainer.ema) if trainer.ema else None
            if rank == 0:
                torch.save({"raw": raw, "ema": ema, "lr": trainer.te.scheduler.get_last_lr(),
                            "step": trainer.step}, out / "start.pt")
        trainer.train()
        report["sharding"] = sharding(trainer)
        report["misaligned"] = misaligned_parameters(trainer.engine.module)
        full = gathered(trainer.engine.module)
        if rank == 0:
            torch.save({"live": full, "ref_ema": ref_ema}, out / "live.pt")
        # Leave together: a rank exiting while its peer is still in a gloo call aborts the peer.
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # reported to the test, then re-raised for the exit status
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        report["seen"] = stage.seen
        out.mkdir(parents=True, exist_ok=True)
        (out / f"report_rank{rank}.json").write_text(json.dumps(report))


def sharding(trainer) -> dict:
    """Elements this rank holds after training: parameters (ZeRO-3 partitions or whole), the
    optimizer's fp32 weights (ZeRO partitions) and the Adam moments."""
    module = trainer.engine.module
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
               for p in module.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    opt = trainer.te.optimizer
    zopt = trainer.engine.optimizer  # DeepSpeed's ZeRO wrapper holds the fp32 partitions
    flat = (getattr(zopt, "fp32_partitioned_groups_flat", None)
            or getattr(zopt, "single_partition_of_fp32_groups", None)
            or [p for g in opt.param_groups for p in g["params"]])
    master = sum(p.numel() for p in flat)
    adam = sum(st["exp_avg"].numel() + st["exp_avg_sq"].numel()
               for st in opt.state.values() if "exp_avg" in st)
    return {"param_held": held, "param_full": full, "master_held": master, "adam_held": adam}


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
