"""Publish a job to the bus: Google Cloud Pub/Sub, or the in-memory local push bus.

``publish(payload)`` returns the message id once the bus has acknowledged the message, or raises
``BusUnavailable`` (the HTTP edge answers 503). Which bus is used follows the settings:

* ``PUBSUB_EMULATOR_HOST`` set, or ``DELIVER_URL`` unset: Pub/Sub through one lazily created
  ``PublisherClient`` per instance. google-cloud-pubsub reads ``PUBSUB_EMULATOR_HOST`` itself and
  then talks plain gRPC to the emulator with anonymous credentials.
* ``DELIVER_URL`` set and ``PUBSUB_EMULATOR_HOST`` unset: the ``LocalBus``. It keeps messages in
  memory only and POSTs each one to its subscriber the way Eventarc delivers a Pub/Sub message to
  a function (a binary-mode CloudEvent), redelivering with exponential backoff until the
  subscriber answers 2xx. Development only: a process exit loses every undelivered message.
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
from typing import TYPE_CHECKING

from shared import logs
from shared.config import settings
from shared.errors import Unavailable

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.cloud.pubsub_v1 import PublisherClient

log = logs.get("bus")

PUBSUB_EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"
LOCAL_SUBSCRIPTION = "local-bus"
BATCH_MAX_LATENCY_SECONDS = 0.001


class BusUnavailable(Unavailable):
    """The bus could not be reached or did not acknowledge the message in time."""

    what = "the notification bus"


def topic_path(topic: str | None = None) -> str:
    """The full ``projects/P/topics/T`` path of ``topic`` (default: the jobs topic)."""
    s = settings()
    if topic is None:
        return s.topic_path
    if topic.startswith("projects/"):
        return topic
    return f"projects/{s.google_cloud_project}/topics/{topic}"


def encode(payload: dict) -> bytes:
    """Compact JSON, UTF-8: the message data for a job."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------------------------
# Pub/Sub


_publisher: PublisherClient | None = None
_local_bus: LocalBus | None = None
_lock = threading.Lock()


def _get_publisher() -> PublisherClient:
    global _publisher
    with _lock:
        if _publisher is None:
            from google.cloud import pubsub_v1

            _publisher = pubsub_v1.PublisherClient(
                batch_settings=pubsub_v1.types.BatchSettings(max_latency=BATCH_MAX_LATENCY_SECONDS),
            )
        return _publisher


def _retry(timeout: float) -> Retry:
    """The library's default publish retry predicate, with its deadline bounded by ours (its default is 600 s)."""
    from google.api_core import exceptions, retry

    return retry.Retry(
        initial=0.1,
        maximum=1.0,
        multiplier=2.0,
        predicate=retry.if_exception_type(
            exceptions.Aborted,
            exceptions.Cancelled,
            exceptions.DeadlineExceeded,
            exceptions.InternalServerError,
            exceptions.ResourceExhausted,
            exceptions.ServiceUnavailable,
            exceptions.Unknown,
        ),
        timeout=timeout,
    )


def _publish_pubsub(topic: str, data: bytes, attributes: Mapping[str, str], timeout: float) -> str:
    try:
        future = _get_publisher().publish(topic, data, retry=_retry(timeout), timeout=timeout, **dict(attributes))
        return str(future.result(timeout=timeout))
    except Exception as exc:
        raise BusUnavailable(f"Pub/Sub did not acknowledge the message on {topic}: {exc!r}") from exc


# --------------------------------------------------------------------------------------------
# The local bus


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
                raise BusUnavailable("the local bus is closed")
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
        return urllib.request.Request(delivery.url, data=json.dumps(body).encode(), headers=headers, method="POST")  # noqa: S310

    def _post(self, delivery: _Delivery) -> bool:
        try:
            # The URL scheme is checked to be http(s) in subscribe().
            with urllib.request.urlopen(self._request(delivery), timeout=self.request_timeout) as response:  # noqa: S310
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


def local_bus() -> LocalBus | None:
    """The instance's local bus, or None when messages go to Pub/Sub (the emulator or Google)."""
    global _local_bus
    s = settings()
    if s.deliver_url is None or s.pubsub_emulator_host is not None:
        return None
    with _lock:
        if _local_bus is None:
            subscriptions = {s.topic_path: s.deliver_url}
            if s.on_event_url:
                subscriptions[s.events_topic_path] = s.on_event_url
            _local_bus = LocalBus(subscriptions, project=s.google_cloud_project)
        return _local_bus


# --------------------------------------------------------------------------------------------
# The entry point


def publish(
    payload: dict,
    attributes: dict[str, str] | None = None,
    *,
    topic: str | None = None,
    timeout: float = 10.0,
) -> str:
    """Publish ``payload`` as compact JSON; return the message id once the bus acknowledged it.

    ``topic`` is a topic name in GOOGLE_CLOUD_PROJECT or a full path (default: PUBSUB_TOPIC).
    Raises ``BusUnavailable`` when the bus cannot be reached or does not acknowledge within
    ``timeout`` seconds (the client library's retries are bounded by the same timeout, so a dead
    bus fails fast instead of hanging). A publish that timed out may still have reached the bus:
    consumers deduplicate (the ledger), as Pub/Sub delivers at least once anyway.
    """
    path = topic_path(topic)
    data = encode(payload)
    attrs = dict(attributes or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items()):
        raise TypeError(f"message attributes must map str to str, got {attrs!r}")
    bus = local_bus()
    if bus is not None:
        return bus.publish(path, data, attrs)
    return _publish_pubsub(path, data, attrs, timeout)


def reset_for_tests() -> None:
    """Drop the cached publisher and local bus (after a test changed the environment)."""
    global _publisher, _local_bus
    with _lock:
        publisher, bus = _publisher, _local_bus
        _publisher = _local_bus = None
    if bus is not None:
        bus.close()
    if publisher is not None:
        try:
            publisher.stop()
        except Exception as exc:
            log.debug("stopping the publisher failed: %r", exc)
