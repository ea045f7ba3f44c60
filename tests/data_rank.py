"""One simulated rank of a multi-rank data test, run as `python -m tests.data_rank '<json>'`.

The JSON holds: cfg (DataConfig fields), rank, world, port, resume_after (k or null), epochs.
All ranks run at once, as torchrun starts them on one node: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE are set and a gloo process group is initialised before any dataset exists
(mosaicml-streaming uses it for its barriers; the ranks share the node's shared memory and
shard cache). Prints one JSON line: {"full": [batch digests], "resumed": [...], "state": ...},
where a batch digest is (epoch, step, sample ids, H, W, frame indices, source mask, pixel sum).
"""
import json
import os
import sys


def digest(b) -> list:
    return [int(b["epoch"]), int(b["step"]), b["sample_id"].tolist(),
            list(b["images"].shape[-2:]), b["frame_indices"].tolist(),
            b["source_mask"].int().tolist(), int(b["images"].long().sum()),
            round(float(b["K"].double().sum()), 6)]


def main(args: dict) -> dict:
    os.environ.update(RANK=str(args["rank"]), WORLD_SIZE=str(args["world"]),
                      LOCAL_WORLD_SIZE=str(args["world"]), LOCAL_RANK=str(args["rank"]),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args["port"]))
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=args["rank"], world_size=args["world"])

    from gld.data.config import DataConfig
    from gld.configtypes import from_dict
    from gld.data.streaming import build_loader

    cfg = from_dict(DataConfig, args["cfg"])
    cfg.validate()
    out = {"full": []}
    loader = build_loader(cfg)
    for _ in range(args.get("epochs", 1)):
        out["full"] += [digest(b) for b in loader]
    out["skipped"] = loader.num_skipped
    k = args.get("resume_after")
    if k is not None:
        del loader
        gc.collect()
        loader = build_loader(cfg)
        first = []
        for b in loader:
            first.append(digest(b))
            if len(first) == k:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint would hold it
        del loader
        gc.collect()
        loader = build_loader(cfg)
        loader.load_state_dict(state)
        rest = []
        for _ in range(args.get("epochs", 1)):
            rest += [digest(b) for b in loader]
            if state["epoch"] + 1 >= args.get("epochs", 1):
                break
        out.update(first=first, resumed=rest, state=state)
    dist.barrier()
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))))
