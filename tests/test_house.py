"""The house rules of docs/architecture.md, checked: training never imports the offline packer, and
no function, class or module grows past one screen's worth of reading."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250
MAX_MODULE_LINES = 500


def test_training_never_imports_the_offline_packer():
    probe = ("import sys, cpt_ds.trainer, cpt_ds.export, cpt_ds.preflight; "
             "print(sorted(name for name in sys.modules if name.startswith('cpt_ds.pack')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    # The probe itself can see the packer, so an empty answer is not an import failure.
    seen = subprocess.run([sys.executable, "-c", probe.replace("cpt_ds.preflight", "cpt_ds.pack.packing")],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert "cpt_ds.pack.packing" in seen.stdout


def oversized(paths, root=REPO) -> list[str]:
    """``path:line name (N lines)`` for every function, class or module past its limit."""
    found = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(root)
        if name.parts[0] == "cpt_ds" and len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{name} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
                length = node.end_lineno - first + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if length > limit:
                    found.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_class_or_module_past_its_limit():
    paths = sorted((REPO / "cpt_ds").rglob("*.py")) + sorted((REPO / "tools").glob("*.py")) + [REPO / "train.py"]
    assert oversized(paths) == []


def test_the_size_check_sees_what_it_guards(tmp_path):
    at_limit = "@decorated\ndef f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 2)  # decorator counted
    too_long = "def g():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    big_class = "class C:\n" + "    y = 2\n" * MAX_CLASS_LINES
    text = at_limit + too_long + big_class
    module = tmp_path / "cpt_ds" / "probe.py"
    module.parent.mkdir()
    module.write_text(text + "\n" * (MAX_MODULE_LINES - len(text.splitlines()) + 1))
    assert oversized([module], root=tmp_path) == [
        f"cpt_ds/probe.py ({MAX_MODULE_LINES + 1} lines)",
        f"cpt_ds/probe.py:{MAX_FUNCTION_LINES + 1} g ({MAX_FUNCTION_LINES + 1} lines)",
        f"cpt_ds/probe.py:{2 * MAX_FUNCTION_LINES + 2} C ({MAX_CLASS_LINES + 1} lines)"]


def test_modules_imported(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom conftest import REPO\nimport test_x as x\n\ndef f():\n    from test_y import g\n"
                     "    from .helpers_data import h\n")
    assert modules_imported(probe) == {"os", "conftest", "test_x", "test_y", "helpers_data"}


def modules_imported(path) -> set[str]:
    """Top-level module names ``path`` imports, at any depth of the file (local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_test_module():
    """Shared test code lives in conftest.py and tests/helpers*.py, so any test file runs alone and in
    any order; benchmarks may not borrow from tests either."""
    users = sorted((REPO / "tests").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    borrowed = {str(path.relative_to(REPO)): sorted(name for name in modules_imported(path) if name.startswith("test_"))
                for path in users}
    assert {path: names for path, names in borrowed.items() if names} == {}
    benchmarks = {str(path.relative_to(REPO)) for path in (REPO / "benchmarks").rglob("*.py")
                  if modules_imported(path) & {"conftest", "helpers_data", "helpers_runs", "helpers_pool"}}
    assert benchmarks == set()
