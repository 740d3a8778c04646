"""The house rules that code review keeps forgetting, checked on the source itself (ast, not grep where it matters).

- ``shared/`` is what runs in the cloud: it never imports ``local/`` (development-only code);
  ``functions/main.py`` imports ``local/`` only behind the ``DELIVER_URL`` switch the cloud refuses.
- No decision is taken by reading an error message's text.
- One definition each of the things that used to be copied: the platforms, the number of fan-out parts.
- Entry points: ``functions/main.py``'s docstring names every one; ``shared/cli.py`` is the one command in ``shared/``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "shared"
MAIN = ROOT / "functions" / "main.py"


def modules(folder: Path) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported(node: ast.AST) -> list[str]:
    """The top-level package names an import statement reads (relative imports stay inside their package)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def test_shared_never_imports_local() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path, tree in modules(SHARED)
        for node in ast.walk(tree)
        if "local" in imported(node)
    ]
    assert found == []
    # nor by name, around the scan above
    for path, tree in modules(SHARED):
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.fullmatch(r"local(\.\w+)*", node.value), f"{path.relative_to(ROOT)}:{node.lineno}"


def _deliver_url_guards(tree: ast.Module) -> dict[ast.AST, bool]:
    """Each node of the module -> whether it sits inside an ``if`` whose test reads ``deliver_url``."""
    guarded: dict[ast.AST, bool] = {}

    def visit(node: ast.AST, inside: bool) -> None:
        guarded[node] = inside
        for child in ast.iter_child_nodes(node):
            reads = isinstance(node, ast.If) and child in node.body and "deliver_url" in ast.unparse(node.test)
            visit(child, inside or reads)

    visit(tree, False)
    return guarded


def test_functions_main_imports_local_only_behind_deliver_url() -> None:
    tree = ast.parse(MAIN.read_text(encoding="utf-8"))
    guarded = _deliver_url_guards(tree)
    local_imports = [node for node in ast.walk(tree) if "local" in imported(node)]
    assert all(guarded[node] for node in local_imports), [ast.unparse(n) for n in local_imports if not guarded[n]]


def test_no_decision_reads_an_error_message() -> None:
    """Exceptions carry what a caller needs (a type, a field); nothing branches on their text."""
    text_tests = re.compile(r"(str\((exc|e|err|error)\)|\.message|\.args\[0\])\s*\.(startswith|endswith)\(|in str\(")
    found = []
    for path in sorted((*SHARED.rglob("*.py"), MAIN)):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if text_tests.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_platforms_are_defined_once() -> None:
    definitions = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path, tree in modules(SHARED)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and any(
            isinstance(t, ast.Name) and t.id == "PLATFORMS"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    assert [d.split(":")[0] for d in definitions] == ["shared/jobs.py"], definitions


def test_the_number_of_parts_is_computed_in_one_place() -> None:
    """``-(-a // b)`` (ceiling division) was copied into send, deliver and the benchmark: jobs.part_count now."""
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in (SHARED, ROOT / "bench", ROOT / "functions")
        for path in sorted(folder.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "-(-" in line.replace(" ", "")
    ]
    assert found == []


def test_main_docstring_lists_every_entry_point() -> None:
    tree = ast.parse(MAIN.read_text(encoding="utf-8"))
    entry_points = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(
            ast.unparse(d) in ("functions_framework.http", "functions_framework.cloud_event")
            for d in node.decorator_list
        )
    ]
    assert sorted(entry_points) == ["deliver", "on_event", "prune", "register", "send", "tick"]
    doc = ast.get_docstring(tree) or ""
    listed = re.findall(r"^\s+(\w+)\s+\((?:HTTP|CloudEvent)\)", doc, flags=re.MULTILINE)
    assert sorted(listed) == sorted(entry_points)


def test_cli_is_the_only_command_in_shared() -> None:
    """A module run as a program is an entry point; shared/ has one (the operator CLI)."""
    commands = [
        path.name
        for path, tree in modules(SHARED)
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    ]
    assert commands == ["cli.py"]


def test_no_function_is_longer_than_80_lines() -> None:
    """Issue 19: the send loop and every other function read in one screen (docstring included)."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for folder in (SHARED, MAIN.parent)
        for path, tree in modules(folder)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long
