"""The package's import structure: no circles, and every import points down the layers of
docs/architecture.md."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "balpoe_tf"

# Lowest first; a module may import only modules of its own or a lower layer (a module of
# its own layer only when listed before it).
LAYERS = [
    ["config", "progress", "precision", "data"],
    ["reporting", "training", "metrics", "losses", "label_shift", "models", "preemption", "cli"],
    ["run_config"],
    ["run_folder"],
    ["export", "callbacks"],
    ["experiment"],
    ["evaluation", "inference"],
    ["reproduction"],
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "balpoe_tf"


def _imports():
    """{module: set of balpoe_tf modules it imports (anywhere in the file)}."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("balpoe_tf"):
                base = node.module[len("balpoe_tf."):] if node.module != "balpoe_tf" else ""
                for alias in node.names:
                    candidate = f"{base}.{alias.name}".strip(".")
                    found.add(candidate if candidate in modules else base)
        graph[name] = {m for m in found if m and m != name and not name.startswith(m + ".")}
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_no_import_circle():
    graph = _imports()
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph.get(module, ()):
            assert state.get(target) != "open", "import circle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_imports_point_down_the_layers():
    rank = {m: (i, j) for i, layer in enumerate(LAYERS) for j, m in enumerate(layer)}
    graph = _imports()
    assert {_top(m) for m in graph} - {"balpoe_tf"} <= set(rank), "a new module needs a place in LAYERS"
    for module, targets in graph.items():
        for target in targets:
            if _top(target) == _top(module):
                continue  # inside a package: covered by the circle test
            assert rank[_top(target)] < rank[_top(module)], f"{module} imports {target}, which is not below it"
