"""The local bus: Pub/Sub push + Eventarc in memory, for development only. Never deployed.

``shared/bus.py`` publishes to Google Cloud Pub/Sub (or its emulator). With ``DELIVER_URL`` set and
no ``PUBSUB_EMULATOR_HOST``, messages go here instead, plugged in from outside ``shared/`` by
:func:`plug_in` (``functions/main.py`` does it behind ``DELIVER_URL``, which the cloud refuses;
``python -m local.cli`` and the tests do it too). ``LocalBus`` keeps messages in memory only and
POSTs each one to its subscriber the way Eventarc delivers a Pub/Sub message to a function (a
binary-mode CloudEvent), redelivering with exponential backoff until the subscriber answers 2xx.
A process exit loses every undelivered message.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared import bus, logs
from shared.config import Settings, settings

__all__ = ["LOCAL_SUBSCRIPTION", "PUBSUB_EVENT_TYPE", "LocalBus", "from_settings", "local_bus", "plug_in"]

log = logs.get("bus")

PUBSUB_EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"
LOCAL_SUBSCRIPTION = "local-bus"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    topic: str = field(compare=False)
    message_id: str = field(compare=False)
    data: bytes = field(compare=False)
    attributes: dict[str, str] = field(compare=False)
    publish_time: str = field(compare=False)
    attempts: int = field(default=0, compare=False)


class LocalBus:
    """An in-memory push bus for development: Pub/Sub push + Eventarc, without Google.

    ``subscriptions`` maps a topic (short name or full path) to the URL of its one subscriber.
    ``publish`` queues the message and returns its id at once; ``workers`` daemon threads POST
    messages concurrently, each as a binary-mode CloudEvent like Eventarc's, and redeliver after
    a non-2xx answer or a connection error with exponential backoff (``min_backoff`` doubling up
    to ``max_backoff``), for as long as the process lives. Messages to a topic without a
    subscriber are dropped, as Pub/Sub drops them. Nothing is kept on disk.
    """

    def __init__(
        self,
        subscriptions: Mapping[str, str] | None = None,
        *,
        project: str | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 60.0,
        workers: int = 8,
        request_timeout: float = 600.0,
    ) -> None:
        self.project = project or settings().google_cloud_project
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self._subscriptions: dict[str, str] = {}
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._queue: list[_Delivery] = []
        self._seq = itertools.count()
        self._pending = 0
        self._closed = False
        self._cond = threading.Condition()
        for topic, url in (subscriptions or {}).items():
            self.subscribe(topic, url)

    def _path(self, topic: str) -> str:
        return topic if topic.startswith("projects/") else f"projects/{self.project}/topics/{topic}"

    def subscribe(self, topic: str, url: str) -> None:
        """Push messages published to ``topic`` to ``url`` from now on (one subscriber per topic)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a local bus subscriber must be an http(s) URL, got {url!r}")
        with self._cond:
            self._subscriptions[self._path(topic)] = url

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        """Queue ``data`` for the subscriber of ``topic``; return the new message id."""
        path = self._path(topic)
        message_id = str(uuid.uuid4().int % 10**16)
        now = time.time()
        with self._cond:
            if self._closed:
                raise bus.BusUnavailable("the local bus is closed")
            url = self._subscriptions.get(path)
            if url is None:
                log.warning("local bus: no subscriber for %s, message %s dropped", path, message_id)
                return message_id
            self._start_workers()
            delivery = _Delivery(
                due=time.monotonic(),
                seq=next(self._seq),
                url=url,
                topic=path,
                message_id=message_id,
                data=data,
                attributes=dict(attributes or {}),
                publish_time=_rfc3339(now),
            )
            heapq.heappush(self._queue, delivery)
            self._pending += 1
            self._cond.notify()
        return message_id

    def drain(self, timeout: float) -> bool:
        """Wait until every queued message was acknowledged; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout=timeout)

    @property
    def pending(self) -> int:
        """Messages published but not yet acknowledged by their subscriber."""
        with self._cond:
            return self._pending

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers; undelivered messages are lost. Waits up to ``timeout`` for in-flight POSTs."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- workers

    def _start_workers(self) -> None:
        if self._threads:
            return
        for n in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"local-bus-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _next(self) -> _Delivery | None:
        with self._cond:
            while not self._closed:
                if self._queue:
                    wait = self._queue[0].due - time.monotonic()
                    if wait <= 0:
                        return heapq.heappop(self._queue)
                    self._cond.wait(timeout=wait)
                else:
                    self._cond.wait()
            return None

    def _work(self) -> None:
        while (delivery := self._next()) is not None:
            delivery.attempts += 1
            ok = self._post(delivery)
            with self._cond:
                if ok:
                    self._pending -= 1
                    self._cond.notify_all()
                    continue
                if self._closed:
                    return
                backoff = min(self.max_backoff, self.min_backoff * 2 ** (delivery.attempts - 1))
                delivery.due = time.monotonic() + backoff
                heapq.heappush(self._queue, delivery)
                self._cond.notify()

    def _request(self, delivery: _Delivery) -> urllib.request.Request:
        """The HTTP request Eventarc would make for ``delivery`` (binary-mode CloudEvent)."""
        message = {
            "attributes": delivery.attributes,
            "data": base64.b64encode(delivery.data).decode("ascii"),
            "messageId": delivery.message_id,
            "message_id": delivery.message_id,
            "publishTime": delivery.publish_time,
            "publish_time": delivery.publish_time,
        }
        body = {"message": message, "subscription": f"projects/{self.project}/subscriptions/{LOCAL_SUBSCRIPTION}"}
        headers = {
            "Content-Type": "application/json",
            "ce-specversion": "1.0",
            "ce-type": PUBSUB_EVENT_TYPE,
            "ce-source": f"//pubsub.googleapis.com/{delivery.topic}",
            "ce-id": delivery.message_id,
            "ce-time": delivery.publish_time,
        }
        # The URL scheme is checked to be http(s) in subscribe().
        return urllib.request.Request(delivery.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _post(self, delivery: _Delivery) -> bool:
        try:
            # The URL scheme is checked to be http(s) in subscribe().
            with urllib.request.urlopen(self._request(delivery), timeout=self.request_timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except Exception as exc:
            log.warning("local bus: POST %s failed (attempt %d): %r", delivery.url, delivery.attempts, exc)
            return False
        if 200 <= status < 300:
            return True
        log.warning(
            "local bus: %s answered %d for message %s (attempt %d)",
            delivery.url,
            status,
            delivery.message_id,
            delivery.attempts,
        )
        return False


def from_settings(s: Settings) -> LocalBus | None:
    """The local bus the settings ask for: ``DELIVER_URL`` (and ``ON_EVENT_URL``) set and no emulator; else None."""
    if s.deliver_url is None or s.pubsub_emulator_host is not None:
        return None
    subscriptions = {s.topic_path: s.deliver_url}
    if s.on_event_url:
        subscriptions[s.events_topic_path] = s.on_event_url
    return LocalBus(subscriptions, project=s.google_cloud_project)


def plug_in() -> None:
    """Make this process publish to the local bus whenever its settings ask for one (see :func:`from_settings`)."""
    bus.plug_in(from_settings)


def local_bus() -> LocalBus | None:
    """This process's local bus (made on first use), or None when its messages go to Pub/Sub."""
    publisher = bus.plugged()
    return publisher if isinstance(publisher, LocalBus) else None
