"""The FCM budget: FCM_RATE_PER_MINUTE limits sends project-wide, shared by every instance through Redis.

Two `deliver` instances (two processes) are released together, each with a job of 20 tokens, under a
budget of 600 a minute (10 a second). A request leased in second S reaches the fake FCM at S or later,
so the requests the fake received before second S + 1 were granted in seconds G..S, where G is the
second the instances were released in: with the budget shared, at most 10 * (S - G + 1) of them. Two
per-instance budgets would let 20 a second through, and no budget all 40 at once. The bound is a count
per elapsed second, never a speed claim: a slow machine only makes it easier to meet.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter

import redis

from local.servers import wait_until
from tests.conftest import ROOT

RATE_PER_MINUTE = 600
PER_SECOND = RATE_PER_MINUTE // 60
INSTANCES = 2
TOKENS_EACH = 20
READY, GO = "budget-test:ready", "budget-test:go"

WORKER = f"""
import json, sys
import redis
from shared import delivery
from shared.config import settings

r = redis.Redis.from_url(settings().redis_url)
r.incr({READY!r})
if r.blpop([{GO!r}], timeout=120) is None:
    sys.exit("never released")
print(json.dumps(delivery.handle(json.loads(sys.argv[1]))))
"""


def pushed(job: dict, message_id: str) -> str:
    data = base64.b64encode(json.dumps(job).encode()).decode()
    return json.dumps({"message": {"data": data, "attributes": {}, "messageId": message_id}, "subscription": "s"})


def test_fcm_rate_per_minute_holds_across_instances(fcm, store, env):
    jobs = []
    for n in range(INSTANCES):
        user = f"budget-user-{n}"
        for k in range(TOKENS_EACH):
            store.register(user, f"budget-{n}-{k}")
        jobs.append({"version": 1, "id": f"budget-{n}", "user_ids": [user], "notification": {"title": "Hi"}})
    worker_env = {**os.environ, "FCM_RATE_PER_MINUTE": str(RATE_PER_MINUTE), "PYTHONPATH": str(ROOT)}
    r = redis.Redis.from_url(env["REDIS_URL"])
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, pushed(job, f"m-{n}")],
            cwd=ROOT,
            env=worker_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, job in enumerate(jobs)
    ]
    try:
        wait_until(lambda: int(r.get(READY) or 0) == INSTANCES, timeout=60, what="both instances ready")
        released = math.floor(time.time())  # no lease can fall in an earlier second
        r.rpush(GO, *range(INSTANCES))
        results = [w.communicate(timeout=120) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (out, err) in zip(workers, results, strict=True):
        assert w.returncode == 0 and json.loads(out.splitlines()[-1]) == "delivered", err[-2000:]

    messages = fcm.messages()
    assert Counter(m["message"]["token"] for m in messages) == Counter(
        {f"budget-{n}-{k}": 1 for n in range(INSTANCES) for k in range(TOKENS_EACH)}
    )
    per_second = Counter(math.floor(m["received_at"]) for m in messages)
    assert min(per_second) >= released
    received = 0
    for second in range(released, max(per_second) + 1):
        received += per_second[second]
        granted = PER_SECOND * (second - released + 1)
        assert received <= granted, f"{received} requests by the end of second {second - released}: {per_second}"
