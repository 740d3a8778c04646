"""Benchmark data: users ``bu00000``.. with N device tokens each, in PostgreSQL and Redis."""

from __future__ import annotations

import os
import time

NOTIFICATION = {"title": "Benchmark", "body": "pushline delivery throughput"}


def user_name(i: int) -> str:
    return f"bu{i:06d}"


def token_name(user: int, device: int) -> str:
    # Realistic length (FCM tokens are ~150 characters); "ok" prefix: the fake answers 200.
    return f"ok-{user:06d}-{device}-" + "x" * 140


def seed(redis_url: str, database_url: str, users: int, tokens_per_user: int) -> float:
    """Insert the rows by SQL and fill Redis with ``TokenStore.rebuild_all``; returns seconds."""
    os.environ.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url, "MAX_TOKENS_PER_USER": "1000"})
    from shared import config, instance

    config.settings.cache_clear()
    instance.reset()
    store = instance.token_store()
    t0 = time.perf_counter()
    store.db.run("DELETE FROM device_tokens")  # the bench database is ours alone
    store.db.run(
        "INSERT INTO device_tokens (user_id, token, platform, updated_at) "
        "SELECT 'bu' || lpad(u::text, 6, '0'), 'ok-' || lpad(u::text, 6, '0') || '-' || d || '-' || repeat('x', 140), "
        "(ARRAY['android','ios','web'])[1 + (u + d) % 3], now() "
        "FROM generate_series(0, :users - 1) u, generate_series(0, :tpu - 1) d",
        users=users,
        tpu=tokens_per_user,
    )
    store.redis.flushdb()
    store.rebuild_all()
    elapsed = time.perf_counter() - t0
    instance.reset()
    return elapsed
