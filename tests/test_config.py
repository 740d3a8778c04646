"""Configuration is one table: each variable declared once in shared/config.py drives loading, the
cloud-safety check, the README's tables and the warning about variables nothing reads.

The README is parsed here (its configuration tables, row by row) and compared with the declarations;
the warning is checked through a real start of the function module (functions-framework's
``create_app`` in a process of its own, its stderr read as JSON lines).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from shared import config
from tests.conftest import ROOT

README = ROOT / "README.md"
MAIN = ROOT / "functions" / "main.py"
DAY = 86_400
# Read by a library, the platform or the test harness, not documented in the README: never warned about.
READ_ELSEWHERE = ("GCLOUD_PROJECT", "PORT", "PUSHLINE_TEST_DB", "PUSHLINE_TEST_REDIS_DB")


# --- the README's tables ------------------------------------------------------------------------------


def configuration_tables() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The README's "Configuration" tables as {variable: cells}: the main one (variable, default,
    meaning) and the local-only one (variable, meaning)."""
    text = README.read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    tables: list[list[list[str]]] = [[]]
    for line in section.splitlines():
        if not line.startswith("|"):
            if tables[-1]:
                tables.append([])
            continue
        tables[-1].append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    found = [rows for rows in tables if rows]
    assert len(found) == 2, f"expected the main and the local-only table, found {len(found)}"
    main, local = found
    assert main[0] == ["variable", "default", "meaning"] and local[0] == ["variable", "meaning"], (main[0], local[0])

    def by_name(rows: list[list[str]]) -> dict[str, list[str]]:
        named = {}
        for row in rows[2:]:  # after the header and the |---| line
            names = re.findall(r"`([A-Z][A-Z0-9_]*)`", row[0])
            assert len(names) == 1, f"one variable per row: {row[0]}"
            assert names[0] not in named, f"{names[0]} twice"
            named[names[0]] = row
        return named

    return by_name(main), by_name(local)


def declared() -> dict[str, config.Variable]:
    return {v.name: v for v in config.VARIABLES}


def default_cell(v: config.Variable) -> str:
    """What the README's default column says for a declaration."""
    if v.shown_default:
        return v.shown_default
    if v.default is None:
        return "unset"
    if v.default == ():
        return "empty"
    days = v.default // DAY if isinstance(v.default, int) and v.name.endswith("_SECONDS") else 0
    if days > 1 and v.default % DAY == 0:
        return f"`{v.default}` ({days} days)"
    return f"`{v.default}`"


def rendered_row(v: config.Variable) -> list[str]:
    if v.local_only:
        return [f"`{v.name}`", v.meaning]
    return [f"`{v.name}`", default_cell(v), v.meaning]


def test_every_readme_variable_is_declared_with_the_same_default() -> None:
    main, local = configuration_tables()
    variables = declared()
    for name, row in main.items():
        assert name in variables, f"the README documents {name}, which nothing declares"
        v = variables[name]
        assert not v.local_only, f"{name} is local-only: it belongs in the local-only table"
        cell = row[1]
        shown = re.match(r"`([^`]*)`", cell)
        if v.default is None:
            assert shown is None or v.shown_default == cell, f"{name}: README default {cell!r}, declared unset"
            assert cell == (v.shown_default or "unset"), f"{name}: README default {cell!r}, declared unset"
        elif v.default == ():
            assert cell == "empty", f"{name}: README default {cell!r}, declared empty"
        else:
            assert shown is not None and shown.group(1) == str(v.default), (
                f"{name}: README default {cell!r}, declared {v.default!r}"
            )
    for name in local:
        assert name in variables, f"the README documents {name}, which nothing declares"
        assert variables[name].local_only, f"{name} is in the local-only table but not declared local-only"
        assert variables[name].default is None, f"{name}: a local-only variable has no default"


def test_every_declared_variable_is_in_the_readme() -> None:
    main, local = configuration_tables()
    for v in config.VARIABLES:
        table = local if v.local_only else main
        assert v.name in table, (
            f"{v.name} is declared but not in the README's {'local-only' if v.local_only else 'main'} table"
        )


def test_the_readme_rows_are_the_declarations() -> None:
    """Meaning and default column as declared: the README's table is the code's table, printed."""
    main, local = configuration_tables()
    expected = {v.name: rendered_row(v) for v in config.VARIABLES}
    actual = {**main, **local}
    wrong = [name for name in expected if actual.get(name) != expected[name]]
    table = "\n".join("| " + " | ".join(expected[name]) + " |" for name in wrong)
    assert not wrong, f"README rows differ from the declarations in shared/config.py; expected:\n{table}"


def test_a_declared_default_is_what_loading_nothing_gives() -> None:
    loaded = config.load({})
    for v in config.VARIABLES:
        if v.attr is not None:
            assert getattr(loaded, v.attr) == v.default, v.name


def test_the_local_only_variables_come_from_the_declarations() -> None:
    assert set(config.LOCAL_ONLY_VARIABLES) == {v.name for v in config.VARIABLES if v.local_only}
    assert {
        "FIREBASE_AUTH_EMULATOR_HOST",
        "FCM_ENDPOINT",
        "DELIVER_URL",
        "PUBSUB_EMULATOR_HOST",
        "ON_EVENT_URL",
    } <= set(config.LOCAL_ONLY_VARIABLES)


# --- loading: behaviour kept ----------------------------------------------------------------------------


def test_values_are_parsed_and_normalised_as_before() -> None:
    s = config.load(
        {
            "TOKEN_TTL_SECONDS": " 120 ",
            "FCM_CLIENT": "SDK",
            "LOG_LEVEL": "debug",
            "CORS_ALLOWED_ORIGINS": " https://a.example/ ,, https://b.example ",
            "GCLOUD_PROJECT": "from-gcloud",
            "REDIS_URL": "   ",
        }
    )
    assert s.token_ttl_seconds == 120
    assert s.fcm_client == "sdk"
    assert s.log_level == "DEBUG"
    assert s.cors_allowed_origins == ("https://a.example", "https://b.example")
    assert s.google_cloud_project == "from-gcloud" and not s.project_given
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    given = config.load({"GOOGLE_CLOUD_PROJECT": "given", "GCLOUD_PROJECT": "other"})
    assert given.google_cloud_project == "given" and given.project_given


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_ATTEMPTS": "five"}, "MAX_ATTEMPTS must be a whole number, got 'five'"),
        ({"MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS must be at least 1, got 0"),
        ({"FCM_RATE_PER_MINUTE": "-1"}, "FCM_RATE_PER_MINUTE must be at least 0, got -1"),
        ({"LEDGER_TTL_SECONDS": "59"}, "LEDGER_TTL_SECONDS must be at least 60, got 59"),
        ({"FCM_CLIENT": "grpc"}, "FCM_CLIENT must be 'http' or 'sdk', got 'grpc'"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.load(env)
    assert str(raised.value) == message


def test_bounds_in_a_declaration_name_the_variable() -> None:
    """The next variables (e.g. DELIVERY_WINDOW_SECONDS, refused above 50400) are one declaration each."""
    window = config.Variable("DELIVERY_WINDOW_SECONDS", 43200, "how long a job may wait", maximum=50400, kind="int")
    assert window.read({}) == 43200
    assert window.read({"DELIVERY_WINDOW_SECONDS": "50400"}) == 50400
    with pytest.raises(config.ConfigError, match=r"^DELIVERY_WINDOW_SECONDS must be at most 50400, got 50401$"):
        window.read({"DELIVERY_WINDOW_SECONDS": "50401"})


def test_a_delivery_window_longer_than_the_bus_can_carry_a_part_refuses_to_start() -> None:
    """Pub/Sub redelivers a part at most 100 times, at most 600 s apart (~16.7 h): 14 h at most."""
    assert config.load({}).delivery_window_seconds == 43_200
    assert config.load({"DELIVERY_WINDOW_SECONDS": "50400"}).delivery_window_seconds == 50_400
    refused = "DELIVERY_WINDOW_SECONDS must be at most 50400, got 50401"
    with pytest.raises(config.ConfigError, match=f"^{refused}$"):
        config.load({"DELIVERY_WINDOW_SECONDS": "50401"})
    for cloud in (False, True):
        env = {**known_env(cloud), "DELIVERY_WINDOW_SECONDS": "50401"}
        started, _ = start(env)
        assert started.returncode != 0 and refused in started.stderr, started.stderr


# --- unknown variables: one warning each at start ---------------------------------------------------------

UNKNOWN = {
    "FCM_MAX_INFLIGHT": "FCM_MAX_IN_FLIGHT",  # a close match with a prefix
    "REDIS_URLL": "REDIS_URL",
    "DELIVERY_PARALLELISM": None,  # a prefix, close to nothing
    "GOOGLE_CLOUD_PROJCT": "GOOGLE_CLOUD_PROJECT",  # a close match without a prefix
}


def test_unknown_variables_are_those_with_a_prefix_or_close_to_a_known_name() -> None:
    env = {**dict.fromkeys(UNKNOWN, "1"), "PATH": "/bin", "HOME": "/", "PUBSUB_PROJECT_ID": "p", "K_REVISION": "r"}
    env.update(dict.fromkeys(declared(), "1"))
    env.update(dict.fromkeys(READ_ELSEWHERE, "1"))
    assert config.unknown_variables(env) == sorted(UNKNOWN.items())


def known_env(cloud: bool) -> dict[str, str]:
    """Every variable the README documents (the local-only ones only off the cloud), and those read by
    libraries, each set to a value that loads: the documented default where there is one."""
    main, local = configuration_tables()
    env = {}
    for name, row in main.items():
        shown = re.match(r"`([^`]*)`", row[1])
        env[name] = shown.group(1) if shown else "4"
    if cloud:
        env["K_SERVICE"] = "pushline-config-test"
    else:
        env.update(dict.fromkeys(local, "127.0.0.1:1"))
        env.pop("K_SERVICE", None)
    env.update(dict.fromkeys(READ_ELSEWHERE, "8080"))
    env["GOOGLE_CLOUD_PROJECT"] = "demo-config-test"
    return env


def start(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """Start ``register`` as functions-framework does, in a process of its own; its JSON log lines."""
    started = subprocess.run(
        [
            sys.executable,
            "-c",
            "import functions_framework, sys; functions_framework.create_app(target='register', source=sys.argv[1])",
            str(MAIN),
        ],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = []
    for line in started.stderr.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return started, lines


@pytest.mark.parametrize("cloud", [False, True], ids=["local", "cloud"])
def test_each_unknown_variable_is_warned_about_once_at_start(cloud: bool) -> None:
    env = {**known_env(cloud), **dict.fromkeys(UNKNOWN, "redis://:hunter2@10.0.0.1:6379/0")}
    started, lines = start(env)
    assert started.returncode == 0, started.stderr
    warnings = [line for line in lines if line.get("logger") == "pushline.config"]
    assert sorted(w["variable"] for w in warnings) == sorted(UNKNOWN), started.stderr
    for w in warnings:
        assert w["severity"] == "WARNING"
        assert w["variable"] in w["message"]
        assert w["did_you_mean"] == UNKNOWN[w["variable"]]
        if w["did_you_mean"]:
            assert w["did_you_mean"] in w["message"]
    assert "hunter2" not in started.stderr  # names only, never a value


@pytest.mark.parametrize("cloud", [False, True], ids=["local", "cloud"])
def test_known_variables_start_without_a_warning(cloud: bool) -> None:
    started, lines = start(known_env(cloud))
    assert started.returncode == 0, started.stderr
    assert [line for line in lines if line.get("severity") != "INFO"] == [], started.stderr


def test_a_misspelt_project_in_the_cloud_is_named_before_the_refusal() -> None:
    env = known_env(cloud=True)
    env["GOOGLE_CLOUD_PROJCT"] = env.pop("GOOGLE_CLOUD_PROJECT")
    started, lines = start(env)
    assert started.returncode != 0 and "ConfigError" in started.stderr, started.stderr
    assert [w["variable"] for w in lines if w.get("logger") == "pushline.config"] == ["GOOGLE_CLOUD_PROJCT"]


def test_a_ledger_that_would_expire_inside_the_delivery_window_refuses_to_start() -> None:
    """The ledger is what keeps a token from being sent twice: kept shorter than the window, a part still
    on the bus would find its tokens forgotten and send them again."""
    refused = "LEDGER_TTL_SECONDS (3600) must be at least DELIVERY_WINDOW_SECONDS (43200)"
    with pytest.raises(config.ConfigError, match=re.escape(refused)):
        config.load({"LEDGER_TTL_SECONDS": "3600"})
    assert config.load({"LEDGER_TTL_SECONDS": "3600", "DELIVERY_WINDOW_SECONDS": "3600"}).ledger_ttl_seconds == 3600
