"""A function refuses to start in the cloud with a local-only switch in its environment, or without
its project.

Each entry point is started for real, as functions-framework starts it (``create_app`` in a fresh
process, with nothing but the environment given here), with ``K_SERVICE`` set as Cloud Run sets it.
The entry points are found by reading functions/main.py, so one added later is tested too; the
switches are written here, not read from the code under test, so dropping one from the code fails.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from shared import config
from tests.conftest import ROOT

MAIN = ROOT / "functions" / "main.py"
# What only a developer's machine may set: each turns off ID-token signatures, or sends notifications,
# jobs or events somewhere that is not Google. Present at all (even blank) is refused in the cloud:
# firebase-admin and google-cloud-pubsub test the raw value, and " " is not empty to them.
LOCAL_ONLY_SWITCHES = (
    "FIREBASE_AUTH_EMULATOR_HOST",
    "FCM_ENDPOINT",
    "DELIVER_URL",
    "PUBSUB_EMULATOR_HOST",
    "ON_EVENT_URL",
)
ENTRY_POINT_DECORATORS = {"http", "cloud_event", "typed"}  # functions_framework.<these> declare an entry point


def entry_points() -> list[str]:
    """The functions in functions/main.py that functions-framework can serve (decorated with it)."""
    found = []
    for node in ast.parse(MAIN.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            target = decorator.func if isinstance(decorator, ast.Call) else decorator
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "functions_framework"
                and target.attr in ENTRY_POINT_DECORATORS
            ):
                found.append(node.name)
    return found


ENTRY_POINTS = entry_points()


def test_the_scan_finds_every_entry_point() -> None:
    assert {"register", "send", "deliver", "on_event", "prune"} <= set(ENTRY_POINTS), ENTRY_POINTS


def cloud_env(**extra: str) -> dict[str, str]:
    """A deployed function's environment: K_SERVICE and the project set, no local-only switch."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "K_SERVICE": "pushline-under-test",
        "GOOGLE_CLOUD_PROJECT": "demo-cloud-safety",
        "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: nothing connects at start
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    env.update(extra)
    return env


START = "import functions_framework, sys; functions_framework.create_app(target=sys.argv[1], source=sys.argv[2])"


def start(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Start one entry point as functions-framework does, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-c", START, target, str(MAIN)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("target", ENTRY_POINTS)
def test_each_entry_point_starts_in_the_cloud_without_local_switches(target: str) -> None:
    started = start(target, cloud_env())
    assert started.returncode == 0, started.stderr


@pytest.mark.parametrize("switch", LOCAL_ONLY_SWITCHES)
@pytest.mark.parametrize("target", ENTRY_POINTS)
def test_a_blank_local_switch_stops_every_entry_point_in_the_cloud(target: str, switch: str) -> None:
    started = start(target, cloud_env(**{switch: " "}))
    assert started.returncode != 0, f"{target} started in the cloud with {switch}=' '"
    assert "ConfigError" in started.stderr, started.stderr
    assert switch in started.stderr, started.stderr


@pytest.mark.parametrize("project", [None, "", "  "], ids=["unset", "empty", "blank"])
@pytest.mark.parametrize("target", ENTRY_POINTS)
def test_no_project_stops_every_entry_point_in_the_cloud(target: str, project: str | None) -> None:
    env = cloud_env()
    if project is None:
        del env["GOOGLE_CLOUD_PROJECT"]
    else:
        env["GOOGLE_CLOUD_PROJECT"] = project
    started = start(target, env)
    assert started.returncode != 0, f"{target} started in the cloud with GOOGLE_CLOUD_PROJECT={project!r}"
    assert "ConfigError" in started.stderr and "GOOGLE_CLOUD_PROJECT" in started.stderr, started.stderr


# --- the check itself, for every way a switch can be present (no process needed) ------------------


@pytest.mark.parametrize("value", ["", " ", "\t", "127.0.0.1:9099"], ids=["empty", "space", "tab", "set"])
@pytest.mark.parametrize("switch", LOCAL_ONLY_SWITCHES)
def test_a_present_switch_is_refused_whatever_its_value(switch: str, value: str) -> None:
    settings = config.load(cloud_env(**{switch: value}))
    with pytest.raises(config.ConfigError, match=switch):
        config.check_cloud_safety(settings)


def test_every_problem_is_named_at_once() -> None:
    env = cloud_env(FCM_ENDPOINT="", FIREBASE_AUTH_EMULATOR_HOST=" ")
    del env["GOOGLE_CLOUD_PROJECT"]
    with pytest.raises(config.ConfigError) as raised:
        config.check_cloud_safety(config.load(env))
    for name in ("FCM_ENDPOINT", "FIREBASE_AUTH_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"):
        assert name in str(raised.value)


def test_outside_the_cloud_blank_switches_and_no_project_are_fine() -> None:
    env = {switch: " " for switch in LOCAL_ONLY_SWITCHES}
    settings = config.load(env)
    config.check_cloud_safety(settings)  # no K_SERVICE: a developer's machine
    assert settings.google_cloud_project == "demo-pushline"
