"""The import arrows run one way: heads <- models <- {tasks, deploy} <- cli <- tools, no cycle.

Reads every module's imports (top-level and inside functions) with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mnv3det", "heads")

#: layer -> layers it must not import
FORBIDDEN = {
    "heads": {"mnv3det"},
    "mnv3det.models": {"mnv3det.tasks", "mnv3det.deploy", "mnv3det.cli", "mnv3det.demos"},
    "mnv3det.data": {"mnv3det.tasks", "mnv3det.deploy", "mnv3det.cli", "mnv3det.models"},
    "mnv3det.metrics": {"mnv3det.tasks", "mnv3det.deploy", "mnv3det.cli"},
    "mnv3det.tasks": {"mnv3det.deploy", "mnv3det.cli", "mnv3det.demos"},
    "mnv3det.deploy": {"mnv3det.tasks", "mnv3det.cli", "mnv3det.demos"},
    "mnv3det.backbone": {"mnv3det.models", "mnv3det.tasks", "mnv3det.deploy", "mnv3det.cli"},
    "mnv3det.weights": {"mnv3det.backbone", "mnv3det.models", "mnv3det.tasks", "mnv3det.cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = module_name(path)
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{alias.name}" for alias in node.names}
            graph[name] = {m for m in found if m.split(".")[0] in PACKAGES}
    return graph


def within(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_the_layers_above(layer) -> None:
    bad = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        if within(module, layer)
        for target in targets
        for forbidden in FORBIDDEN[layer]
        if within(target, forbidden)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules() -> None:
    graph = imports()
    known = set(graph)
    edges = {
        m: {t for t in targets if t in known and t != m and not within(m, t)}
        for m, targets in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
