"""The bus's inbound side: what ``deliver`` and ``on_event`` share about a pushed Pub/Sub message.

- ``envelope``: the Pub/Sub message inside a CloudEvent's data, or ``Malformed``;
- ``json_object``: its payload as a JSON object, or ``Malformed``;
- three answers a consumer gives besides "done": ``Malformed`` (logged and acknowledged: it can
  never succeed), ``Unknown`` (a shape a newer deploy may know: not acknowledged) and ``RetryLater``
  (not finished: the bus redelivers; ``functions/main.py`` answers 503);
- ``redelivered_on_outage``: the one mapping of store and bus failures to ``RetryLater``. Any Redis
  error (unreachable, out of memory, read-only, ...: ``shared/errors.py``) and any ``Unavailable``
  dependency (the bus, Redis) means "try again later", which is always safe: the ledger makes a
  redelivery skip what is final.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import REDIS_OUTAGE, Unavailable, redis_outage


class RetryLater(Exception):
    """Not finished: the bus must redeliver this message later (the function raises)."""


class Malformed(ValueError):
    """The message can never be processed: logged and acknowledged."""


class Unknown(Exception):
    """A job version or message kind this consumer does not know yet: redelivered, never acknowledged."""


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    attributes: dict[str, str]
    message_id: str


def envelope(event_data: Any) -> Envelope:
    """The Pub/Sub message inside a CloudEvent's data (``{"message": {...}, "subscription": ...}``)."""
    if not isinstance(event_data, Mapping) or not isinstance(event_data.get("message"), Mapping):
        raise Malformed("event data has no Pub/Sub message")
    message = event_data["message"]
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise Malformed("message attributes are not an object")
    message_id = str(message.get("messageId") or message.get("message_id") or "")
    try:
        payload = base64.b64decode(message.get("data") or "", validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise Malformed("message data is not base64") from None
    return Envelope(payload, {str(k): str(v) for k, v in attributes.items()}, message_id)


def json_object(env: Envelope, what: str) -> dict[str, Any]:
    """The payload as a JSON object; ``Malformed`` naming ``what`` (``"message"``, ``"event"``) otherwise."""
    try:
        payload = json.loads(env.payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # (deeply nested: would be redelivered forever)
        raise Malformed(f"{what} data is not JSON") from None
    if not isinstance(payload, dict):
        raise Malformed(f"{what} data is not a JSON object")
    return payload


@contextlib.contextmanager
def redelivered_on_outage(redis_note: str = "") -> Iterator[None]:
    """Inside: a store or bus failure becomes ``RetryLater`` (the bus redelivers); anything else passes.

    The reason names the failure, never the error's text (a Redis reply may quote a device token);
    ``redis_note`` says what a Redis outage meant here (``"nothing sent without a claim"``)."""
    try:
        yield
    except REDIS_OUTAGE as exc:
        reason = redis_outage(exc)
        raise RetryLater(f"{reason}: {redis_note}" if redis_note else reason) from None
    except Unavailable as exc:
        raise RetryLater(f"{exc.what} unavailable") from None
