"""Every reference in the docs, docstrings and comments resolves inside the repository.

A user gets this repository and nothing beside it, so a path that climbs out of it
(`../x`), a note that only exists elsewhere (`DESIGN.md` instead of `docs/design.md`) or a
file that was renamed leaves them a dead reference. Checked, in the markdown docs, in the
docstrings and comments of `nla/` and `flows/`, and in the comments of the shell scripts and
of the project's YAML/TOML files:

- relative markdown links ``[text](path)``: must exist, relative to the file;
- backticked paths (``docs/x.md``, ``nla/x.py``): relative to the repository root, where every
  command runs; they must exist when they name a source folder (`SOURCE_ROOTS`) or a markdown
  file. Outputs that a stage writes (``data/...``, ``metrics/eval.json``) may be absent and are
  not checked; dotted module names (``nla.io``) and formulas (``v/‖v‖``) are not paths;
- any ``../`` path outside a markdown link, backticked or not: it leaves the repository;
- the names of notes that live outside the repository (`ELSEWHERE`), anywhere.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = ("README.md", "docs/*.md", "benchmarks/README.md", "reports/gpu_run.md")
PYTHON = ("nla/**/*.py", "flows/*.py")
HASH_COMMENTED = (
    "scripts/*.sh",
    "benchmarks/*.sh",
    "pyproject.toml",
    "dvc.yaml",
    "params.yaml",
    "prefect.yaml",
    "profiles/*.yaml",
)
SOURCE_ROOTS = {"nla", "flows", "docs", "tests", "scripts", "benchmarks", "profiles"}
UNCHECKED_ROOTS = {"data"}  # stage outputs: a reference to data/x.md need not exist in a checkout
ELSEWHERE = re.compile(r"(?<!\w)(?:DESIGN|INTEROP|ENVIRONMENT|STYLE)\.md\b|/work/shared")

LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\s]+)`")
CLIMB = re.compile(r"(?<![\w.~/-])((?:\.\./)+[^\s`'\")\]<>|,;]*)")
PATHLIKE = re.compile(r"(?:\.{1,2}/)*[\w.*-]+(?:/[\w.*-]+)*/?")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


# ----------------------------------------------------------------------------- where the prose is


def markdown_lines(path: Path) -> list[tuple[int, str]]:
    return list(enumerate(path.read_text(encoding="utf-8").splitlines(), start=1))


def python_lines(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring line and comment: the prose of a module, not its strings."""
    source = path.read_text(encoding="utf-8")
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines = first.value.value.splitlines()
                out += [(first.value.lineno + i, text) for i, text in enumerate(lines)]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def hash_comment_lines(path: Path) -> list[tuple[int, str]]:
    """The `#` comments of a shell, YAML or TOML file: whole comment lines and trailing `` # `` ones."""
    out = []
    for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.lstrip().startswith("#") and not text.startswith("#!"):
            out.append((i, text))
        elif " # " in text:
            out.append((i, text.split(" # ", 1)[1]))
    return out


def documented_files(root: Path) -> list[tuple[Path, list[tuple[int, str]]]]:
    files = []
    for patterns, reader in ((MARKDOWN, markdown_lines), (PYTHON, python_lines), (HASH_COMMENTED, hash_comment_lines)):
        for pattern in patterns:
            files += [(p, reader(p)) for p in sorted(root.glob(pattern)) if p.is_file()]
    return files


# ----------------------------------------------------------------------------- the checks


def _inside(path: str, root: Path) -> str | None:
    """`path` relative to `root` (normalised), or None when it leaves the repository."""
    rel = os.path.relpath(os.path.normpath(path), root)
    return None if rel == ".." or rel.startswith(".." + os.sep) else rel


def _exists(rel: str, root: Path) -> bool:
    if "*" in rel:
        return any(root.glob(rel.rstrip("/")))
    return (root / rel).exists()


def check_path(target: str, here: Path, root: Path, *, link: bool = False) -> str | None:
    """The problem with one referenced path (None: fine).

    A markdown link is relative to its file (`here`, the file's folder) and must exist. A path
    in prose or code is relative to the repository root, where every command runs, so any
    ``../`` in it leaves the repository.
    """
    rel = _inside(str((here if link else root) / target), root)
    if rel is None:
        return f"{target} leaves the repository"
    if not link and target.endswith(".md") and "/" not in target:  # a bare note name: beside the file or at the root
        beside = _inside(str(here / target), root)
        if not _exists(target, root) and (beside is None or not _exists(beside, root)):
            return f"{target} is not in the repository (neither beside the file nor at its root)"
        return None
    first = Path(rel).parts[0] if Path(rel).parts else ""
    must_exist = link or first in SOURCE_ROOTS or (rel.endswith(".md") and first not in UNCHECKED_ROOTS)
    if must_exist and not _exists(rel, root):
        return f"{target} does not exist"
    return None


def line_problems(text: str, here: Path, root: Path) -> list[str]:
    problems: list[str] = []
    for match in ELSEWHERE.finditer(text):
        problems.append(f"{match.group(0)} is not in the repository; point at docs/design.md or docs/maintainers.md")
    for match in LINK.finditer(text):
        target = match.group(1).split("#", 1)[0]
        if not target or SCHEME.match(target):
            continue  # an anchor in the same page, or a URL
        if target.startswith("/"):
            problems.append(f"link {target} is absolute; make it relative to the file")
        elif (problem := check_path(target, here, root, link=True)) is not None:
            problems.append(f"link {problem}")
    for match in CODE.finditer(text):
        target = match.group(1)
        is_path = PATHLIKE.fullmatch(target) and ("/" in target or target.endswith(".md"))
        if is_path and (problem := check_path(target, here, root)) is not None:
            problems.append(problem)
    for match in CLIMB.finditer(LINK.sub("", text)):  # link targets are relative to their file: checked above
        if (problem := check_path(match.group(1).rstrip(".:"), here, root)) is not None:
            problems.append(problem)
    return list(dict.fromkeys(problems))  # a backticked ../path is found twice: say it once


def repository_problems(root: Path) -> list[str]:
    found = []
    for path, lines in documented_files(root):
        for line, text in lines:
            for problem in line_problems(text, path.parent, root):
                found.append(f"{path.relative_to(root)}:{line}: {problem}")
    return found


# ----------------------------------------------------------------------------- the repository


def test_every_reference_resolves_inside_the_repository():
    problems = repository_problems(ROOT)
    assert not problems, "references that do not resolve inside the repository:\n" + "\n".join(problems)


def test_the_checker_reads_the_docs_it_promises():
    names = {str(p.relative_to(ROOT)) for p, _ in documented_files(ROOT)}
    for expected in ("README.md", "docs/design.md", "docs/architecture.md", "docs/maintainers.md",
                     "benchmarks/README.md", "nla/injection.py", "nla/label/stage.py", "flows/pipeline.py",
                     "scripts/gpu_pipeline.sh", "benchmarks/gpu_session.sh"):  # fmt: skip
        assert expected in names


# ----------------------------------------------------------------------------- the checker itself


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for rel in ("docs/design.md", "nla/io.py", "reports/gpu_run.md", "benchmarks/results-cpu.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    return tmp_path


@pytest.mark.parametrize(
    "text, problem",
    [
        ("Contracts: [design](../../shared/DESIGN.md)", "leaves the repository"),
        ("Contracts: `../shared/DESIGN.md`", "leaves the repository"),
        ("run `bash ../shared/device/prepare.sh` first", "leaves the repository"),
        ("bash ../../elsewhere/prepare.sh", "leaves the repository"),
        ("the run in `../reports/gpu_run.md`", "leaves the repository"),
        ("[up and out](../../x.md)", "link ../../x.md leaves the repository"),
        ('One step (DESIGN.md "RL"):', "DESIGN.md is not in the repository"),
        ("see /work/shared/ENVIRONMENT.md", "not in the repository"),
        ("the layout: `nla/missing.py`", "nla/missing.py does not exist"),
        ("[the flow](flows/pipeline.py)", "link flows/pipeline.py does not exist"),
        ("[absolute](/etc/passwd)", "absolute"),
        ("`docs/gone.md`", "docs/gone.md does not exist"),
        ("`NOTES.md`", "NOTES.md is not in the repository"),
        ("results in `benchmarks/results-*.txt`", "does not exist"),
    ],
)
def test_checker_flags_a_planted_bad_reference(repo: Path, text: str, problem: str):
    found = line_problems(text, repo / "benchmarks", repo)
    assert any(problem in p for p in found), found


@pytest.mark.parametrize(
    "text",
    [
        "Contracts: [design](../docs/design.md) and `docs/design.md`",
        "atomic writes live in `nla.io`; `nla/io.py` holds them",
        "writes `data/activations/` and `metrics/eval.json` (stage outputs, absent in a checkout)",
        "`u = v/‖v‖` and `hidden_states[K+1]` and `v/||v||` and `1/64`",
        "summarised in `reports/gpu_run.md`, table in `results-cpu.md`, all in `benchmarks/results-*.md`",
        "[the docs](https://example.org/DESIGN) and [here](#anchor)",
        "dir:.../tiny is a fingerprint, not a path",
        "the model at `/root/nla-model/model.gguf` on the GPU machine",
    ],
)
def test_checker_accepts_good_references_and_non_paths(repo: Path, text: str):
    assert line_problems(text, repo / "benchmarks", repo) == []


def test_checker_reads_docstrings_and_comments_not_code_strings(repo: Path):
    module = repo / "nla" / "stage.py"
    module.write_text(
        '"""Module docstring: see `nla/gone.py`."""\n'
        "\n"
        "PATH = '../outside/x.md'  # a comment naming DESIGN.md\n"
        "\n"
        "def f():\n"
        '    """Docstring naming `docs/design.md`, which exists."""\n'
        "    return '`nla/also_gone.py`'\n"
    )
    problems = repository_problems(repo)
    assert problems == [
        "nla/stage.py:1: nla/gone.py does not exist",
        "nla/stage.py:3: DESIGN.md is not in the repository; point at docs/design.md or docs/maintainers.md",
    ]
