"""The package's import structure: no circles, and every import points down the layers of
docs/architecture.md."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "balpoe_tf"

# Lowest first; a module may import only modules of its own or a lower layer (a module of
# its own layer only when listed before it).
LAYERS = [
    ["names", "config", "progress", "precision", "data"],
    ["run_config", "settings"],
    ["reporting", "training", "metrics", "losses", "label_shift", "models", "task", "preemption", "distribution",
     "cli"],
    ["run_data"],
    ["run_folder"],
    ["run_precision", "export", "callbacks", "pretrained"],
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


def test_settings_load_without_tensorflow():
    """Every tool's settings, with the rules and names they are checked against, in a fresh
    interpreter: reading or checking a configuration loads neither TensorFlow nor Keras."""
    script = ("import sys; from balpoe_tf import run_config, settings; "
              "run_config.RunConfig(); settings.EvalConfig(run_dir='r'); "
              "settings.PredictConfig(model='m', inputs=['x']); "
              "settings.ExportConfig(run_dir='r'); settings.ReproduceConfig(); "
              "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_names_settings_check_against_are_those_of_the_registries():
    from balpoe_tf import data, label_shift, models, names, run_config

    assert set(models.BACKBONES) == set(names.BACKBONES)
    assert set(data.DATASETS) == set(names.DATASETS)
    assert {b for _, b in names.METHODS.values() if b} <= set(run_config.BASELINES)
    assert set(label_shift.NEEDS_HOLDOUT) < set(label_shift.ESTIMATORS) == set(names.ESTIMATORS)
