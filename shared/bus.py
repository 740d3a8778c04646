"""Publish a message to the bus: Google Cloud Pub/Sub, or a publisher plugged in from outside ``shared/``.

``publish(payload)`` returns the message id once the bus has acknowledged the message, or raises
``BusUnavailable`` (the HTTP edge answers 503). Which bus is used:

* Pub/Sub, through one lazily created ``PublisherClient`` per instance. google-cloud-pubsub reads
  ``PUBSUB_EMULATOR_HOST`` itself and then talks plain gRPC to the emulator with anonymous credentials.
* A publisher plugged in with :func:`plug_in`: a factory that makes it from the settings on first
  use (None: Pub/Sub after all). ``shared/`` holds none: development's in-memory local bus lives in
  ``local/bus.py`` and is plugged in by ``functions/main.py`` only when ``DELIVER_URL`` is set (which
  the cloud refuses), by ``python -m local.cli`` and by the tests.
* ``DELIVER_URL`` set, no ``PUBSUB_EMULATOR_HOST``, and no publisher plugged in (``python -m
  shared.cli`` for one): ``BusUnavailable``, never Google's Pub/Sub in place of the local bus.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from shared import logs
from shared.config import Settings, settings
from shared.errors import Unavailable

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.cloud.pubsub_v1 import PublisherClient

log = logs.get("bus")

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
# A publisher plugged in from outside shared/


class Publisher(Protocol):
    """What a plugged-in publisher does (development's local bus, in ``local/bus.py``, is the one there is)."""

    @property
    def pending(self) -> int:
        """Messages published but not yet handed over."""
        ...

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        """Take ``data`` for ``topic`` (a full path); return its message id."""
        ...

    def drain(self, timeout: float) -> bool:
        """Wait until every message was handed over; False if ``timeout`` passed first."""
        ...

    def close(self) -> None: ...


PublisherFactory = Callable[[Settings], Publisher | None]

_factory: PublisherFactory | None = None
_plugged: Publisher | None = None


def plug_in(factory: PublisherFactory) -> None:
    """Publish through ``factory(settings)`` from now on, made on first use; when it gives None, Pub/Sub.

    Called from outside ``shared/`` only: ``functions/main.py`` plugs in the local bus behind
    ``DELIVER_URL`` (which the cloud refuses), so the deployed code holds no development-only publisher.
    """
    global _factory, _plugged
    with _lock:
        if factory is _factory:
            return
        dropped, _factory, _plugged = _plugged, factory, None
    if dropped is not None:
        dropped.close()


def plugged() -> Publisher | None:
    """The plugged-in publisher for the current settings (made on first use), or None: Pub/Sub."""
    global _plugged
    with _lock:
        if _plugged is None and _factory is not None:
            _plugged = _factory(settings())
        return _plugged


def drain(timeout: float) -> int:
    """Wait until a plugged-in publisher handed over what it holds in memory; the messages still held.

    Pub/Sub acknowledges each message before ``publish`` returns: there is never anything to wait for.
    """
    publisher = plugged()
    if publisher is None or publisher.drain(timeout):
        return 0
    return publisher.pending


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
    other = plugged()
    if other is not None:
        return other.publish(path, data, attrs)
    s = settings()
    if s.deliver_url is not None and s.pubsub_emulator_host is None:
        raise BusUnavailable(
            "DELIVER_URL is set but no local bus is plugged into this process: it lives in local/bus.py "
            "(functions/main.py plugs it in; run the command line as python -m local.cli)"
        )
    return _publish_pubsub(path, data, attrs, timeout)


def reset_for_tests() -> None:
    """Drop the Pub/Sub publisher and the plugged-in one, made again on next use (after a test changed
    the environment); what is plugged in stays plugged in."""
    global _publisher, _plugged
    with _lock:
        publisher, other = _publisher, _plugged
        _publisher = _plugged = None
    if other is not None:
        other.close()
    if publisher is not None:
        try:
            publisher.stop()
        except Exception as exc:
            log.debug("stopping the publisher failed: %r", exc)
