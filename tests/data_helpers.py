"""Shared helpers for the data streaming tests: tiny datasets and simulated ranks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NUM_RECORDS = 16
TINY = dict(num_views=3, view_window=6, min_sources=1, max_sources=2,
            resolutions=[(14, 14), (14, 28)], batch_size=2, num_workers=2, seed=5)


def prepare_data(*argv) -> int:
    """`launch/prepare_data.py argv... --no-progress` in this process; returns its exit code."""
    import runpy

    main = runpy.run_path(str(ROOT / "launch" / "prepare_data.py"))["main"]
    return main([str(a) for a in argv] + ["--no-progress"])


def tiny_sequences(n=NUM_RECORDS, fmt="png"):
    from gld.data.synthetic import synthetic_sequences

    return synthetic_sequences(n, seed=1, num_frames=8, size=(20, 30), image_format=fmt)


def cfg_dict(source, paths=(), **kw) -> dict:
    d = dict(TINY, source=source, paths=list(paths), synthetic_scenes=NUM_RECORDS)
    d.update(kw)
    return d


def run_ranks(cfg: dict, world: int, resume_after=None, epochs=1) -> list[dict]:
    """`world` ranks as concurrent processes (like torchrun on one node), each with its
    DataLoader workers; returns each rank's result (see tests/data_rank.py)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    logdir = Path(tempfile.mkdtemp(prefix="gld-ranks-"))
    procs, files = [], []
    for rank in range(world):
        args = json.dumps(dict(cfg=cfg, rank=rank, world=world, port=port,
                               resume_after=resume_after, epochs=epochs))
        out, err = open(logdir / f"{rank}.out", "w+"), open(logdir / f"{rank}.err", "w+")
        files.append((out, err))
        # Own process group: on failure the rank AND its DataLoader workers are killed.
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.data_rank", args], cwd=ROOT,
                                      env=env, stdout=out, stderr=err, start_new_session=True))

    def kill_all():
        for q in procs:
            try:
                os.killpg(q.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            q.wait()

    deadline = time.time() + 300
    try:
        while any(q.poll() is None for q in procs):
            failed = any(q.returncode not in (None, 0) for q in procs)
            if failed or time.time() > deadline:  # a peer would wait on the barrier forever
                kill_all()
                break
            time.sleep(0.1)
        texts = []
        for out, err in files:
            out.seek(0)
            err.seek(0)
            texts.append((out.read(), err.read()))
    finally:
        kill_all()
        for out, err in files:
            out.close()
            err.close()
        shutil.rmtree(logdir, ignore_errors=True)
    results = []
    for rank, (p, (out, err)) in enumerate(zip(procs, texts)):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            logs = "\n".join(f"--- rank {r} (exit {q.returncode}):\n{e[-4000:]}"
                             for r, (q, (_, e)) in enumerate(zip(procs, texts)))
            raise AssertionError(f"rank {rank} failed:\n{logs}")
        results.append(json.loads(lines[-1][7:]))
    return results


def in_process_rank(cfg: dict, rank: int, world: int, resume_after=None, epochs=1) -> dict:
    """Same as run_rank for backends that take the rank as an argument (synthetic, wds)."""
    from tests.data_rank import digest
    from gld.data.config import DataConfig
    from gld.configtypes import from_dict
    from gld.data.streaming import build_loader

    c = from_dict(DataConfig, cfg)
    c.validate()
    loader = build_loader(c, rank=rank, world_size=world)
    out = {"full": [digest(b) for _ in range(epochs) for b in loader]}
    if resume_after is not None:
        loader = build_loader(c, rank=rank, world_size=world)
        first = []
        for b in loader:
            first.append(digest(b))
            if len(first) == resume_after:
                break
        state = json.loads(json.dumps(loader.state_dict()))
        loader = build_loader(c, rank=rank, world_size=world)
        loader.load_state_dict(state)
        rest = [digest(b) for b in loader]
        for _ in range(epochs - 1 - state["epoch"]):
            rest += [digest(b) for b in loader]
        out.update(first=first, resumed=rest, state=state)
    return out


def check_exactly_once(results: list[dict], num_records: int, epochs: int = 1) -> None:
    """Every record exactly once per epoch across ranks; ranks agree on steps and
    resolutions; both resolutions are used; epochs differ in order."""
    orders = []
    for e in range(epochs):
        ids = Counter()
        per_rank_steps = []
        for res in results:
            batches = [b for b in res["full"] if b[0] == e]
            per_rank_steps.append([(b[1], tuple(b[3])) for b in batches])
            for b in batches:
                ids.update(b[2])
        assert sorted(ids) == list(range(num_records)), sorted(ids)
        assert set(ids.values()) == {1}, {k: v for k, v in ids.items() if v != 1}
        assert all(s == per_rank_steps[0] for s in per_rank_steps)  # same steps, same (H, W)
        assert [s for s, _ in per_rank_steps[0]] == list(range(len(per_rank_steps[0])))
        assert len({hw for _, hw in per_rank_steps[0]}) == 2
        orders.append([i for res in results for b in res["full"] if b[0] == e for i in b[2]])
    if epochs > 1:
        assert orders[0] != orders[1]


def check_resume(result: dict, k: int) -> None:
    """After k steps + state_dict + a fresh loader, the rest equals the uninterrupted run."""
    assert result["first"] == result["full"][:k]
    assert result["resumed"] == result["full"][k:k + len(result["resumed"])]
    assert len(result["first"]) + len(result["resumed"]) == len(result["full"])
