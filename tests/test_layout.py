"""The tree's promises: the CNA math imports no torch and no I/O; storage imports no torch; every folder imports
only from the folders below it, measured from the imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = (
    "import sys, importlib; importlib.import_module(sys.argv[1]); "
    "print(' '.join(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('cna_dist', 'fsspec', 'ray')))))"
)


def loaded(module: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["cna_dist.reduce.cna", "cna_dist.eval.metrics", "cna_dist.circuit.diff"])
def test_the_math_is_plain(module: str) -> None:
    assert loaded(module) <= {"cna_dist", module.rpartition(".")[0], module}


@pytest.mark.parametrize(
    "module", ["cna_dist.store.activations", "cna_dist.reduce.streamed", "cna_dist.circuit.registry"]
)
def test_storage_needs_no_torch_and_no_ray(module: str) -> None:
    found = loaded(module)
    assert "torch" not in found and "ray" not in found
    assert not any(m.startswith(("cna_dist.model", "cna_dist.capture", "cna_dist.runtime")) for m in found)


# ------------------------------------------------------------------------------------ layering, from the imports

PACKAGE = Path(__file__).resolve().parents[1] / "cna_dist"
# Each part of the package and its layer, along the data's path: a module imports only from its own layer or below.
LAYERS = {
    "cna_dist": 0,
    "errors": 0,
    "clock": 0,
    "store": 1,  # the floor every stage stands on: URIs, objects, the activation store, the lease
    "manifest": 2,  # the job as data
    "prompts": 3,  # prompt sets and tables -> texts -> batches
    "reduce": 3,  # the CNA math and its streamed run over a store
    "circuit": 3,  # the circuit file, the registry, diffs
    "model": 4,  # torch: architectures, MoE, checkpoints, generation
    "steer": 5,  # circuit neurons scaled in a running model
    "eval": 5,  # metrics, capability, judge, tables and plots
    "bake": 5,  # steering written into the weights
    "demo": 5,  # planted and random models built in code
    "capture": 6,  # the one stage forward and the engines that run it
    "runtime": 7,  # Ray: replicas, pools, the scheduler, executors
    "validate": 7,  # every input checked before anything is written
    "commands": 8,  # one module per command
    "cli": 9,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Import nodes anywhere (inside functions too), except under `if TYPE_CHECKING:`."""
    found, skip = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip:
            found.append(node)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (an `from a import b` of a submodule b counts as a.b)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("cna_dist")}
            elif node.module and node.module.startswith("cna_dist"):
                deps |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(graph[v])
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others."""
    reach = {v: _reach(graph, v) for v in graph}
    looped = [v for v in graph if v in reach[v]]
    groups = {frozenset(w for w in looped if w in reach[v] and v in reach[w]) for v in looped}
    return sorted(sorted(g) for g in groups)


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_every_part_has_a_layer_and_no_module_imports_upward() -> None:
    graph = import_graph()
    assert {_part(m) for m in graph} <= set(LAYERS), {_part(m) for m in graph} - set(LAYERS)
    upward = sorted((m, d) for m, deps in graph.items() for d in deps if LAYERS[_part(d)] > LAYERS[_part(m)])
    assert upward == []


def test_the_checks_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
