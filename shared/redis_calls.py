"""Script calls on one pooled Redis connection, for a hot path that makes a few of them (a registration).

redis-py spends far more Python on a command than Redis spends running it: measured under callgrind
(bench/README.md, "CPU cost on a busy VM: instructions"), a ``Script`` call costs ~173,000 instructions
in the client, ~60,000 of them in ``execute_command``'s machinery (retry wrapper, observability, command
hooks) and ~65,000 in taking the connection from the pool and giving it back. ``ScriptCalls`` takes one
connection for all the calls of a ``with`` block and sends each ``EVALSHA`` on it directly, packed by
hiredis: ~31,000.

It keeps what the client guarantees: the connection is redis-py's (from the client's pool, its health
check every ``health_check_interval``, connected again after a failure), a failure to write or read
(timeout, connection lost) disconnects it so a late answer is never read as the next one's, an error
Redis answered (``ResponseError``: OOM, READONLY, a script's error) is raised with the connection still
in step, and a script Redis does not know (``NOSCRIPT``: a restart, a failover, ``SCRIPT FLUSH``) is
loaded and called again, once, as ``Script.__call__`` does. No retries, as the client is configured
(``shared.instance``): a script that ran but whose answer was lost must not run twice.

What it leaves out of redis-py's per-command path: the client's operation metrics (duration, error
counts; we do not use them), and the reconnect after a command that a server maintenance notice asked
for (RESP3 ``MOVING``), which redis-py then does when the connection is given back to the pool, after
the block's last call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import DataError, NoScriptError, ResponseError

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    _pack = hiredis.pack_command
except ImportError:  # (a requirement; redis-py works without it)
    _pack = None


class ScriptCalls:
    """``with ScriptCalls(client) as calls: calls.run(script, keys, args)``; the connection is taken at
    the first call and given back to the pool when the block ends."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None

    def __enter__(self) -> ScriptCalls:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._pool.release(conn)

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        """The script's reply (raw, as the client's own call gives it); redis-py's errors as it raises them."""
        if self._conn is None:
            self._conn = self._pool.get_connection()  # (connects; raises ConnectionError if it cannot)
        conn = self._conn
        try:
            try:
                return _evalsha(conn, script, keys, args)
            except NoScriptError:
                conn.send_command("SCRIPT LOAD", script.script)
                sha = conn.read_response()
                script.sha = sha.decode() if isinstance(sha, bytes) else sha
                return _evalsha(conn, script, keys, args)
        except ResponseError:
            raise  # Redis answered: the connection is in step
        except BaseException:
            conn.disconnect()  # (redis-py has done so already on a failed write or read; never reuse it half-read)
            raise


def _evalsha(conn: Any, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    command = ("EVALSHA", script.sha, len(keys), *keys, *args)
    if _pack is None:
        packed = conn.pack_command(*command)
    else:  # hiredis packs the command in C (redis-py's packer first walks the arguments in Python); same bytes
        try:
            packed = [_pack(command)]
        except TypeError as exc:  # (None, a bool...: redis-py's packer raises DataError, a RedisError)
            raise DataError(f"cannot send an argument to Redis: {exc}") from None
    conn.send_packed_command(packed)
    return conn.read_response()
