"""Each DVC stage's `deps` name exactly the `nla/` modules its command imports, transitively.

DVC reruns a stage when a dep changes, so a missing module means stale outputs after a code
change and an extra one means needless reruns. The modules a stage runs are found the way
Python finds them: the `nla.*` imports inside the CLI function of the stage's command, then
the import closure of those (`test_structure.import_graph`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from test_structure import ROOT, import_graph

CLI = ROOT / "nla" / "cli.py"


def stage_entry_modules() -> dict[str, set[str]]:
    """CLI command name ('av-sft') -> the nla modules its stage function imports."""
    tree = ast.parse(CLI.read_text(encoding="utf-8"))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    table = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "STAGES")
    entries = {}
    for key, value in zip(table.keys, table.values, strict=True):
        fn = functions[value.elts[0].id]
        entries[key.value] = {
            node.module for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and node.module.startswith("nla")
        }
    return entries


def closure(modules: set[str], graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


def module_file(module: str) -> str:
    path = Path(*module.split("."))
    return str(path / "__init__.py") if (ROOT / path).is_dir() else str(path.with_suffix(".py"))


def declared_code_deps(deps: list[str]) -> set[str]:
    """The nla/ files a stage's deps cover (a folder dep covers every .py file under it)."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        if dep.startswith("nla/"):
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")} if path.is_dir() else {dep}
    return files


def test_every_stage_depends_on_exactly_the_modules_it_imports():
    graph = import_graph()
    entries = stage_entry_modules()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        command = stage["cmd"].split()[1]
        needed = {module_file(m) for m in closure(entries[command], graph)}
        declared = declared_code_deps(stage.get("deps", []))
        if missing := sorted(needed - declared):
            problems.append(f"{name}: missing {missing}")
        if extra := sorted(declared - needed):
            problems.append(f"{name}: not imported {extra}")
    assert not problems, "; ".join(problems)


def test_closure_follows_imports_transitively():
    graph = {"nla.a": {"nla.b"}, "nla.b": {"nla.c"}, "nla.c": set(), "nla.d": set()}
    assert closure({"nla.a"}, graph) == {"nla.a", "nla.b", "nla.c"}
