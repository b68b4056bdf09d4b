"""House rules that can be checked mechanically (docs/design.md, Modules): the one-way import graph, exactly
as docs/design.md draws it; no private names across modules; the core modules copy with only what they
import; a docstring on every module; no hard-coded CUDA device; every function on one screen; lines of at
most 100 characters."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

# module -> the project modules it imports: exactly these for the root modules (docs/design.md's table says
# the same, test_design_doc_draws_this_graph), at most these for the preprocessing package. The core (models,
# data, checkpoints, train, evaluate, metrics and what they import) never reaches the preprocessing package,
# which reads raw extracts and writes what data.py reads.
ALLOWED = {
    "medhmp": {"synthetic", "train", "evaluate", "embed", "paper_tables", "demo", "folders", "runtime",
               "preprocessing.pipeline"},
    "paper_tables": {"checkpoints", "data", "evaluate", "folders", "metrics", "results", "tasks"},
    "demo": {"synthetic", "checkpoints", "data", "train", "evaluate", "results", "runtime", "progress",
             "folders", "preprocessing.pipeline"},
    "embed": {"checkpoints", "data", "folders", "progress", "runtime"},
    "evaluate": {"checkpoints", "data", "models", "sequence", "baselines", "runtime", "metrics", "results",
                 "folders", "progress", "tasks", "meds_labels"},
    "meds_labels": {"data", "folders", "tasks"},
    "sequence": {"models"},
    "baselines": {"models"},
    "results": {"metrics", "progress", "folders"},
    "metrics": set(),
    "train": {"checkpoints", "data", "health", "models", "progress", "runtime", "folders"},
    "checkpoints": {"data", "folders", "models"},
    "health": {"data", "models"},
    "runtime": {"folders"},
    "data": {"folders"},
    "synthetic": {"folders", "progress", "preprocessing.meds_etl", "preprocessing.tables", "tasks"},
    "folders": set(),
    "models": set(),
    "progress": set(),
    "tasks": set(),
    "preprocessing": set(),
    "preprocessing.pipeline": {"data", "folders", "progress", "preprocessing.build", "preprocessing.cohorts",
                               "preprocessing.meds", "preprocessing.meds_write", "preprocessing.tables"},
    "preprocessing.meds": {"data", "folders", "preprocessing.build", "preprocessing.cohorts",
                           "preprocessing.extract", "preprocessing.meds_profile", "preprocessing.meds_scan",
                           "preprocessing.tables", "tasks"},
    "preprocessing.meds_scan": {"data", "folders", "preprocessing.extract", "preprocessing.meds_profile",
                                "preprocessing.tables"},
    "preprocessing.meds_profile": {"folders", "preprocessing.extract", "tasks"},
    "preprocessing.meds_write": {"data"},
    "preprocessing.meds_etl": set(),
    "preprocessing.build": {"data", "folders", "preprocessing.cohorts", "preprocessing.extract",
                            "preprocessing.features", "preprocessing.tables", "tasks"},
    "preprocessing.cohorts": {"data", "preprocessing.extract", "preprocessing.tables", "tasks"},
    "preprocessing.features": {"data", "folders", "preprocessing.extract", "preprocessing.tables"},
    "preprocessing.extract": {"data", "folders", "preprocessing.tables", "tasks"},
    "preprocessing.tables": {"folders"},
}
THIRD_PARTY = {"numpy", "torch", "transformers", "click", "rich"}
OPTIONAL = {"matplotlib",   # imported inside a try block, used when installed (ROC/PR curve images)
            "pyarrow"}      # MEDS in and out (requirements-meds.txt), imported inside functions
PACKAGES = {"preprocessing"}


def path_of(module: str):
    path = REPO / (module.replace(".", "/") + ".py")
    return path if module not in PACKAGES else REPO / module / "__init__.py"


def project_modules() -> set:
    """Every module of the project: the files at the root and in its packages (not tests/ or bench/)."""
    found = {p.stem for p in REPO.glob("*.py")}
    for package in PACKAGES:
        found |= {package if p.stem == "__init__" else f"{package}.{p.stem}" for p in (REPO / package).glob("*.py")}
    return found


def _imports(path):
    """(top-level name, project module or None, names imported from it, node) per import statement: `from
    preprocessing import build` imports the module preprocessing.build."""
    project = project_modules()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], alias.name if alias.name in project else None, [], node
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [a.name for a in node.names]
            if node.module in PACKAGES:
                for name in names:
                    yield node.module, f"{node.module}.{name}", [], node
            else:
                yield node.module.split(".")[0], node.module if node.module in project else None, names, node


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_import_graph_points_one_way(module):
    path = path_of(module)
    assert path.exists(), f"{module} is listed but missing"
    used = set()
    for top, name, names, node in _imports(path):
        assert top not in project_modules() | PACKAGES or name, f"{module} imports {top} (line {node.lineno})"
        if name:
            assert name in ALLOWED[module], f"{module} imports {name} (line {node.lineno})"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module} imports private {private} from {name}"
            used.add(name)
    if not module.startswith("preprocessing"):  # the root modules: the graph is drawn exactly
        assert used == ALLOWED[module], f"{module} no longer imports {sorted(ALLOWED[module] - used)}"


def test_every_module_is_in_the_graph_and_it_has_no_cycle():
    assert project_modules() == set(ALLOWED)
    for module, imports in ALLOWED.items():
        assert not any(module in closure(m) for m in imports), f"{module} imports itself through others"


def test_design_doc_draws_this_graph():
    """docs/design.md's Modules table has a row for each root module, naming exactly what it imports, and
    every import points down the table (the preprocessing package is its one row, `preprocessing/`)."""
    rows = {}
    for line in (REPO / "docs" / "design.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`\w+(\.py|/)`", cells[0]):
            imports = cells[2].split("(")[0]   # "none (torch only)": no project module
            rows[cells[0][1:].split(".")[0].rstrip("/`")] = {m.strip() for m in imports.split(",")} - {"none", ""}
    root = {m for m in ALLOWED if "." not in m}
    assert set(rows) == root, "docs/design.md's Modules table lists other modules than the root holds"
    order = list(rows)
    for module in root - PACKAGES:
        assert rows[module] == ALLOWED[module], f"docs/design.md: {module} imports {sorted(ALLOWED[module])}"
        below = [m for m in ALLOWED[module] if order.index(m.split(".")[0]) < order.index(module)]
        assert not below, f"docs/design.md lists {below} above {module}, which imports them"


def test_models_imports_only_torch():
    for top, _, _, node in _imports(REPO / "models.py"):
        assert top in {"torch", "dataclasses", "math", "__future__"}, f"models.py imports {top}"


def closure(module: str) -> set:
    """`module` and every project module it imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += ALLOWED[m]
    return seen


COPYABLE = ("models", "data", "runtime", "checkpoints", "health", "train", "evaluate", "embed", "metrics")


def test_core_modules_copy_with_only_what_they_name(tmp_path):
    """Each core module imports in a fresh interpreter from a folder holding it and the modules it names (and
    theirs) and nothing else: no preprocessing, no CLI, no generator. (A module imported inside a function,
    evaluate's meds_labels, is copied but not loaded.)"""
    script = ["import importlib, sys"]
    for module in COPYABLE:
        assert not any(m.startswith("preprocessing") for m in closure(module)), module
        folder = tmp_path / module
        folder.mkdir()
        for m in closure(module):
            shutil.copy(path_of(m), folder / f"{m}.py")
        script += [f"sys.path.insert(0, {str(folder)!r})", f"importlib.import_module({module!r})",
                   f"[sys.modules.pop(m, None) for m in {sorted(closure(module))!r}]", "sys.path.pop(0)"]
    done = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr


def test_runtime_dependencies_are_the_declared_ones():
    declared = {line.split(">")[0].split("=")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert declared == {"torch", "transformers", "numpy", "click", "rich"}
    stdlib = set(sys.stdlib_module_names)
    for module in ALLOWED:
        for top, _, _, node in _imports(path_of(module)):
            assert top in stdlib | project_modules() | PACKAGES | THIRD_PARTY | OPTIONAL, f"{module} imports {top}"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_every_function_fits_on_one_screen(module):
    """No function longer than 60 lines, the two training loops (train.pretrain, evaluate.finetune) included.
    No line budget per file: a module is as long as what it owns (issue 19: budgets had become targets)."""
    for node in ast.walk(ast.parse(path_of(module).read_text())):
        if isinstance(node, ast.FunctionDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= 60, f"{module}.{node.name} is {lines} lines (at most 60)"


# Lines of at most 100 characters in every .py file of the root, of the packages (preprocessing/)
# and of bench/; tests/ are not checked.
LINE_LIMIT = 100
LINE_CHECKED = sorted(p.relative_to(REPO).as_posix()
                      for folder in (REPO, *(REPO / package for package in PACKAGES), REPO / "bench")
                      for p in folder.glob("*.py"))


def test_line_limit_covers_every_module():
    assert {path_of(m).relative_to(REPO).as_posix() for m in ALLOWED} <= set(LINE_CHECKED)


@pytest.mark.parametrize("path", LINE_CHECKED)
def test_lines_are_at_most_100_characters(path):
    lines = (REPO / path).read_text().splitlines()
    long = [i for i, line in enumerate(lines, 1) if len(line) > LINE_LIMIT]
    assert not long, f"{path}: lines {long[:10]} are over {LINE_LIMIT} characters"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_docstring_and_no_device_literals(module):
    text = path_of(module).read_text()
    assert ast.get_docstring(ast.parse(text)), f"{module}.py has no module docstring"
    assert not re.search(r"cuda:\d", text), f"{module}.py names a CUDA device"
