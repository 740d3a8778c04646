"""PostgreSQL connections: ``DATABASE_URL`` (or the Cloud SQL connector), a small pool, migrations.

pg8000 connections are not thread-safe, and a function instance may serve several requests at
once (``THREADS``), so connections live in a small pool: each request borrows one. A connection
that fails is dropped, not returned. Every failure to reach PostgreSQL is ``DatabaseUnavailable``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import pg8000.dbapi
import pg8000.native

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "infra" / "schema.sql"
_CONNECT_TIMEOUT = 5


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL could not be reached or failed mid-statement."""


_BROKEN = (pg8000.native.InterfaceError, OSError, ConnectionError)  # the connection is unusable


def connect_kwargs(url: str) -> dict[str, Any]:
    """pg8000 keyword arguments from ``postgresql://user:pass@host:port/db[?unix_sock=...&sslmode=...]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("DATABASE_URL must start with postgresql://")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    kwargs: dict[str, Any] = {
        "user": unquote(parts.username or "postgres"),
        "database": unquote(parts.path.lstrip("/") or "postgres"),
        "timeout": _CONNECT_TIMEOUT,
    }
    if parts.password is not None:
        kwargs["password"] = unquote(parts.password)
    if "unix_sock" in query:
        kwargs["unix_sock"] = query["unix_sock"]
    elif query.get("host", "").startswith("/"):  # libpq style: a socket directory
        kwargs["unix_sock"] = f"{query['host']}/.s.PGSQL.{parts.port or 5432}"
    else:
        kwargs["host"] = parts.hostname or "127.0.0.1"
        kwargs["port"] = parts.port or 5432
    if query.get("sslmode") in ("require", "verify-ca", "verify-full"):
        context = ssl.create_default_context()
        if query["sslmode"] == "require":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        kwargs["ssl_context"] = context
    return kwargs


class Database:
    """A pool of pg8000 connections to one database."""

    def __init__(self, url: str, *, cloud_sql_instance: str | None = None, size: int = 8) -> None:
        self._url = url
        self._cloud_sql_instance = cloud_sql_instance
        self._idle: list[pg8000.native.Connection] = []  # the most recently returned last (taken first)
        self._size = size
        self._lock = threading.Lock()
        self._connector: Any = None

    def _connect(self) -> pg8000.native.Connection:
        kwargs = connect_kwargs(self._url)
        try:
            if self._cloud_sql_instance:
                return self._connect_cloud_sql(kwargs)
            return _no_delay(pg8000.native.Connection(**kwargs))
        except (pg8000.native.InterfaceError, OSError) as exc:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {type(exc).__name__}") from exc

    def _connect_cloud_sql(self, kwargs: dict[str, Any]) -> pg8000.native.Connection:
        # Cloud SQL Python Connector (optional dependency, only with CLOUD_SQL_INSTANCE).
        from google.cloud.sql.connector import Connector

        with self._lock:
            if self._connector is None:  # one per instance: it keeps a background refresh of its certificate
                self._connector = Connector()
        raw = self._connector.connect(
            self._cloud_sql_instance,
            "pg8000",
            user=kwargs["user"],
            password=kwargs.get("password"),
            db=kwargs["database"],
        )
        # The connector returns a DB-API connection: give it the same small interface.
        return _DbApiAdapter(_no_delay(raw))

    def _borrow(self) -> pg8000.native.Connection:
        try:
            return self._idle.pop()  # atomic: list.pop and append need no lock of ours
        except IndexError:
            return self._connect()

    def _give_back(self, conn: pg8000.native.Connection, ok: bool) -> None:
        if ok and len(self._idle) < self._size:
            self._idle.append(conn)
        else:
            with contextlib.suppress(Exception):
                conn.close()

    def connection(self) -> contextlib.AbstractContextManager[pg8000.native.Connection]:
        """``with db.connection() as conn``: a pooled connection, given back unless the block failed."""
        return _Borrowed(self)

    def run(self, sql: str, **params: Any) -> list[list[Any]]:
        """Run one statement (autocommit) and return its rows."""
        with _Borrowed(self) as conn:
            return _statement(conn, sql, params)

    def run_limited(self, sql: str, timeout_ms: int, **params: Any) -> list[list[Any]]:
        """Run one statement (autocommit) under a ``statement_timeout`` of ``timeout_ms``: PostgreSQL
        cancels it beyond that (SQLSTATE 57014); the connection's own timeout is restored after."""
        with _Borrowed(self) as conn:
            conn.run(f"SET statement_timeout = {int(timeout_ms)}")
            try:
                return _statement(conn, sql, params)
            finally:
                with contextlib.suppress(Exception):
                    conn.run("RESET statement_timeout")

    def close(self) -> None:
        if self._connector is not None:
            with contextlib.suppress(Exception):
                self._connector.close()
            self._connector = None
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            with contextlib.suppress(Exception):
                conn.close()


class _Borrowed:
    """A connection borrowed from ``db``'s pool for a ``with`` block: given back when the block ends well,
    closed when it fails; a connection that broke is ``DatabaseUnavailable``. (A class, not a
    generator-based context manager: it runs once per registration.)"""

    __slots__ = ("_conn", "_db")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn: Any = None

    def __enter__(self) -> pg8000.native.Connection:
        self._conn = self._db._borrow()
        return self._conn

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._db._give_back(self._conn, exc is None)
        if isinstance(exc, _BROKEN):
            raise DatabaseUnavailable(f"PostgreSQL failed: {type(exc).__name__}") from exc


def _statement(conn: pg8000.native.Connection, sql: str, params: dict[str, Any]) -> list[list[Any]]:
    """One statement on ``conn`` (prepared once per connection when it has parameters) and its rows."""
    try:
        if isinstance(conn, _DbApiAdapter) or not params:
            return conn.run(sql, **params) or []
        return _prepared(conn, sql).run(**params) or []
    except pg8000.native.DatabaseError:
        # A statement error leaves the connection usable only after a rollback.
        with contextlib.suppress(Exception):
            conn.run("ROLLBACK")
        raise


_Conn = TypeVar("_Conn", pg8000.native.Connection, pg8000.dbapi.Connection)


def _no_delay(conn: _Conn) -> _Conn:
    """Turn off Nagle's algorithm on the connection's TCP socket. pg8000 writes a statement through a
    buffered file in 8 kB pieces: a statement binding a part's users (~30 kB) had its last piece wait
    for PostgreSQL's delayed ACK, ~40 ms for a statement that takes ~1 ms."""
    sock = getattr(conn, "_usock", None)
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _prepared(conn: pg8000.native.Connection, sql: str) -> pg8000.native.PreparedStatement:
    """The connection's prepared statement for ``sql``: after the first use, running a statement is
    one round trip (Bind/Execute/Sync) instead of three (Parse, Describe, Execute)."""
    cache: dict[str, pg8000.native.PreparedStatement] | None = getattr(conn, "_pushline_prepared", None)
    if cache is None:
        cache = {}
        conn._pushline_prepared = cache
    statement = cache.get(sql)
    if statement is None:
        statement = cache[sql] = conn.prepare(sql)
    return statement


class _DbApiAdapter:
    """Gives a DB-API connection (from the Cloud SQL connector) pg8000.native's ``run``."""

    def __init__(self, conn: pg8000.dbapi.Connection) -> None:
        self._conn = conn
        self._conn.autocommit = True

    def run(self, sql: str, **params: Any) -> list[list[Any]]:
        statement, values = pg8000.dbapi.convert_paramstyle("named", sql, params)
        context = self._conn.execute_unnamed(statement, vals=values)
        return context.rows or []

    def close(self) -> None:
        self._conn.close()


def migrate(database: Database, schema_file: Path = SCHEMA_FILE) -> None:
    """Apply ``infra/schema.sql`` (idempotent: safe to run any number of times)."""
    sql = schema_file.read_text()
    with database.connection() as conn:
        for statement in _statements(sql):
            conn.run(statement)


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
