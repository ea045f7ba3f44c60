"""Shared pieces of the Triton kernel tests: the interpreter switch and its subprocess runner.

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

from kernels import prope_triton

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
