"""The layers' shape: ``bench/`` -> ``orchestration/`` -> ``swav/``, never back up, no circle.

Read from the source (every import, at module level or inside a function), so that an import
added anywhere is seen without running it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestration", "swav")


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports (``orchestration.recipe``, ``swav.data``, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from orchestration import recipe`` imports the module recipe
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                parts = name.split(".")
                module = ".".join(parts[:2])
                if (ROOT / parts[0] / f"{parts[1]}.py").exists() if len(parts) > 1 else False:
                    found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            if path.stem == "__init__":
                continue
            module = f"{package}.{path.stem}"
            graph[module] = project_imports(path) - {module}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*trail, nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_walk_sees_imports_inside_functions_and_finds_a_circle():
    graph = import_graph()
    assert "swav.multicrop" in graph["swav.data"]  # (a module-level import)
    assert "orchestration.evaluate" in graph["orchestration.train"] or \
        "orchestration.evaluate" in graph["orchestration.cli"]  # (imported inside a function)
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_and_swav_never_imports_orchestration():
    graph = import_graph()
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("swav.")
                    for d in deps if d.startswith("orchestration."))
    assert upward == []


def test_swav_is_pure_pytorch():
    """``swav/`` imports neither Ray nor MLflow: a bare GPU box runs it."""
    for path in sorted((ROOT / "swav").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any(n.split(".")[0] in ("ray", "mlflow") for n in names), path.name
