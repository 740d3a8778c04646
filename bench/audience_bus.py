"""The audience benchmark's bus: the jobs topic as a list in a second private Redis (never measured).

Every process of the run plugs :class:`QueueBus` into ``shared.bus`` (as ``local/bus.py`` plugs in the
local bus): a publish is one ``RPUSH`` of the message, as Pub/Sub would carry it (data, attributes, an
id). Each ``deliver`` process takes one message at a time (:meth:`QueueBus.take`) and hands it to
``shared.delivery.handle`` as the function would; a message it could not finish (``RetryLater``, or
any error: a 503 or 500 answer to Pub/Sub) comes back after :data:`REDELIVER_SECONDS`, as Pub/Sub
redelivers. The queue lives in its own Redis so that the Redis whose memory the benchmark reports
holds only pushline's keys.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis

QUEUE = "bench:jobs"
DELAYED = "bench:jobs:later"  # sorted set: message -> when it is due again (s)
STOP = "bench:stop"  # set by the orchestrator: a deliver process leaves once the queue is empty
READY = "bench:ready"  # deliver processes ready to take messages (each adds one)
REDELIVER_SECONDS = 1.0  # Pub/Sub's minimum backoff is 10 s; the emulator redelivers after ~1 s

# Moves due messages from the delayed set to the queue. KEYS: delayed, queue. ARGV: now.
_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('RPUSH', KEYS[2], m)
end
return #due
"""


class QueueBus:
    """A ``shared.bus.Publisher`` on a Redis list, and the deliver side's take / later."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url)
        self._due = self.redis.register_script(_DUE)

    @property
    def pending(self) -> int:
        return 0  # each publish is in the queue when it returns, as Pub/Sub's acknowledgement

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        message_id = str(uuid.uuid4().int % 10**16)
        body = {"data": base64.b64encode(data).decode(), "attributes": dict(attributes), "messageId": message_id}
        self.redis.rpush(QUEUE, json.dumps(body))
        return message_id

    def drain(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        self.redis.close()

    def take(self, timeout: float = 0.5) -> str | None:
        """The next message (as the JSON pushed), or None when none came within ``timeout`` seconds."""
        self._due(keys=[DELAYED, QUEUE], args=[time.time()])
        found = self.redis.blpop([QUEUE], timeout=timeout)
        return None if found is None else found[1].decode()

    def later(self, message: str, seconds: float = REDELIVER_SECONDS) -> None:
        """The message comes back after ``seconds`` (a copy: each retry gets a fresh member)."""
        body = json.loads(message)
        body["retry"] = uuid.uuid4().hex  # so two copies of one message can both wait
        self.redis.zadd(DELAYED, {json.dumps(body): time.time() + seconds})

    def idle(self) -> bool:
        """Nothing queued and nothing waiting for its redelivery."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(QUEUE)
        pipe.zcard(DELAYED)
        return not any(pipe.execute())

    def stopping(self) -> bool:
        return bool(self.redis.exists(STOP))


def event(message: str) -> dict[str, Any]:
    """The Pub/Sub push body ``shared.delivery.handle`` reads, for a queued message."""
    body = json.loads(message)
    pushed = {"data": body["data"], "attributes": body["attributes"], "messageId": body["messageId"]}
    return {"message": pushed, "subscription": "projects/demo-pushline/subscriptions/bench"}
