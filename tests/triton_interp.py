"""Shared pieces of the Triton kernel tests: the interpreter switch and its subprocess runner,
the relative error, and the GPU cases' inputs and "at most twice the reference's error" check.

Triton decides compiled vs interpreted when it is first imported, so a kernel test file's
interpreter cases (names starting `test_interp_`, marked `interp`) run in-process only when the
process started with TRITON_INTERPRET=1; `interpreter_subprocess_test(__file__)` makes the test
that reruns them in a fresh process that has it (robust to whatever the suite imported first).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import prope_attention_ref, prope_triton
from tests.test_prope_ref import make_inputs

ON_INTERPRETER = prope_triton.interpreted()
interp = pytest.mark.skipif(not ON_INTERPRETER, reason="interpreter cases run in a subprocess "
                            "(test_interpreter_cases_in_subprocess)")


def interpreter_subprocess_test(test_file: str):
    """A test function that runs `test_file`'s `test_interp_` cases under TRITON_INTERPRET=1 in
    a fresh pytest process and fails with its output unless they all pass (none skipped)."""
    path = Path(test_file).resolve()

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


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_within_twice(names, got, base, want) -> None:
    """Each got[i] finite and its error against the float64 want[i] at most twice that of
    base[i] (the PyTorch reference run in the same dtype)."""
    for name, a, b, w in zip(names, got, base, want):
        w = w.to(a.device)
        assert torch.isfinite(a).all(), name
        assert rel(a, w) <= 2 * rel(b, w) + 1e-6, f"{name}: {rel(a, w):.2e} vs ref {rel(b, w):.2e}"


def gpu_forward_case(dtype, d, V, patches):
    """Inputs of a 16-bit GPU forward case (B 2, 3 heads): (q, k, v on CUDA in dtype, the cameras
    as `prope_attention` takes them, the float64 reference output). fp16 at d > 64 is skipped:
    it runs the reference."""
    if dtype == torch.float16 and d > 64:
        pytest.skip("fp16 at d > 64 uses the reference")
    image = (14 * patches[0], 14 * patches[1])
    q, k, v, w2c, K = make_inputs(B=2, h=3, V=V, patches=patches, d=d, image=image, seed=d + V)
    cams = (w2c.cuda().float(), K.cuda().float(), patches, image)
    want = prope_attention_ref(q, k, v, w2c, K, patches, image).cuda()
    return [t.to("cuda", dtype) for t in (q, k, v)], cams, want
