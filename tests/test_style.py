"""House rules that can be checked mechanically (STYLE.md rules 1, 4, 15, 20): the one-way import graph,
no private names across modules, a docstring on every module, no hard-coded CUDA device."""
import ast
import re

import pytest

from conftest import REPO

# module -> the project modules it may import (DESIGN §1, extended by the lower data modules)
ALLOWED = {
    "medhmp": {"data", "synthetic", "train", "evaluate", "demo"},
    "demo": {"synthetic", "data", "train", "evaluate", "results", "metrics"},
    "evaluate": {"data", "models", "sequence", "train", "metrics", "results"},
    "sequence": {"models"},
    "results": {"metrics", "progress"},
    "metrics": set(),
    "train": {"data", "models"},
    "data": {"build", "cohorts", "folders", "progress", "tables"},
    "build": {"tables", "extract", "features", "cohorts"},
    "cohorts": {"extract", "tables"},
    "features": {"tables"},
    "extract": {"tables"},
    "synthetic": {"folders", "progress", "tables"},
    "folders": {"tables"},
    "models": set(),
    "tables": set(),
    "progress": set(),
}
THIRD_PARTY = {"numpy", "torch", "transformers", "click", "rich"}
OPTIONAL = {"matplotlib"}   # imported inside a try block, used when installed (ROC/PR curve images)


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], [], node
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0], [a.name for a in node.names], node


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_import_graph_points_one_way(module):
    path = REPO / f"{module}.py"
    assert path.exists(), f"{module}.py is listed but missing"
    project = {p.stem for p in REPO.glob("*.py")}
    for name, names, node in _imports(path):
        if name in project:
            assert name in ALLOWED[module], f"{module}.py imports {name} (line {node.lineno})"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module}.py imports private {private} from {name}"


def test_every_root_module_is_in_the_graph():
    assert {p.stem for p in REPO.glob("*.py")} == set(ALLOWED)


def test_models_imports_only_torch():
    for name, _, node in _imports(REPO / "models.py"):
        assert name in {"torch", "dataclasses", "math", "__future__"}, f"models.py imports {name}"


def test_runtime_dependencies_are_the_declared_ones():
    declared = {line.split(">")[0].split("=")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert declared == {"torch", "transformers", "numpy", "click", "rich"}
    import sys
    stdlib = set(sys.stdlib_module_names)
    for module in ALLOWED:
        for name, _, node in _imports(REPO / f"{module}.py"):
            assert name in stdlib | set(ALLOWED) | THIRD_PARTY | OPTIONAL, f"{module}.py imports {name}"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_docstring_and_no_device_literals(module):
    text = (REPO / f"{module}.py").read_text()
    assert ast.get_docstring(ast.parse(text)), f"{module}.py has no module docstring"
    assert not re.search(r"cuda:\d", text), f"{module}.py names a CUDA device"
