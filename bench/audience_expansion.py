"""Audience expansion at 100,000 and 1,000,000 devices (issue 22): how long ``deliver`` takes to turn
``{"all": true}`` into parts, PostgreSQL's time per page, parts, and the expanding process's peak RSS.

    .venv/bin/python -m bench.audience_expansion [--devices 100000 1000000] [--database-url URL] [--redis-url URL]

It seeds its own database (``PUSHLINE_BENCH_DB``, default ``pushline_audience_bench``: emptied) with
the devices (5 per user, mixed platforms, locales and app versions), then runs ``shared.expansion``
in this process on a bus that counts the parts and keeps none (so the figure is the expansion's own:
PostgreSQL pages, the checkpoint, building and handing over each part). Not measured here: sending
the parts (``bench.run --only delivery``/``fanout`` measure a part's delivery). Prints one JSON
document per size on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Mapping
from typing import Any

import redis

from shared import bus, expansion, instance, jobs
from shared.db import Database, migrate

SEED = """
INSERT INTO device_tokens (user_id, token, platform, locale, app_version, app_version_key, updated_at, created_at)
SELECT 'bu' || (n / 5), 'bench-token-' || n || '-' || repeat('x', 140),
       (ARRAY['android', 'ios', 'web'])[1 + n % 3], (ARRAY['de-AT', 'en-US', 'fr', 'pt-BR', NULL])[1 + n % 5],
       '2.' || (n % 20), (2 * 1000000 + n % 20) * 1000000000000::numeric,
       now() - interval '1 hour', now() - interval '1 hour'
FROM generate_series(:start, :stop - 1) AS n
"""


SEED_BATCH = 10_000  # rows a statement (each within the client's 5 s socket timeout)


class CountingBus:
    """A publisher that counts what it is given and keeps nothing."""

    pending = 0

    def __init__(self) -> None:
        self.parts = 0
        self.devices = 0

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        payload = json.loads(data)
        self.parts += 1
        self.devices += len(payload.get("devices", ()))
        return str(self.parts)

    def drain(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass


def seed(db: Database, devices: int) -> float:
    db.run("TRUNCATE device_tokens, token_cache_dirty")
    began = time.perf_counter()
    for start in range(0, devices, SEED_BATCH):
        db.run(SEED, start=start, stop=min(devices, start + SEED_BATCH))
    db.run("ANALYZE device_tokens")
    return time.perf_counter() - began


def expand(devices: int) -> dict[str, Any]:
    counter = CountingBus()
    bus.plug_in(lambda _settings: counter)
    store = instance.audience_store()
    page_ms: list[float] = []
    page = store.page

    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return page(*args, **kwargs)
        finally:
            page_ms.append((time.perf_counter() - began) * 1000)

    store.page = timed  # type: ignore[method-assign]
    job = jobs.parse_v1(
        {"version": 2, "id": f"bench-{devices}", "audience": {"all": True}, "notification": {"title": "t"}}
    )
    began = time.perf_counter()
    while expansion.expand(job) == "expansion-continues":
        pass
    seconds = time.perf_counter() - began
    page_ms.sort()
    return {
        "devices": devices,
        "parts": counter.parts,
        "devices_in_parts": counter.devices,
        "expansion_s": round(seconds, 2),
        "devices_per_s": round(devices / seconds),
        "pages": len(page_ms),
        "page_ms_median": round(page_ms[len(page_ms) // 2], 1),
        "page_ms_p99": round(page_ms[int(len(page_ms) * 0.99)], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100_000, 1_000_000])
    name = os.environ.get("PUSHLINE_BENCH_DB", "pushline_audience_bench")
    parser.add_argument("--database-url", default=f"postgresql://postgres@127.0.0.1:5432/{name}")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    args = parser.parse_args()
    admin = Database("postgresql://postgres@127.0.0.1:5432/postgres")
    if not admin.run("SELECT 1 FROM pg_database WHERE datname = :n", n=name):
        admin.run(f'CREATE DATABASE "{name}"')
    admin.close()
    os.environ.update(DATABASE_URL=args.database_url, REDIS_URL=args.redis_url, LOG_LEVEL="WARNING")
    db = Database(args.database_url)
    migrate(db)
    for devices in args.devices:
        redis.Redis.from_url(args.redis_url).flushdb()
        instance.reset()
        seeded = seed(db, devices)
        result = {"seed_s": round(seeded, 1), **expand(devices)}
        print(json.dumps(result), flush=True)
    db.close()


if __name__ == "__main__":
    main()
