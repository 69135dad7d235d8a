"""Layout rules (issue 14): no module of `ctt/` or `callbacks/` over 400 lines, no function over 60 lines, so a file
or a function keeps to one job. Checked with `ast`, no imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ctt", "callbacks")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_packages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert {"ctt/generation.py", "ctt/models/loading.py", "callbacks/token_export.py"} <= names


def test_no_module_over_400_lines():
    lines = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in _modules()}
    long = {name: n for name, n in lines.items() if n > MAX_FILE_LINES}
    assert not long, f"modules over {MAX_FILE_LINES} lines (split them by job): {long}"


def test_no_function_over_60_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # decorators excluded, docstring included
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"
