"""One measured sending run, in its own process (the caller pins it: ``taskset -c 0``); prints JSON.

  --mode deliver  the real deliver path: ``shared.delivery.handle`` on a Pub/Sub event carrying a
                  v1 job for the users (token reads from Redis, ledger leases and confirmations,
                  outcome mapping, status counts), after a 1-user warm-up job on the same instance
  --mode bare     a bare aiohttp client: the same FCM v1 messages (same template, same tokens),
                  ``--in-flight`` requests in flight, to the same fake
  --mode seed     the design's original loop: per user, SMEMBERS of the Redis set, then one
                  firebase-admin ``messaging.send_each_for_multicast`` (FCM_URL pointed at the fake)

The users are ``bu00000``.. with ``--tpu`` tokens each, already in PostgreSQL and Redis (bench.data).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.data import NOTIFICATION, token_name, user_name


def _env(args: argparse.Namespace) -> None:
    os.environ.update(
        {
            "REDIS_URL": args.redis,
            "DATABASE_URL": args.db,
            "FCM_ENDPOINT": args.fcm,
            "GOOGLE_CLOUD_PROJECT": "demo-pushline",
            "FCM_MAX_IN_FLIGHT": str(args.in_flight),
            "FANOUT_USERS_PER_PART": str(args.users_per_part),
            "MAX_TOKENS_PER_USER": "1000",
            "REGISTER_RATE_PER_MINUTE": "0",
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
        }
    )
    if args.pubsub:
        os.environ["PUBSUB_EMULATOR_HOST"] = args.pubsub
        os.environ["PUBSUB_PROJECT_ID"] = "demo-pushline"


def event_for(job: dict) -> dict:
    data = base64.b64encode(json.dumps(job).encode()).decode()
    mid = str(uuid.uuid4().int % 10**16)
    return {"message": {"data": data, "messageId": mid, "attributes": {}}, "subscription": "bench"}


def run_deliver(args: argparse.Namespace) -> dict:
    from shared import delivery, instance, logs
    from shared.config import settings

    logs.setup(settings().log_level)
    users = [user_name(i) for i in range(args.users)]
    # Warm-up: one user, so clients (Redis pool, PostgreSQL pool, aiohttp session) exist, as on a
    # warm instance. Its messages are not counted.
    warm = {"version": 1, "id": "warm" + uuid.uuid4().hex[:20], "user_ids": users[:1], "notification": NOTIFICATION}
    assert delivery.handle(event_for(warm)) == "delivered"
    job = {"version": 1, "id": "b" + uuid.uuid4().hex[:24], "user_ids": users, "notification": NOTIFICATION}
    event = event_for(job)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    outcome = delivery.handle(event)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    status = instance.claims().status(job["id"]) or {}
    counts = status.get("counts", {})
    sent = counts.get("delivered", 0) if outcome == "delivered" else 0
    if outcome != "delivered":
        sent = len(users) * args.tpu if outcome == "fanned-out" else 0
    return {
        "mode": "deliver",
        "outcome": outcome,
        "messages": sent,
        "expected": len(users) * args.tpu,
        "state": status.get("state"),
        "seconds": elapsed,
        "rate": sent / elapsed if elapsed else 0,
        "cpu_seconds": cpu,
    }


def run_bare(args: argparse.Namespace) -> dict:
    import asyncio

    import aiohttp

    from shared.fcm import send_url
    from shared.fcm_message import MessageTemplate
    from shared.jobs import parse_v1

    job = parse_v1(
        {"version": 1, "id": "bare" + uuid.uuid4().hex[:20], "user_ids": ["x"], "notification": NOTIFICATION}
    )
    template = MessageTemplate(job)
    tokens = [token_name(u, d) for u in range(args.users) for d in range(args.tpu)]
    url = send_url(args.fcm, "demo-pushline")
    headers = {"Authorization": "Bearer pushline-local", "Content-Type": "application/json"}

    async def main() -> tuple[int, float, float]:
        connector = aiohttp.TCPConnector(limit=args.in_flight)
        ok = 0
        async with aiohttp.ClientSession(connector=connector) as session:
            # warm-up: open the connections as a warm deliver instance would have them
            async def warm(t: str) -> None:
                async with session.post(
                    url, data=json.dumps({"message": template.for_token(t)}).encode(), headers=headers
                ) as r:
                    await r.read()

            await asyncio.gather(*(warm(f"warm-{i}") for i in range(min(args.in_flight, 50))))
            it = iter(tokens)
            cpu0 = time.process_time()  # from here, like deliver's: the warm-up is not counted
            t0 = time.perf_counter()

            async def worker() -> None:
                nonlocal ok
                for token in it:
                    body = json.dumps({"message": template.for_token(token)}).encode()
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status == 200:
                            ok += 1

            await asyncio.gather(*(worker() for _ in range(args.in_flight)))
            return ok, time.perf_counter() - t0, time.process_time() - cpu0

    ok, elapsed, cpu = asyncio.run(main())
    return {
        "mode": "bare",
        "messages": ok,
        "expected": len(tokens),
        "seconds": elapsed,
        "rate": ok / elapsed,
        "cpu_seconds": cpu,
    }


def run_seed(args: argparse.Namespace) -> dict:
    import firebase_admin
    import redis
    from firebase_admin import messaging

    from shared.credentials import StaticTokenCredentials
    from shared.fcm import send_url
    from shared.store import token_key

    client = redis.Redis.from_url(args.redis)
    app = firebase_admin.initialize_app(StaticTokenCredentials(), {"projectId": "demo-pushline"}, name="seed-loop")
    messaging._MessagingService.FCM_URL = send_url(args.fcm, "{0}")
    messaging._get_messaging_service(app)  # created now, with the fake's URL
    users = [user_name(i) for i in range(args.users)]
    limit = args.limit or len(users) * args.tpu
    notification = messaging.Notification(title=NOTIFICATION["title"], body=NOTIFICATION["body"])
    # warm-up (threads, connection pool)
    messaging.send_each_for_multicast(messaging.MulticastMessage(tokens=["warm-1"], notification=notification), app=app)
    sent = ok = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for user in users:
        if sent >= limit:
            break
        tokens = [t.decode() for t in client.smembers(token_key(user))]
        if not tokens:
            continue
        batch = messaging.send_each_for_multicast(
            messaging.MulticastMessage(tokens=tokens, notification=notification), app=app
        )
        sent += len(tokens)
        ok += batch.success_count
    elapsed = time.perf_counter() - t0
    return {
        "mode": "seed",
        "messages": ok,
        "expected": limit,
        "seconds": elapsed,
        "rate": ok / elapsed,
        "cpu_seconds": time.process_time() - cpu0,
        "capped": limit < len(users) * args.tpu,
    }


def run_fanout(args: argparse.Namespace) -> dict:
    """Ten whole jobs of 10,000 users through ``delivery.handle``: every part published to the bus."""
    from shared import delivery, logs
    from shared.config import settings
    from shared.jobs import part_count

    logs.setup(settings().log_level)
    per_job = 10_000
    jobs_n = max(1, args.users // per_job)
    events = []
    for j in range(jobs_n):
        users = [f"fu{j:02d}-{i:05d}" for i in range(per_job)]
        job = {"version": 1, "id": "f" + uuid.uuid4().hex[:24], "user_ids": users, "notification": NOTIFICATION}
        events.append(event_for(job))
    warm = {"version": 1, "id": "fw" + uuid.uuid4().hex[:20], "user_ids": ["fw-1"], "notification": NOTIFICATION}
    delivery.handle(event_for(warm))  # clients made (publisher, Redis) as on a warm instance
    per_job_s = []
    t0 = time.perf_counter()
    for event in events:
        t = time.perf_counter()
        assert delivery.handle(event) == "fanned-out"
        per_job_s.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    parts_per_job = part_count(per_job, settings().fanout_users_per_part)
    return {
        "mode": "fanout",
        "jobs": jobs_n,
        "users": jobs_n * per_job,
        "parts": jobs_n * parts_per_job,
        "seconds": elapsed,
        "per_job_s": per_job_s,
        "messages": 0,
        "rate": 0,
    }


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["deliver", "bare", "seed", "fanout"], required=True)
    parser.add_argument("--fcm", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--pubsub", default="")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--tpu", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=500)
    parser.add_argument("--users-per-part", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=0, help="seed loop: stop after about this many messages")
    parser.add_argument("--profile", default="", help="write a cProfile to this file")
    args = parser.parse_args()
    _env(args)
    fn = {"deliver": run_deliver, "bare": run_bare, "seed": run_seed, "fanout": run_fanout}[args.mode]
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(fn, args)
        prof.dump_stats(args.profile)
    else:
        result = fn(args)
    result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["affinity"] = sorted(os.sched_getaffinity(0))
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip slow interpreter teardown (daemon loop threads, pools)


if __name__ == "__main__":
    main()
