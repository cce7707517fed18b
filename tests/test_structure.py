"""The shape of the package: no import cycle inside `nla/`, function-local imports counted too.

A cycle means two modules each need the other to make sense, so neither can be read (or
tested) alone; the metric living inside a stage module was one. Function-local imports are
followed as well, since they hide a cycle rather than remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nla"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nla_imports(path: Path) -> set[str]:
    """Every `nla.*` module that `path` imports anywhere in its body (top level or inside functions)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nla"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] == "nla":
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def with_parents(modules: set[str]) -> set[str]:
    """Importing `nla.a.b.c` runs `nla.a` and `nla.a.b` first (their `__init__`), so they count too."""
    return {".".join(m.split(".")[:i]) for m in modules for i in range(2, m.count(".") + 2)}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        # A module's own ancestors are already importing when it runs: not an edge.
        name: {
            m for m in with_parents(nla_imports(path)) if m in modules and m != name and not name.startswith(m + ".")
        }
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_nla():
    graph = import_graph()
    assert len(graph) > 10  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nla_modules_import_nla_modules_at_top_level():
    """Function-local `nla.*` imports are only allowed where they keep `nla --help` fast (the CLI)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "__init__.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nla":
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
    assert not offenders, "function-local nla imports: " + ", ".join(offenders)
