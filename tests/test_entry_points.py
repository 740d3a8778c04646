"""functions/main.py imports its use cases plainly, inside each entry point: visible to grep and to
the type checker, and still lazy (a cold start loads only what the function it serves needs)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "functions" / "main.py"
USE_CASES = ("accept", "registration", "delivery", "domain", "inbound", "auth", "jobs", "bus", "fcm", "events")
ENTRY_DECORATORS = ("functions_framework.http", "functions_framework.cloud_event")

COLD_START = """
import json, sys
sys.path.insert(0, "functions")
import main
def loaded():
    return sorted(m.removeprefix("shared.") for m in sys.modules if m.startswith("shared."))
at_import = loaded()
from cloudevents.http import CloudEvent
main.deliver(CloudEvent({"type": "t", "source": "//s"}, {"message": {"data": "!!!"}}))  # malformed: acknowledged
print(json.dumps({"at_import": at_import, "after_deliver": loaded()}))
"""


def test_importing_main_loads_no_use_case_until_an_entry_point_runs(env: dict[str, str]) -> None:
    run = subprocess.run(
        [sys.executable, "-c", COLD_START],
        cwd=ROOT,
        env={**os.environ, **env, "LOG_LEVEL": "ERROR"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert not set(USE_CASES) & set(loaded["at_import"]), loaded["at_import"]
    after = set(loaded["after_deliver"])
    assert {"delivery", "inbound", "jobs"} <= after
    assert not {"accept", "registration", "domain", "auth", "fcm"} & after  # deliver loads only its own


def _entry_points() -> list[ast.FunctionDef]:
    tree = ast.parse(MAIN.read_text(encoding="utf-8"))
    return [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) in ENTRY_DECORATORS for d in node.decorator_list)
    ]


def test_main_imports_plainly() -> None:
    """No ``importlib`` indirection: every use case module is named by an ``from shared import ...``."""
    source = MAIN.read_text(encoding="utf-8")
    assert "importlib" not in source and "_use(" not in source
    tree = ast.parse(source)
    imported_inside = {
        alias.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and node.module == "shared"
        for alias in node.names
    }
    assert {"accept", "registration", "delivery", "domain", "inbound", "auth", "jobs"} <= imported_inside
    at_top = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "shared"
        for alias in node.names
    }
    assert not set(USE_CASES) & at_top, at_top


def test_the_docstring_lists_every_entry_point() -> None:
    doc = ast.get_docstring(ast.parse(MAIN.read_text(encoding="utf-8"))) or ""
    listed = {line.split()[0] for line in doc.splitlines() if line.startswith("  ") and line.split()}
    assert {f.name for f in _entry_points()} <= listed
