"""One simulated rank of a multi-rank data test, run as `python -m tests.data_rank '<json>'`.

The JSON holds: cfg (DataConfig fields), rank, world, resume_after (k or null), epochs.
Environment for mosaicml-streaming (set before it is imported): RANK, WORLD_SIZE, and
LOCAL_WORLD_SIZE=1 / LOCAL_RANK=0 so every simulated rank is its own node with its own cache
(infra.md). Prints one JSON line: {"full": [batch digests], "resumed": [...], "state": ...},
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
                      LOCAL_WORLD_SIZE="1", LOCAL_RANK="0")
    import gc

    from gld.config import DataConfig
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
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))))
