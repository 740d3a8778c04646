"""The clients one function instance reuses across invocations, made lazily on first use.

Nothing here connects at import: a function that never touches PostgreSQL never connects to it.
Tests call ``reset()`` after changing the environment.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import gc
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis

from shared.audience_store import AudienceStore
from shared.breaker import Breaker
from shared.checkpoint import Checkpoints
from shared.claims import Claims
from shared.config import settings
from shared.daily_cap import DailyCap
from shared.db import Database
from shared.deferrals import Deferrals
from shared.preference_store import PreferenceStore
from shared.schedule import ScheduleStore
from shared.store import TokenStore


@functools.cache
def redis_client() -> redis.Redis:
    s = settings()
    return redis.Redis.from_url(
        s.redis_url,
        socket_timeout=3,
        socket_connect_timeout=2,
        health_check_interval=15,
        # No client-side retries: a script that ran but whose answer was lost must not run twice
        # (the bus redelivers instead, and the ledger makes that safe).
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
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


@functools.cache
def schedule() -> ScheduleStore:
    """Scheduled work (PostgreSQL): deliver records it, tick publishes it when due."""
    return ScheduleStore(database())


@functools.cache
def preference_store() -> PreferenceStore:
    return PreferenceStore(redis_client(), database())


@functools.cache
def daily_cap() -> DailyCap:
    return DailyCap(redis_client(), settings().max_per_user_per_day)


@functools.cache
def deferrals() -> Deferrals:
    return Deferrals(redis_client(), ledger_ttl=settings().ledger_ttl_seconds)


@functools.cache
def claims() -> Claims:
    s = settings()
    return Claims(
        redis_client(),
        ledger_ttl=s.ledger_ttl_seconds,
        once_ttl=s.once_ttl_seconds,
        idempotency_ttl=s.idempotency_ttl_seconds,
        max_attempts=s.max_attempts,
        rate_per_minute=s.fcm_rate_per_minute,
    )


@functools.cache
def checkpoints() -> Checkpoints:
    """The audience expansions' checkpoints and project-wide slots."""
    return Checkpoints(redis_client(), ttl=settings().ledger_ttl_seconds)


@functools.cache
def audience_store() -> AudienceStore:
    return AudienceStore(database(), ttl_seconds=settings().token_ttl_seconds)


@functools.cache
def breaker() -> Breaker:
    """The instance's FCM breaker: its last answers, and the project-wide pause it shares."""
    return Breaker(redis_client())


T = TypeVar("T")

# CPython's collector, tuned once the instance's FCM client exists (issue 21). Sending allocates many
# short-lived containers per message; with the default young threshold (700) a 10,000-message part ran
# ~800 young collections whose survivors (the requests in flight) were promoted and rescanned, and its
# full collections walked every imported module: ~30 µs of CPU per message, a fifth of deliver's
# (bench.deliver_worker). A young collection of 50,000 objects takes ~5 ms.
GC_YOUNG_THRESHOLD = 50_000


@functools.cache  # once per process (never reset: the collector is the process's, not the instance's clients')
def _tune_gc() -> None:
    """Once per process: freeze what exists by now (modules, clients: they live as long as the instance)
    out of the collector's scans, and collect the young generation less often. Only when cycles are
    collected changes: objects made later are collected as before."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class _Loop:
    """One event loop per instance, in a daemon thread: the FCM client's connections live on it
    across invocations (its connection pool is bound to the loop that made it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pushline-loop", daemon=True)
        self.thread.start()
        self.fcm: Any = None
        atexit.register(self.stop)  # close the FCM client's connections when the instance stops

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def close() -> None:
            if self.fcm is not None:
                await self.fcm.close()

        try:
            with contextlib.suppress(Exception):  # stopping anyway
                asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


@functools.cache
def _loop() -> _Loop:
    return _Loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the instance's event loop and wait for its result."""
    return _loop().run(coro)


async def fcm_client() -> Any:
    """The instance's FCM client (FCM_CLIENT), made on the instance's loop on first use."""
    holder = _loop()
    if holder.fcm is None:
        from shared.fcm import make_client

        holder.fcm = make_client(settings())
        _tune_gc()
    return holder.fcm


def reset() -> None:
    """Forget every client and the settings (tests change the environment between cases)."""
    if database.cache_info().currsize:
        database().close()
    if _loop.cache_info().currsize:
        _loop().stop()
    for cached in (
        redis_client,
        database,
        token_store,
        schedule,
        preference_store,
        daily_cap,
        deferrals,
        claims,
        checkpoints,
        audience_store,
        breaker,
        _loop,
        settings,
    ):
        cached.cache_clear()
