"""Failures that every layer shares: a dependency that cannot serve us right now.

**Every Redis error is an outage** (``REDIS_OUTAGE``): whatever ``redis.RedisError`` a command or a
script raises, the caller answers as if Redis were unreachable: ``send`` 503 with ``Retry-After``,
``deliver`` and ``on_event`` let the bus redeliver, ``register`` writes PostgreSQL and marks the user
for a cache rebuild. Nothing is ever half-written, because each state change is one script or one
transaction, so trying again later is always safe. This covers, beside an unreachable server:

- ``OOM``: ``maxmemory`` reached under ``noeviction`` (what the README asks for);
- ``READONLY``: a replica, e.g. while a failover moves the primary;
- ``MASTERDOWN``: a replica that lost its primary and refuses stale data;
- ``LOADING``: a restarted server still reading its data;

and they arrive in many shapes (``OutOfMemoryError`` from a plain command, the same wrapped by a
pipeline or a script, ``ExecAbortError`` from a transaction, a plain ``ResponseError`` from an older
server), so matching on codes would miss some. A ``ResponseError`` that is none of these (e.g. a
bug in a script) is an outage too: retrying cannot hurt, and ``redis_outage`` logs it at ERROR so it
is not mistaken for one. ``NoScriptError`` never reaches us: redis-py loads the script and retries.
"""

import redis

from shared import logs

log = logs.get("errors")

REDIS_OUTAGE = (redis.RedisError,)
REDIS_UNREACHABLE = REDIS_OUTAGE  # the former name

# Known server states, most specific first (each a subclass that redis-py maps from the error code).
_STATES = (
    (redis.exceptions.OutOfMemoryError, "is out of memory (maxmemory reached under noeviction)"),
    (redis.exceptions.ReadOnlyError, "is read-only (a replica: a failover under way?)"),
    (redis.exceptions.MasterDownError, "is a replica that lost its primary (MASTERDOWN)"),
    (redis.exceptions.BusyLoadingError, "is loading its data (LOADING)"),
    (redis.exceptions.TryAgainError, "is busy (TRYAGAIN)"),
    (redis.exceptions.ExecAbortError, "refused a transaction (EXECABORT)"),
    (redis.TimeoutError, "unreachable (no answer in time)"),
    (redis.ConnectionError, "unreachable"),
)


def redis_outage(exc: BaseException) -> str:
    """What a Redis error means, for logs and redelivery reasons: ``"Redis is out of memory (...)
    (OutOfMemoryError)"``. Never the error's own text: a pipeline's error quotes the command and its
    arguments, device tokens among them."""
    name = type(exc).__name__
    for kind, meaning in _STATES:
        if isinstance(exc, kind):
            return f"Redis {meaning} ({name})"
    log.error("Redis refused a command: handled as an outage, but it may be a bug", extra={"redis_error": name})
    return f"Redis refused a command ({name})"


class Unavailable(RuntimeError):
    """A dependency (PostgreSQL, Redis, the bus) cannot be reached: retry later (HTTP 503)."""

    what = "a dependency"


class RedisUnavailable(Unavailable):
    """Redis cannot serve the request now (any ``REDIS_OUTAGE``); the message says why."""

    what = "Redis"

    def __init__(self, exc: BaseException | None = None) -> None:
        super().__init__(redis_outage(exc) if exc is not None else "Redis unavailable")
