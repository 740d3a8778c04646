"""Shared fixtures: real Redis and PostgreSQL for the whole session, a clean state per test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local.bus import plug_in  # noqa: E402
from local.idtoken import emulator_id_token  # noqa: E402
from local.servers import TEST_DATABASE, Servers  # noqa: E402
from shared import auth, instance  # noqa: E402
from shared.db import Database, migrate  # noqa: E402

plug_in()  # the tests are a local process: DELIVER_URL means the local bus, as in functions/main.py

PROJECT = "demo-pushline-test"
ORIGIN = "https://app.example.com"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when a service is missing, except under CI=true: there a skipped guarantee fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI=true: {reason}")
    pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true no test may skip: a skip there would hide a guarantee behind a green run."""
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"
    return report


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    started = Servers().start()
    database = Database(started.database_url)
    migrate(database)
    database.close()
    yield started
    started.stop()


def base_env(servers: Servers) -> dict[str, str]:
    return {
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
        "CORS_ALLOWED_ORIGINS": ORIGIN,
        "REGISTER_RATE_PER_MINUTE": "0",
        "LOG_LEVEL": "INFO",
    }


def clean(servers: Servers) -> None:
    database = Database(servers.database_url)
    database.run("TRUNCATE device_tokens, token_cache_dirty, user_preferences, preferences_cache_dirty")
    database.close()
    import redis

    client = redis.Redis.from_url(servers.redis_url)
    client.flushdb()
    client.close()


@pytest.fixture
def env(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A clean state and the environment the functions read; the instance's clients reset."""
    values = base_env(servers)
    for key in ("K_SERVICE", "PUBSUB_EMULATOR_HOST", "DELIVER_URL", "FCM_ENDPOINT", "FCM_CREDENTIALS_SECRET"):
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    clean(servers)
    instance.reset()
    auth.reset()
    yield values
    instance.reset()
    auth.reset()


@pytest.fixture
def store(env: dict[str, str]):
    return instance.token_store()


def bearer(uid: str, project: str = PROJECT) -> dict[str, str]:
    return {"Authorization": f"Bearer {emulator_id_token(uid, project)}"}


@pytest.fixture
def register_client(env: dict[str, str]):
    import functions_framework

    app = functions_framework.create_app(target="register", source=str(ROOT / "functions" / "main.py"))
    return app.test_client()


@pytest.fixture(scope="session")
def fake_fcm_server():
    """The fake FCM HTTP v1 server, in this process (a thread), spoken to over real HTTP."""
    from local.fake_fcm import FakeFcm

    server = FakeFcm()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fcm(fake_fcm_server, env, monkeypatch):
    """The fake FCM, reset and configured as it starts (a test's failures never reach the next), with
    the functions' FCM client pointed at it."""
    fake_fcm_server.reset()
    fake_fcm_server.configure(
        delay_ms=0, fail_rate=0.0, seed=0, fail_codes=["UNAVAILABLE"], record=True, refused_bearers=[]
    )
    monkeypatch.setenv("FCM_ENDPOINT", fake_fcm_server.url)
    instance.reset()
    return fake_fcm_server


def start_stack(**config):
    """A whole local system on free ports (functions-framework processes, fake FCM, bus)."""
    import shutil

    from local.stack import Stack, StackConfig

    use_emulator = config.pop("use_emulator", True)
    if use_emulator:
        require(shutil.which("gcloud") is not None, "the Pub/Sub emulator (gcloud) is not installed")
    env = {"REGISTER_RATE_PER_MINUTE": "0", "LOG_LEVEL": "INFO", **config.pop("env", {})}
    cfg = StackConfig.free_ports(
        state_file=None,
        quiet=True,
        use_emulator=use_emulator,
        database=TEST_DATABASE,
        redis_db=None,
        fcm_delay_ms=config.pop("fcm_delay_ms", 0),
        console=config.pop("console", False),
        env=env,
        **config,
    )
    return Stack(cfg).start()


@pytest.fixture(scope="session")
def e2e_stack(servers: Servers):
    """The system under test, on the Pub/Sub emulator, sharing the session's Redis and PostgreSQL."""
    stack = start_stack(redis_url=servers.redis_url, database_url=servers.database_url)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def e2e_sdk_stack(servers: Servers):
    """The same system with FCM_CLIENT=sdk: firebase-admin's send_each path."""
    stack = start_stack(redis_url=servers.redis_url, database_url=servers.database_url, env={"FCM_CLIENT": "sdk"})
    yield stack
    stack.stop()


@pytest.fixture(params=["http", "sdk"])
def both_clients(request):
    """A client of the system on each FCM client path in turn (our HTTP client, firebase-admin's)."""
    from tests.e2e_client import Client

    stack = request.getfixturevalue("e2e_stack" if request.param == "http" else "e2e_sdk_stack")
    c = Client(stack)
    yield c
    c.close()


class Clock:
    """The ledger's clock (``shared.claims.wall_clock``: leases, retry times, the FCM budget, delivery
    windows) under a test's control: real time plus an offset the test moves forward, so in-process
    waits still pass while minutes or hours are skipped; or frozen (``freeze``) for exact arithmetic."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.frozen: float | None = None

    def __call__(self) -> float:
        import time

        return (time.time() if self.frozen is None else self.frozen) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def freeze(self, at: float | None = None) -> None:
        import time

        self.frozen, self.offset = (time.time() if at is None else at), 0.0

    def ms(self) -> int:
        return int(self() * 1000)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    from shared import claims

    moved = Clock()
    monkeypatch.setattr(claims, "wall_clock", moved)
    return moved
