"""Architecture boundaries (style.md): model code knows nothing of DeepSpeed or process groups;
kernels depend on torch and triton only."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def python_files(*parts: str):
    for part in parts:
        base = ROOT / part
        if base.is_dir():
            yield from sorted(base.rglob("*.py"))


def test_deepspeed_only_in_train():
    offenders = [str(p.relative_to(ROOT)) for p in python_files("gld", "kernels")
                 if "train" not in p.relative_to(ROOT).parts
                 and any(m == "deepspeed" or m.startswith("deepspeed.") for m in imported_modules(p))]
    assert offenders == [], f"deepspeed imported outside gld/train: {offenders}"


@pytest.mark.parametrize("package", ["gld/models", "gld/encoders", "gld/diffusion",
                                     "gld/geometry", "kernels"])
def test_no_process_groups_in_model_code(package):
    offenders = [str(p.relative_to(ROOT)) for p in python_files(package)
                 if any(m.startswith("torch.distributed") for m in imported_modules(p))]
    assert offenders == [], f"torch.distributed imported in {package}: {offenders}"


def test_kernels_depend_on_torch_and_triton_only():
    allowed_roots = {"torch", "triton", "kernels", "math", "contextlib", "importlib", "dataclasses",
                     "typing", "functools", "os", "__future__", "flash_attn", "warnings", "itertools"}
    bad = {}
    for p in python_files("kernels"):
        roots = {m.split(".")[0] for m in imported_modules(p)}
        extra = roots - allowed_roots
        if extra:
            bad[str(p.relative_to(ROOT))] = sorted(extra)
    assert bad == {}, f"kernels/ imports outside torch/triton/stdlib: {bad}"


def test_probe_detects_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import deepspeed.comm as c\nfrom torch.distributed import barrier\n")
    assert {"deepspeed.comm", "torch.distributed", "torch.distributed.barrier"} <= imported_modules(f)
