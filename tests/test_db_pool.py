"""shared/db.py's pool on a real PostgreSQL: a connection is reused; a statement's error is raised and the next
statement runs (on a new connection: the one it failed on is closed); a connection killed under the pool is
dropped."""

from __future__ import annotations

import pg8000.native
import pytest

from shared.db import Database, DatabaseUnavailable


@pytest.fixture
def database(servers):
    db = Database(servers.database_url, size=2)
    yield db
    db.close()


def backend(db: Database) -> int:
    return db.run("SELECT pg_backend_pid() + :zero", zero=0)[0][0]


def test_a_connection_is_reused(database):
    assert backend(database) == backend(database)


def test_a_statement_error_is_raised_and_the_next_statement_runs(database):
    with pytest.raises(pg8000.native.DatabaseError):
        database.run("SELECT 1 / :zero", zero=0)
    assert database.run("SELECT 2 + :one", one=1) == [[3]]


def test_a_connection_killed_under_the_pool_is_unavailable_once_then_replaced(database, servers):
    killed = backend(database)
    admin = Database(servers.database_url)
    try:
        admin.run("SELECT pg_terminate_backend(:pid)", pid=killed)
    finally:
        admin.close()
    with pytest.raises(DatabaseUnavailable):
        backend(database)
    assert backend(database) != killed  # the dead connection was dropped, not returned to the pool
    with database.connection() as conn:  # the context-manager path shares the pool
        assert conn.run("SELECT 1") == [[1]]


def pids_of_three_at_once(database: Database) -> set[int]:
    with database.connection() as a, database.connection() as b, database.connection() as c:
        return {conn.run("SELECT pg_backend_pid()")[0][0] for conn in (a, b, c)}


def test_the_pool_keeps_at_most_its_size(database):
    first = pids_of_three_at_once(database)
    assert len(first) == 3
    assert len(first & pids_of_three_at_once(database)) == 2  # two were kept, the third closed
