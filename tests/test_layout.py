"""The tree shows the architecture (STYLE.md rule 11): no import cycles among
TrainBench's modules, impl/ never imports bench/, and no module grows past
the ~400-line mark at which it wants splitting."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "impl")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every TrainBench module ``path`` imports, at module level or inside a
    function (a lazy import still makes a cycle; `from pkg import mod` names the module)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        out |= {t for t in targets if t in known}
    # a package's __init__ is imported with any of its modules: that edge is not a choice of the importer
    return {t for t in out if t != name}


def import_graph() -> nx.DiGraph:
    mods = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        graph.add_edges_from((name, t) for t in _imports(path, name, set(mods)))
    return graph


def test_no_import_cycles() -> None:
    cycles = sorted(sorted(c) for c in nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_impl_never_imports_bench() -> None:
    graph = import_graph()
    bad = sorted((a, b) for a, b in graph.edges if a.startswith("impl") and b.startswith("bench"))
    assert not bad, f"impl/ imports the harness: {bad}"


LAYERS = ("impl", "bench", "bench.config", "bench.theory", "bench.workloads", "bench.meters", "bench.adapters",
          "bench.plan", "bench.run", "bench.analysis", "bench.cli")
"""Bottom to top (docs/architecture.md): a module imports only its own layer and the layers before it."""
UPWARD_EXCEPTIONS = {
    # expansion resolves `strategy: auto` cells to the planner's best plan before ids are taken
    ("bench.config.suite", "bench.plan.planner"),
    # the autotuner comparison starts DeepSpeed's launcher with the local launcher's loopback settings
    ("bench.plan.autotune_compare", "bench.run.launchers.torchrun"),
}


def _layer(module: str) -> int:
    return max(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def upward_imports(graph: nx.DiGraph) -> list[tuple[str, str]]:
    return sorted((a, b) for a, b in graph.edges if _layer(b) > _layer(a) and (a, b) not in UPWARD_EXCEPTIONS)


def test_layers_import_downward_only() -> None:
    bad = upward_imports(import_graph())
    assert not bad, f"imports from a lower layer to a higher one (docs/architecture.md): {bad}"


def test_layer_check_can_fail() -> None:
    graph = import_graph()
    graph.add_edge("bench.meters.comm", "bench.analysis.compare")  # a meter reading the analysis layer
    assert upward_imports(graph) == [("bench.meters.comm", "bench.analysis.compare")]


def test_cycle_detector_sees_lazy_imports(tmp_path) -> None:
    """The checker itself can fail: a function-level import back to the importer is a cycle."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import b\n")
    b.write_text("def f():\n    from a import x\n")
    graph = nx.DiGraph([("a", t) for t in _imports(a, "a", {"a", "b"})] + [("b", t) for t in _imports(b, "b", {"a", "b"})])
    assert list(nx.simple_cycles(graph)) == [["a", "b"]] or list(nx.simple_cycles(graph)) == [["b", "a"]]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")))
def test_module_size(path: str) -> None:
    lines = len((ROOT / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines (> {MAX_LINES}): split it by what its parts do"
