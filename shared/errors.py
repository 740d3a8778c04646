"""Failures that every layer shares: a dependency that cannot be reached right now."""

import redis

# Redis cannot be reached right now (the bus redelivers, or the caller gets a 503).
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError)


class Unavailable(RuntimeError):
    """A dependency (PostgreSQL, Redis, the bus) cannot be reached: retry later (HTTP 503)."""

    what = "a dependency"
