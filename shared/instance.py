"""The clients one function instance reuses across invocations, made lazily on first use.

Nothing here connects at import: a function that never touches PostgreSQL never connects to it.
Tests call ``reset()`` after changing the environment.
"""

from __future__ import annotations

import functools

import redis

from shared.config import settings
from shared.db import Database
from shared.store import TokenStore


@functools.cache
def redis_client() -> redis.Redis:
    s = settings()
    return redis.Redis.from_url(
        s.redis_url,
        socket_timeout=3,
        socket_connect_timeout=2,
        health_check_interval=15,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 1),
        max_connections=64,
    )


@functools.cache
def database() -> Database:
    s = settings()
    return Database(s.database_url, cloud_sql_instance=s.cloud_sql_instance)


@functools.cache
def token_store() -> TokenStore:
    s = settings()
    return TokenStore(
        redis_client(),
        database(),
        ttl_seconds=s.token_ttl_seconds,
        max_tokens_per_user=s.max_tokens_per_user,
        register_rate_per_minute=s.register_rate_per_minute,
    )


def reset() -> None:
    """Forget every client and the settings (tests change the environment between cases)."""
    if database.cache_info().currsize:
        database().close()
    for cached in (redis_client, database, token_store, settings):
        cached.cache_clear()
