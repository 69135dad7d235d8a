"""Layout rules: no module of `ctt/` or `callbacks/` over 400 lines, no function over 60 lines, so a file or a function
keeps to one job (issue 14); no import cycle and no import from a layer above, so the packages read as the data path
(issue 19). Checked with `ast`, no imports."""

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
    assert {"ctt/engine/hf.py", "ctt/models/loading.py", "ctt/data/sources.py", "callbacks/token_export.py"} <= names


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


# --- the import graph (issue 19): no cycle, and no import from a layer above -------------------------------------
# The layers of the data path, from the ground up. A module may import only from its own layer or one below; a module
# of `ctt/` that is in no layer fails the test, so a new package is placed here on purpose. Longest prefix wins.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ctt.errors", "ctt.settings", "ctt.outputs", "ctt.writes", "ctt.text", "ctt.inputs"),
    ("ctt.models", "ctt.organism.tokenizer"),
    ("ctt.engine",),  # runs a model (the vLLM engine reads the token overlay)
    ("ctt.data", "ctt.organism.task"),  # the organism's task is a data source
    ("ctt.rewards",),
    ("ctt.policy",),
    ("ctt.rl",),
    ("ctt.reliability",),
    ("ctt.training",),
    ("ctt.evaluation",),
    ("ctt.config", "ctt.organism"),
    ("ctt.api",),
    ("ctt.train", "ctt.eval", "ctt.export", "ctt.generate", "ctt.report", "ctt", "callbacks"),  # the commands
)


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every module of ctt/ or callbacks/ that `path` imports, anywhere in it (also inside functions and under
    TYPE_CHECKING: a type-only loop is still a loop a reader has to follow)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    paths = {_name(p): p for p in _modules()}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def _layer(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "ctt" and module.startswith(prefix + ".")):  # `ctt`: its __init__
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
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
    cycles = _cycles(_graph())
    assert not cycles, f"modules that import each other (break the loop: move the shared piece down): {cycles}"


def test_no_module_imports_from_a_layer_above():
    graph = _graph()
    unplaced = sorted(m for m in graph if _layer(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS (place their package): {unplaced}"
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
    assert not upward, f"imports from a layer above (move the shared piece down, or hand it in): {upward}"


def test_the_graph_checks_can_fail():
    """The checks above see a loop and an upward import when there is one."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("ctt.data.sources") < _layer("ctt.rl.reinforce") < _layer("ctt.train")
    assert "ctt.data.problems" in _graph()["ctt.data.sources"]
    assert _layer("ctt.new_module") is None and _layer("ctt") == len(LAYERS) - 1
