"""The open-receipts use case (issue 24): a device says it opened (or dismissed) a notification.

``POST /receipts`` on ``register`` (``{"notification_id", "token", "event"}``), with the caller's
Firebase ID token. A receipt is counted once per device and event however often it is sent, and only
for a token the caller holds now and that the notification was sent to (its ledger holds the token,
whatever FCM answered); anything else is ``NotFound`` and stores nothing. The body is judged before
anything is looked up (``parse``); each user's receipts are limited per minute with their own counter
at ``REGISTER_RATE_PER_MINUTE``. The counts are the status's ``opened`` / ``dismissed`` fields
(``shared/claims.py`` owns the keys); ``functions/main.py`` alone turns these results into HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from shared import instance, jobs
from shared.claims import RECEIPT_EVENTS
from shared.config import settings
from shared.errors import REDIS_OUTAGE, RedisUnavailable
from shared.store import InvalidInput, check_token, check_user_id

FIELDS = ("notification_id", "token", "event")
_ID_RE = re.compile(jobs.ID_PATTERN)


class InvalidReceipt(ValueError):
    """The request body is not a valid receipt; the message names the field."""


@dataclass(frozen=True)
class Receipt:
    notification_id: str
    token: str
    event: str


@dataclass(frozen=True)
class Counted:
    """The receipt is recorded: ``counted`` is False when this device had sent this event before."""

    counted: bool


@dataclass(frozen=True)
class NotFound:
    """No notification with this id was sent to this device of the caller's (nothing stored)."""

    reason: ClassVar[str] = "no notification with this id was sent to this device of yours"


def parse(body: Any) -> Receipt:
    """Judge the body alone (nothing is looked up): every field present, known and well formed."""
    if not isinstance(body, dict):
        raise InvalidReceipt("request body must be a JSON object")
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise InvalidReceipt(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    for name in FIELDS:
        if name not in body:
            raise InvalidReceipt(f"'{name}' is required")
    nid, event = body["notification_id"], body["event"]
    if not isinstance(nid, str) or not _ID_RE.fullmatch(nid):
        raise InvalidReceipt("'notification_id' must be a notification id: 1 to 32 characters of A-Z a-z 0-9 _ -")
    if not isinstance(event, str) or event not in RECEIPT_EVENTS:
        raise InvalidReceipt(f"'event' must be one of {', '.join(RECEIPT_EVENTS)}")
    try:
        token = check_token(body["token"])
    except InvalidInput as exc:
        raise InvalidReceipt(str(exc)) from None
    return Receipt(nid, token, event)


def record(user_id: str, receipt: Receipt) -> Counted | NotFound:
    """Count the receipt once; ``RateLimited`` beyond the user's limit, ``Unavailable`` when a store is down."""
    try:
        check_user_id(user_id)
    except InvalidInput as exc:
        raise InvalidReceipt(f"the signed-in user's id (the ID token's subject) is unusable: {exc}") from None
    claims = instance.claims()
    try:
        claims.receipt_rate(user_id, settings().register_rate_per_minute)
        if receipt.token not in instance.token_store().tokens(user_id):
            return NotFound()
        if not claims.targeted(receipt.notification_id, receipt.token):
            return NotFound()
        counted = claims.record_receipt(receipt.notification_id, receipt.token, receipt.event)
    except REDIS_OUTAGE as exc:
        raise RedisUnavailable(exc) from None
    return NotFound() if counted is None else Counted(counted)
