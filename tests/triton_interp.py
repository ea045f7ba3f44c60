"""Shared pieces of the PRoPE kernel tests: the interpreter switch and its subprocess runner, the
relative error, and the GPU cases' "error at most twice the reference's" check.

Triton decides compiled vs interpreted when it is first imported, so a kernel test file's
interpreter cases (names starting `test_interp_`, decorated `interp`) run in-process only when
the process started with TRITON_INTERPRET=1; `interpreter_subprocess_test(__file__)` makes the
test that reruns them in a fresh process that has it (robust to whatever the suite imported
first). Both are marked `slow` (the interpreter runs the kernels element by element).
"""
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from kernels.benchmarking import rel_error as rel
from kernels.prope import core
from kernels.prope.bench import float64_errors, outputs_and_grads, random_inputs
from kernels.prope.reference import prope_attention_ref

ON_INTERPRETER = core.interpreted()

__all__ = ["ON_INTERPRETER", "interp", "interpreter_subprocess_test", "rel", "gpu_case",
           "assert_within_twice", "assert_errors_within_twice"]


def interp(fn):
    """An interpreter case: runs where this process interprets, else in the subprocess test."""
    fn = pytest.mark.skipif(not ON_INTERPRETER, reason="interpreter cases run in a subprocess "
                            "(test_interpreter_cases_in_subprocess)")(fn)
    return pytest.mark.slow(fn)


def interpreter_subprocess_test(test_file: str):
    """A test function that runs `test_file`'s `test_interp_` cases under TRITON_INTERPRET=1 in
    a fresh pytest process and fails with its output unless they all pass (none skipped)."""
    path = Path(test_file).resolve()

    @pytest.mark.slow
    @pytest.mark.skipif(ON_INTERPRETER or torch.cuda.is_available(),
                        reason="already interpreted in-process / GPU present")
    def test_interpreter_cases_in_subprocess():
        root = path.parents[1]
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(path), "-k", "test_interp_"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
        last = res.stdout.splitlines()[-1]
        assert " passed" in res.stdout and "skipped" not in last, res.stdout

    return test_interpreter_cases_in_subprocess


def assert_within_twice(names, got, base, want) -> None:
    """Each got[i] finite and its error against the float64 want[i] at most twice that of
    base[i] (the PyTorch reference run in the same dtype)."""
    for name, a, b, w in zip(names, got, base, want):
        w = w.to(a.device)
        assert torch.isfinite(a).all(), name
        assert rel(a, w) <= 2 * rel(b, w) + 1e-6, f"{name}: {rel(a, w):.2e} vs ref {rel(b, w):.2e}"


def gpu_case(dtype, d, V, patches, B=2, h=3):
    """A 16-bit GPU case: (q, k, v float64 on CUDA, cameras (w2c, K fp32, patches, image)).
    fp16 at d > 64 is skipped: the fused path runs the reference there."""
    if dtype == torch.float16 and d > 64:
        pytest.skip("fp16 at d > 64 uses the reference")
    q, k, v, w2c, K, patches, image = random_inputs(B, h, d, V, patches, torch.float64, "cuda",
                                                    seed=d + V)
    return q, k, v, (w2c, K, patches, image)


def assert_errors_within_twice(fn, dtype, q, k, v, cam, grad=True, convention="textbook") -> dict:
    """fn's output (and with `grad`, its gradients for one random do) in dtype: finite, error
    against the float64 reference at most twice that of the reference run in dtype; fn and the
    reference both called with `convention`."""
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64).to(q.device) if grad else None
    fn, ref = (partial(f, convention=convention) for f in (fn, prope_attention_ref))
    want = outputs_and_grads(ref, q, k, v, cam, do, torch.float64)
    got = float64_errors(fn, q, k, v, cam, do, dtype, want)
    base = float64_errors(ref, q, k, v, cam, do, dtype, want)
    for name in got:
        assert got[name] <= 2 * base[name] + 1e-6, \
            f"{name}: {got[name]:.2e} vs ref {base[name]:.2e}"
    return got
