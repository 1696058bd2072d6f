"""The layout ARCHITECTURE.md describes is the layout of the code: no cycles, no upward imports, short functions."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "fc2conv"
MAX_FUNCTION_LINES = 60  # body lines, docstring excluded


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every fc2conv module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fc2conv":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fc2conv")
    return {name for name in found if name in MODULES}


def _documented_order() -> list[str]:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text[text.index("## Modules") :]
    return re.findall(r"^\| `(fc2conv[\w.]*)` \|", section, flags=re.MULTILINE)


def test_every_module_is_in_the_architecture_table_once():
    order = _documented_order()
    assert len(order) == len(set(order))
    assert set(order) == set(MODULES), (set(MODULES) - set(order), set(order) - set(MODULES))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_up_the_table(module):
    """A module imports only modules listed above it: no cycle and no import of a later stage."""
    order = _documented_order()
    position = {name: i for i, name in enumerate(order)}
    later = sorted(d for d in _imports(MODULES[module]) - {module} if position[d] > position[module])
    assert not later, f"{module} imports {later}, listed below it in ARCHITECTURE.md"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def test_functions_are_short():
    long = [
        f"{_module_name(path)}.{function.name}: {_body_lines(function)} lines"
        for path in MODULES.values()
        for function in _functions(ast.parse(path.read_text()))
        if _body_lines(function) > MAX_FUNCTION_LINES
    ]
    assert not long, long


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_says_what_it_is_for(module):
    tree = ast.parse(MODULES[module].read_text())
    assert ast.get_docstring(tree), f"{module} has no docstring"


@pytest.mark.slow
def test_importing_the_package_imports_no_heavy_library():
    heavy = "('torch', 'rich', 'safetensors', 'numpy')"
    code = f"import sys, fc2conv, fc2conv.cli\nprint(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_mypy_passes():
    """The package type-checks (mypy, configured in pyproject.toml): part of the test run, so of CI."""
    api = pytest.importorskip("mypy.api")
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), str(PACKAGE)])
    assert status == 0, stdout + stderr


@pytest.mark.slow
def test_ruff_passes():
    """The code lints and is formatted (ruff, configured in pyproject.toml): part of the test run, so of CI."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (the test extra has it)")
    folders = [str(ROOT / f) for f in ("fc2conv", "tests", "benchmarks", "sample_models", "examples")]
    for args in (["check", *folders], ["format", "--check", *folders]):
        done = subprocess.run([ruff, *args], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
