"""Architecture boundaries (style.md): model code knows nothing of DeepSpeed or process groups;
kernels depend on torch, triton and the standard library only; nothing inside `gld` or
`kernels` imports in a loop.

Import cycles are found statically (`ast`), so a cycle is caught whether or not a test happens
to import its modules in the order that breaks. What counts as "A imports B":
- every import statement in A's file, at module level or inside a function or class: a lazy
  import postpones the dependency but does not remove it (the loop is still there for whoever
  imports the two modules' names at module level next), and so do `try:` / `TYPE_CHECKING`
  imports;
- `from P import name` is an edge to the module P.name when that is a module, else to P;
  relative imports are resolved against A's package;
- the packages above B (their `__init__`) are not edges: Python runs them before B, but a
  package that re-exports its submodules would otherwise be a "cycle" with each of them.
"""
import ast
import sys
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


def python_files(*parts: str, root: Path = ROOT):
    for part in parts:
        base = root / part
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
    allowed_roots = {"torch", "triton", "kernels", "flash_attn"} | set(sys.stdlib_module_names)
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


# -- import cycles --------------------------------------------------------------------------------

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (the rules in the module docstring)."""
    files = {module_name(p, root): p for p in python_files(*packages, root=root)}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                               for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a path a -> ... -> a) per strongly connected component of 2+
    modules; breaking every cycle reported and running again finds any others."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):  # Tarjan's strongly connected components (recursion: a few hundred deep)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: pop it off the stack
            component = set()
            while v not in component:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(graph, comp) for comp in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start = min(component)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:  # back at the start: v, parent(v), ..., start, reversed
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


@pytest.mark.parametrize("package", ["gld", "kernels"])
def test_no_import_cycles(package):
    cycles = find_cycles(import_graph(ROOT, ("gld", "kernels")))
    mine = [" -> ".join(c) for c in cycles if any(m.split(".")[0] == package for m in c)]
    assert mine == [], f"import cycles inside {package}: " + "; ".join(mine)


def test_encoders_import_no_loaders():
    """Encoders know nothing of files: gld.checkpoints imports them, never the other way."""
    graph = import_graph(ROOT, ("gld",))
    offenders = {m: sorted(t for t in targets if t.startswith("gld.checkpoints"))
                 for m, targets in graph.items() if m.startswith("gld.encoders")}
    assert {m: t for m, t in offenders.items() if t} == {}


def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_cycle_detector_finds_lazy_and_relative_imports(tmp_path):
    """The loop this test was written for: an encoder lazily importing its loader, which imports
    the encoder. Package __init__ files that re-export their submodules are not cycles."""
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/enc/__init__.py": "from pkg.enc.model import Model\n",
        "pkg/enc/model.py": "import torch\n\nclass Model:\n    @classmethod\n"
                            "    def load(cls, p):\n        from pkg.ckpt.da3 import load\n"
                            "        return load(p)\n",
        "pkg/ckpt/__init__.py": "",
        "pkg/ckpt/da3.py": "from ..enc import model\n",
        "pkg/util.py": "from pkg import enc\nfrom . import other\n",
        "pkg/other.py": "def f():\n    from pkg.util import g\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.enc"] == {"pkg.enc.model"}
    assert graph["pkg.ckpt.da3"] == {"pkg.enc.model"}  # relative, submodule named by `from`
    assert graph["pkg.util"] == {"pkg.enc", "pkg.other"}
    assert find_cycles(graph) == [["pkg.ckpt.da3", "pkg.enc.model", "pkg.ckpt.da3"],
                                  ["pkg.other", "pkg.util", "pkg.other"]]
    # Without the lazy import inside the classmethod, no cycle is left.
    (tmp_path / "pkg/enc/model.py").write_text("class Model:\n    pass\n")
    (tmp_path / "pkg/other.py").write_text("")
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == []
