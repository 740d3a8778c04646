"""The checks a reviewer would run first: ruff (lint and format) and mypy, as configured in
pyproject.toml. They run with the suite, so `.ci/run` (the README's test command) fails on them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "."), ("ruff", "format", "--check", "."), ("mypy",)],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_clean(command: tuple[str, ...]) -> None:
    result = _run(str(BIN / command[0]), *command[1:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_is_strict_where_the_cloud_runs() -> None:
    """functions/ and shared/ (what is deployed) must be fully annotated: a def without types fails."""
    config = (ROOT / "pyproject.toml").read_text()
    overrides = config.split("[[tool.mypy.overrides]]", 1)[1]
    assert '"shared.*"' in overrides and '"functions.*"' in overrides
    assert "disallow_untyped_defs = true" in overrides


def test_every_type_ignore_says_why() -> None:
    """No bare `# type: ignore`: each names its error code and gives a reason on the same line."""
    bare = []
    for path in sorted([*ROOT.glob("shared/*.py"), *ROOT.glob("functions/*.py"), *ROOT.glob("local/*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "type: ignore" in line and not re.search(r"type: ignore\[[a-z-, ]+\]\s+#\s*\S", line):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "\n".join(bare)
