"""The DeepSpeed trainer on 2 gloo ranks (torchrun) against 1 rank, with kills and resumes.

Every run is `tests/train_worker.py` on the synthetic world (16 scenes, 2 views at 28x28) with
the TinyStage (tests/train_stage.py), fp32 unless said: 8 optimizer steps of global batch 4
(2 ranks x 2, or 1 rank x 4, or 1 rank x 2 x grad_accum 2), so the 4 steps of an epoch and an
epoch boundary are crossed. Runs are launched once per session, on first use, and shared.

Tolerance of "2 ranks = 1 rank" (fp32): the same samples and arithmetic except the order of
reductions (per-rank means then the mean of 2, gradients all-reduced by DeepSpeed instead of one
backward over 4 samples): each step's gradient differs by a few fp32 ulps (~1e-7 relative), Adam's
update g / sqrt(v) keeps that relative size, and 8 steps add them up: losses agree to ~1e-6
relative (measured: 2.3e-7 at most over the 8 steps); the bound is 2e-6 relative.

TORCH_EXTENSIONS_DIR points at an empty folder and must stay empty: no JIT-built op.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

DATA = {"source": "synthetic", "synthetic_scenes": 16, "num_views": 2, "max_sources": 1,
        "view_window": 4, "resolutions": [[28, 28]], "batch_size": 2, "num_workers": 0}
TRAIN = {"steps": 8, "lr": 0.01, "min_lr": 0.001, "warmup_steps": 2, "schedule": "cosine",
         "weight_decay": 0.01, "grad_clip": 1.0, "precision": "fp32", "ema_decay": 0.9,
         "save_every": 2, "keep_last": 0, "log_every": 1, "resume": "auto", "seed": 3}
LOSS_RTOL = 2e-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train_dist")


def _env(work: Path) -> dict:
    ext = work / "torch_extensions"
    ext.mkdir(exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu",
                TORCH_EXTENSIONS_DIR=str(ext))


def _cmd(ranks: int, args: dict) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable])
    return launcher + [str(ROOT / "tests" / "train_worker.py"), json.dumps(args)]


def _args(out: Path, train=None, data=None, **extra) -> dict:
    return {"train": {**TRAIN, "out_dir": str(out), **(train or {})},
            "data": {**DATA, **(data or {})}, **extra}


def launch(work: Path, name: str, ranks: int, train=None, data=None, expect_ok=True,
           **extra) -> Path:
    out = work / name
    r = subprocess.run(_cmd(ranks, _args(out, train, data, **extra)), cwd=ROOT, env=_env(work),
                       capture_output=True, text=True, timeout=240)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    else:
        assert r.returncode != 0, "the run was expected to fail"
    return out


_RUNS: dict = {}


def run_once(work: Path, name: str, *a, **kw) -> Path:
    if name not in _RUNS:
        _RUNS[name] = launch(work, name, *a, **kw)
    return _RUNS[name]


def metrics(out: Path) -> dict[int, dict]:
    """{step: the last record logged for it} (a resumed run logs some steps again)."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows[rec["step"]] = rec
    return rows


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("report_rank*.json"))]


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _z3(work):
    """ZeRO-3 with activation checkpointing, a reference EMA of the gathered weights, the sample
    hook every 4 steps and a nominal 1 TFLOP/s peak (MFU logged)."""
    return run_once(work, "z3", 2, train={"zero_stage": 3, "activation_checkpointing": True,
                                          "sample_every": 4, "peak_tflops": 1.0},
                    reference_ema=True)


def _one_rank(work):
    return run_once(work, "one_mb", 1, train={"zero_stage": 0}, data={"batch_size": 4})


def assert_losses_close(a: dict, b: dict, steps) -> None:
    for s in steps:
        la, lb = a[s]["loss"], b[s]["loss"]
        assert abs(la - lb) <= LOSS_RTOL * abs(lb), (s, la, lb)


# ---- 1. ZeRO-2 / ZeRO-3 on 2 ranks = 1 rank with the same global batch ------------------------
def test_zero2_zero3_two_ranks_match_one_rank(work):
    one = metrics(_one_rank(work))
    accum = metrics(run_once(work, "one_accum", 1, train={"zero_stage": 0, "grad_accum": 2}))
    z2 = metrics(run_once(work, "z2", 2, train={"zero_stage": 2}))
    z3 = metrics(_z3(work))
    assert sorted(one) == sorted(z2) == sorted(z3) == sorted(accum) == list(range(1, 9))
    assert_losses_close(z2, one, range(1, 9))
    assert_losses_close(z3, one, range(1, 9))
    assert_losses_close(accum, one, range(1, 9))
    assert one[8]["loss"] < one[1]["loss"]  # it trains
    for m in (one, z2, z3, accum):
        assert m[8]["samples_seen"] == 32
        assert m[1]["lr"] == pytest.approx(0.01) and m[8]["lr"] == pytest.approx(0.001)
    assert not any((work / "torch_extensions").iterdir()), "a DeepSpeed op was JIT-built"
    # the logged observability fields, and the sample hook (every 4 steps, on every rank)
    rec = z3[8]
    assert rec["samples_per_s"] > 0 and rec["tokens_per_s"] == 2 * rec["samples_per_s"]
    assert 0 < rec["mfu"] < 1 and rec["peak_mem_gib"] > 0 and rec["grad_norm"] > 0
    assert one[8]["mfu"] is None  # no peak known on a CPU
    assert sorted(p.name for p in (work / "z3" / "samples").iterdir()) == \
        ["step_4.json", "step_8.json"]


# ---- 2. sharding ------------------------------------------------------------------------------
def test_zero3_shards_parameters_and_optimizer_state(work):
    z3 = [r["sharding"] for r in reports(_z3(work))]
    z2 = [r["sharding"] for r in reports(run_once(work, "z2", 2, train={"zero_stage": 2}))]
    one = reports(_one_rank(work))[0]["sharding"]
    full = one["param_full"]
    assert one["param_held"] == full and one["adam_held"] == 2 * full
    for s in z3:  # each rank: half of every parameter (padded to whole partitions)
        assert s["param_full"] == full
        assert full / 2 <= s["param_held"] <= full / 2 + 15  # 15 parameters, <= 1 pad each
        assert full / 2 <= s["master_held"] <= full / 2 + 15
        assert full <= s["adam_held"] <= full + 30
    assert sum(s["param_held"] for s in z3) >= full
    for s in z2:  # weights replicated, fp32 master and Adam state partitioned
        assert s["param_held"] == full
        assert s["master_held"] <= full / 2 + 16 and s["adam_held"] <= full + 32


def test_zero2_starts_every_parameter_16_byte_aligned(work):
    """Compiled blocks need it (inductor takes parameters as aligned). TinyNet's first
    no-decay parameter has one element, so packed back to back the next would start 4 bytes
    off 16 in ZeRO's flat buffer."""
    from tests.train_stage import TinyNet

    no_decay = [p.numel() for p in TinyNet().parameters() if p.ndim < 2]
    assert no_decay[0] % 4 != 0 and len(no_decay) > 1  # the test can fail without the padding
    for r in reports(run_once(work, "z2", 2, train={"zero_stage": 2})):
        assert r["misaligned"] == []


# ---- 3 + 4. kill during a checkpoint write; kill -9 mid-run; resume is exact ----------------------
def test_kill_during_write_and_kill9_then_resume_exactly(work):
    ref = metrics(_z3(work))
    ref_sums = reports(_z3(work))[0]["checksums"]
    z3 = {"zero_stage": 3, "activation_checkpointing": True, "keep_last": 2}
    out = work / "crash"
    # (a) every rank dies after checkpoint 6's files are written, before it is published
    launch(work, "crash", 2, train=z3, exit_before_publish_at=6, expect_ok=False)
    ckpts = out / "checkpoints"
    assert latest(out) == "step_00000004"
    assert (ckpts / "step_00000006").is_dir() and not (ckpts / "step_00000006" / "COMPLETE").exists()
    # (b) resume (auto) and kill -9 the whole launch once checkpoint 6 is published
    proc = subprocess.Popen(_cmd(2, _args(out, z3, step_sleep=0.5)), cwd=ROOT, env=_env(work),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if latest(out) == "step_00000006":
                break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    time.sleep(0.2)  # past pruning, well inside step 7 (each step sleeps 0.5 s)
    assert proc.poll() is None, "the resumed run ended before it could be killed"
    # torchrun starts each worker in its own session: kill the workers by their ids, then it
    for r in range(2):
        os.kill(int((out / f"pid_rank{r}").read_text()), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest(out) == "step_00000006"
    assert not (ckpts / "step_00000008").exists()
    # pruning (keep_last 2) kept the two newest complete ones, dropped the oldest
    assert sorted(p.name for p in ckpts.glob("step_*") if (p / "COMPLETE").exists()) == \
        ["step_00000004", "step_00000006"]
    # (c) resume again, to the end
    launch(work, "crash", 2, train=z3)
    got = metrics(out)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):  # bit-exact: the same losses and weights as the uninterrupted run
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
    assert reports(out)[0]["checksums"]["8"] == ref_sums["8"]


# ---- 5. consolidated export = gathered live weights; EMA = an independent reference ------------
def test_export_equals_gathered_weights_and_reference_ema(work):
    from gld.train.checkpoint import export_model

    out = _z3(work)
    live = torch.load(out / "live.pt", weights_only=True)
    raw, ema = export_model(out, "raw"), export_model(out, "ema")
    assert sorted(raw) == sorted(live["live"]) and "blocks.0.gain" in raw  # the model's own names
    for k in raw:
        assert torch.equal(raw[k], live["live"][k]), k
        # the sharded fp32 EMA and a plain one of the gathered weights do the same arithmetic
        assert torch.equal(ema[k], live["ref_ema"][k]), k
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)
    # and the EMA of the 1-rank run agrees to the fp32 reduction-order tolerance
    one = export_model(_one_rank(work), "ema")
    for k in raw:
        assert torch.allclose(ema[k], one[k], rtol=1e-4, atol=1e-6), k


# ---- 6. resume from 2 ranks onto 1 ------------------------------------------------------------------
def _check_resumed_start(src: Path, out: Path, folder: Path) -> None:
    """Right after the resume: step, fp32 weights, EMA (exact), schedule and data position."""
    from gld.train.checkpoint import export_model

    start = torch.load(out / "start.pt", weights_only=False)
    assert start["step"] == 4
    saved_raw, saved_ema = export_model(folder, "raw"), export_model(folder, "ema")
    for k in saved_raw:
        assert torch.equal(start["raw"][k], saved_raw[k]), k
        assert torch.equal(start["ema"][k], saved_ema[k]), k
    assert start["lr"][0] == metrics(src)[4]["lr"]  # the schedule continues (lr of step 5)
    # data: step 5 reads the same 4 samples the 2 ranks read (rank 0's 2, then rank 1's 2)
    want = [i for r in reports(src) for s, ids in r["seen"] if s == 5 for i in ids]
    assert [ids for s, ids in reports(out)[0]["seen"] if s == 5] == [want]


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_two_ranks_onto_one_restores_adam_state(work, zero):
    src = _z3(work) if zero == 3 else run_once(work, "z2", 2, train={"zero_stage": 2})
    folder = src / "checkpoints" / "step_00000004"
    out = launch(work, f"onto_one_z{zero}", 1, train={"zero_stage": zero, "resume": str(folder)},
                 data={"batch_size": 4}, report_at_start=True)
    meta = reports(out)[0]["resume_meta"]
    assert meta["step"] == 4 and not meta["same_world"] and meta["optimizer_restored"]
    _check_resumed_start(src, out, folder)
    # weights, Adam moments (through DeepSpeed's universal checkpoint), schedule and data all
    # continue: the 1-rank losses of steps 5-8 are the 2-rank ones to the fp32 tolerance
    got = metrics(out)
    assert sorted(got) == [5, 6, 7, 8]
    assert_losses_close(got, metrics(src), range(5, 9))
    assert not (out / "checkpoints" / "universal" / folder.name).exists()  # scratch removed


def test_resume_two_ranks_zero3_onto_one_rank_zero2(work):
    """Another ZeRO stage: weights, EMA, schedule and data exact; Adam moments restart."""
    src = _z3(work)
    folder = src / "checkpoints" / "step_00000004"
    out = launch(work, "z3_onto_one_z2", 1, train={"zero_stage": 2, "steps": 5,
                                                "resume": str(folder)},
                 data={"batch_size": 4}, report_at_start=True)
    meta = reports(out)[0]["resume_meta"]
    assert not meta["same_world"] and not meta["optimizer_restored"]
    _check_resumed_start(src, out, folder)
    assert_losses_close(metrics(out), metrics(src), [5])  # same weights, same data


# ---- 7. non-finite loss: stop naming the step, or skip and count ------------------------------------
def test_nonfinite_loss_stops_naming_the_step(work):
    out = run_once(work, "nan_stop", 2, train={"zero_stage": 2, "log_every": 4},
                   nan_step=3, nan_rank=1, expect_ok=False)
    errors = [r["error"] for r in reports(out)]
    assert len(errors) == 2
    for e in errors:  # the check runs at step 4 (log_every) and names step 3, on both ranks
        assert e.startswith("NonFiniteLossError: non-finite loss or gradient norm at step 3"), e
    assert latest(out) == "step_00000002"
    assert not (out / "checkpoints" / "step_00000004").exists()


def test_nonfinite_loss_skip_counts_and_bf16_resume_is_exact(work):
    skip = {"zero_stage": 2, "precision": "bf16", "nonfinite": "skip", "max_skipped": 1,
            "steps": 6}
    out = run_once(work, "nan_skip", 2, train=skip, nan_step=3, nan_rank=1)
    m = metrics(out)
    assert m[2]["skipped_steps"] == 0 and m[3]["skipped_steps"] == 1 and m[6]["skipped_steps"] == 1
    sums = reports(out)[0]["checksums"]
    assert sums["3"] == sums["2"] and sums["4"] != sums["3"]  # step 3 left the weights alone
    # bf16: resuming from checkpoint 4 (after the skipped step) continues bit-exactly
    again = launch(work, "nan_skip_resume", 2, train={
        **skip, "resume": str(out / "checkpoints" / "step_00000004")}, nan_step=3, nan_rank=1)
    m2 = metrics(again)
    assert sorted(m2) == [5, 6]
    for s in (5, 6):
        assert m2[s]["loss"] == m[s]["loss"] and m2[s]["skipped_steps"] == 1
    # and one more skip than max_skipped stops the run
    many = launch(work, "nan_skip_many", 1, train={**skip, "max_skipped": 0, "steps": 4},
                  data={"batch_size": 4}, nan_step=2, expect_ok=False)
    assert reports(many)[0]["error"].startswith(
        "NonFiniteLossError: non-finite loss at step 2: 1 steps skipped, more than "
        "train.max_skipped=0")
