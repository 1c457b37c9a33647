"""The package's import graph, read from the source (function-local imports included): no cycle between
modules, and the layers of DESIGN.md point one way (models/ and schedulers/ import nothing above them;
weights/ imports only models/, schedulers/ and `files`, the atomic file writer, which imports nothing of
ours but the package's version)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "unclip_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from pkg import module` depends on that module; `from module import name` on the module.
                submodules = [f"{stem}.{alias.name}" for alias in node.names if f"{stem}.{alias.name}" in modules]
                targets = submodules or [stem]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_lower_layers_import_nothing_above_them():
    graph = _graph()
    allowed = {
        "unclip_jax.models": ("unclip_jax.models",),
        "unclip_jax.schedulers": ("unclip_jax.schedulers",),
        "unclip_jax.weights": ("unclip_jax.weights", "unclip_jax.models", "unclip_jax.schedulers", "unclip_jax.files"),
    }
    bad = []
    for name, edges in graph.items():
        for layer, ok in allowed.items():
            if name == layer or name.startswith(layer + "."):
                bad += [f"{name} -> {e}" for e in edges if not e.startswith(ok)]
    assert bad == []


def test_files_imports_nothing_of_ours():
    assert _graph()["unclip_jax.files"] <= {"unclip_jax"}  # the root's __version__; the root imports lazily
