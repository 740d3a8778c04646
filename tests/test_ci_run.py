"""`.ci/run` is what CI runs: exactly the README's test command (`./emulator.sh test`), with `CI=true`
set by the script itself, so a runner without gcloud or Chromium fails instead of skipping the
guarantees, and a run that collects nothing fails too.

The real `.ci/run` and the real `emulator.sh` run in a copy of the project's top level whose test
directory is a tiny probe (one test file, the suite's conftest loaded as a plugin); the copy's
`.venv` is a wrapper around this Python whose requirements stamp matches, so `emulator.sh` installs
nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")


def ci_tree(tmp_path: Path, probe: str | None) -> Path:
    """A copy of the project's top level whose tests are ``probe`` (None: no test at all)."""
    tree = tmp_path / "project"
    (tree / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", tree / ".ci" / "run")
    shutil.copy2(ROOT / "emulator.sh", tree / "emulator.sh")
    for name in REQUIREMENTS:
        shutil.copy2(ROOT / name, tree / name)
    (tree / "local").mkdir()
    (tree / "local" / "install_browser.sh").write_text("#!/usr/bin/env bash\nexit 0\n")
    venv_bin = tree / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    stamp = hashlib.sha256(b"".join((tree / name).read_bytes() for name in REQUIREMENTS)).hexdigest()
    (tree / ".venv" / ".requirements.sha").write_text(stamp + "\n")
    # the suite's own conftest (its require() and its CI hook) as a plugin, as it is for tests/
    (tree / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\ntestpaths = ["probe"]\naddopts = "-ra -p tests.conftest"\n'
    )
    (tree / "probe").mkdir()
    if probe is not None:
        (tree / "probe" / "test_probe.py").write_text(probe)
    return tree


def run_ci(tree: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    env["PYTHONPATH"] = str(ROOT)  # the probe imports the suite's own conftest helpers
    env["PYTEST_ADDOPTS"] = "-p no:cacheprovider"
    return subprocess.run(
        ["bash", str(tree / ".ci" / "run")], cwd=tmp_cwd(tree), env=env, capture_output=True, text=True, timeout=120
    )


def tmp_cwd(tree: Path) -> Path:
    """Run from elsewhere: `.ci/run` must find the project from its own path."""
    return tree.parent


MISSING_SERVICE = """
from tests.conftest import require

def test_needs_a_service():
    require(False, "the probe's service is not installed")
"""

PLAIN_SKIP = """
import pytest

def test_skips():
    pytest.skip("a skip that names no service")
"""

PASSING = """
import os

def test_sees_ci():
    assert os.environ["CI"] == "true"
"""


def test_ci_run_is_the_readme_command_and_sets_ci_itself() -> None:
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == "./emulator.sh test"  # exactly the README's command, nothing after it
    assert sum("emulator.sh" in c for c in commands) == 1
    assert "export CI=true" in commands[: commands.index("./emulator.sh test")]
    assert "`bash .ci/run` (what CI runs) is exactly `./emulator.sh test`" in (ROOT / "README.md").read_text()


def test_a_missing_service_fails_a_ci_run_whose_runner_set_no_ci(tmp_path: Path) -> None:
    result = run_ci(ci_tree(tmp_path, MISSING_SERVICE))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "required under CI=true: the probe's service is not installed" in result.stdout


def test_any_skip_fails_a_ci_run(tmp_path: Path) -> None:
    result = run_ci(ci_tree(tmp_path, PLAIN_SKIP))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped under CI=true" in result.stdout and "a skip that names no service" in result.stdout


def test_a_ci_run_that_collects_nothing_fails(tmp_path: Path) -> None:
    result = run_ci(ci_tree(tmp_path, None))
    assert result.returncode == 5, result.stdout + result.stderr  # pytest's "no tests collected"


def test_a_passing_ci_run_passes(tmp_path: Path) -> None:
    result = run_ci(ci_tree(tmp_path, PASSING))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


@pytest.mark.parametrize("ci", ["", "false"])
def test_outside_ci_a_missing_service_skips(tmp_path: Path, ci: str) -> None:
    """The other side of the switch: a developer without gcloud still gets a green run, told what was skipped."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test_probe.py").write_text(MISSING_SERVICE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    env.update(CI=ci, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.conftest", "-rs", str(probe)],
        cwd=probe,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "the probe's service is not installed" in result.stdout
