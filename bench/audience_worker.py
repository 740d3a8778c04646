"""One ``deliver`` process of the audience benchmark (the caller pins it to a core); prints JSON at the end.

It takes the benchmark bus's messages one at a time (``bench.audience_bus``) and hands each to
``shared.delivery.handle``, as the deployed function does with a Pub/Sub push: the audience job
(whichever process takes it expands it: pages of ``device_tokens``, parts published back on the
bus) and the parts. ``RetryLater`` or any error: the message comes back later, as Pub/Sub redelivers.
It leaves once the orchestrator asked it to and the queue is empty, printing what it handled, its
CPU time, its peak RSS (``ru_maxrss``) and the time of each expansion page (one SQL statement,
timed around ``AudienceStore.page`` in this process: PostgreSQL's time plus one round trip).
``BENCH_AUDIENCE_PROFILE=prefix`` writes a cProfile (CPU clock) of each process to ``prefix.<pid>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.audience_bus import READY, QueueBus, event

PAGES: list[tuple[float, int]] = []  # (milliseconds, devices matched) of each page this process read


def _env(args: argparse.Namespace) -> None:
    os.environ.update(
        {
            "REDIS_URL": args.redis,
            "DATABASE_URL": args.db,
            "FCM_ENDPOINT": args.fcm,
            "GOOGLE_CLOUD_PROJECT": "demo-pushline",
            "FCM_MAX_IN_FLIGHT": str(args.in_flight),
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
        }
    )
    os.environ.pop("DELIVER_URL", None)
    os.environ.pop("PUBSUB_EMULATOR_HOST", None)


def _time_pages() -> None:
    from shared.audience_store import AudienceStore

    page = AudienceStore.page

    def timed(self: AudienceStore, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        found = page(self, *a, **k)
        PAGES.append(((time.perf_counter() - t0) * 1000, len(found.devices)))
        return found

    AudienceStore.page = timed  # type: ignore[method-assign]


def serve(queue: QueueBus) -> Counter[str]:
    """Handle messages until asked to stop with nothing left; what happened to each, counted."""
    from shared import delivery, logs
    from shared.inbound import RetryLater

    log = logs.get("bench")
    seen: Counter[str] = Counter()
    while True:
        message = queue.take()
        if message is None:
            if queue.stopping() and queue.idle():
                return seen
            continue
        try:
            seen[delivery.handle(event(message))] += 1
        except RetryLater:
            seen["retry-later"] += 1
            queue.later(message)
        except Exception as exc:  # a 500 to Pub/Sub: redelivered
            log.exception("deliver failed: %r", exc)
            seen["error"] += 1
            queue.later(message)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--fcm", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--queue", required=True, help="the benchmark bus's Redis")
    parser.add_argument("--db", required=True)
    parser.add_argument("--in-flight", type=int, default=500)
    args = parser.parse_args()
    _env(args)
    from shared import bus, instance, logs
    from shared.config import settings

    logs.setup(settings().log_level)
    queue = QueueBus(args.queue)
    bus.plug_in(lambda _settings: QueueBus(args.queue))
    _time_pages()
    instance.redis_client().ping()  # clients made before the first message, as on a warm instance
    queue.redis.incr(READY)
    cpu0 = time.process_time()
    profile = os.environ.get("BENCH_AUDIENCE_PROFILE")  # a file prefix: a cProfile of each process
    if profile:
        import cProfile

        prof = cProfile.Profile(time.process_time)  # CPU time, not waiting
        seen = prof.runcall(serve, queue)
        prof.dump_stats(f"{profile}.{os.getpid()}")
    else:
        seen = serve(queue)
    result = {
        "handled": dict(seen),
        "cpu_seconds": time.process_time() - cpu0,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "affinity": sorted(os.sched_getaffinity(0)),
        "pages": PAGES,
    }
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip slow interpreter teardown (daemon loop threads, pools)


if __name__ == "__main__":
    main()
