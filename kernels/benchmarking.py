"""What every benchmark shares: the CUDA check, timing, peak memory, environment and results.

Benchmarks (`launch/*.py`) and GPU tests import these instead of keeping their own copies, so
a result row means the same thing everywhere:
- `require_cuda(what)` ends a script on a machine without CUDA with one line and exit code 2
  (never a traceback, never a table of "available" backends that cannot run);
- `time_ms(fn)` is the median of `triton.testing.do_bench` (warm-up, L2 flushed between calls);
  `time_ms_rotating(fn, inputs)` times calls on rotating inputs with CUDA events;
- `PeakMemory` measures the peak allocated above what was allocated when it was entered;
- `env_info()` names the device and the versions (recorded with every result);
- `write_results(path, payload)` writes JSON atomically (a killed run leaves the previous file or
  none, never half of one), `markdown_table` prints the rows people read.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

__all__ = ["require_cuda", "matmul_ceiling_tflops", "time_ms", "time_ms_rotating", "PeakMemory", "env_info",
           "write_results", "markdown_table", "tflops", "rel_error"]


def require_cuda(what: str) -> None:
    """Exit with one line (code 2) when no CUDA device is present: `what` needs one."""
    if not torch.cuda.is_available():
        print(f"{what} needs a CUDA device; none is visible here (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}).", file=sys.stderr)
        raise SystemExit(2)


def time_ms(fn: Callable[[], Any], warmup: int = 50, rep: int = 300,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median milliseconds of `fn()` (triton's do_bench: warm-up, L2 cleared between calls)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """TFLOP/s of a bf16 n^3 matmul on this GPU: the ceiling MFU is measured against (it varies
    run to run by a few percent, so measure it in the same run as what it is compared with)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return tflops(2 * n ** 3, time_ms(lambda: a @ b))


def time_ms_rotating(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = 5,
                     iters: int = 20) -> float:
    """Median milliseconds of `fn(x)` with CUDA events, `x` rotating through `inputs` (inputs
    larger than L2 together, so no call finds the previous one's data in cache)."""
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


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.mib`: peak CUDA bytes allocated inside the block
    above what was allocated on entry (inputs excluded), in MiB. `m.now_mib()` reads the peak so
    far without leaving the block (forward peak, then forward+backward peak)."""

    def __enter__(self) -> "PeakMemory":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        self.mib = 0.0
        return self

    def now_mib(self) -> float:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20

    def __exit__(self, *exc) -> None:
        self.mib = self.now_mib()


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(extra_packages: Iterable[str] = ()) -> dict:
    """Device, versions and UTC date to record beside a result."""
    info = dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        triton=_version("triton"), python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for name in extra_packages:
        info[name] = _version(name)
    return info


def write_results(path: str | os.PathLike, payload: Any) -> None:
    """Write `payload` as JSON to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; floats printed with the format they carry (pre-format them)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def tflops(flop: float, ms: float) -> float:
    """TFLOP/s of `flop` floating-point operations done in `ms` milliseconds."""
    return flop / ms * 1e-9


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
