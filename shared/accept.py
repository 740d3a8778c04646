"""The send use case: validate a request, remember its Idempotency-Key, publish the job.

Nothing reaches FCM here: the request is accepted once the bus has acknowledged the job. An
``Idempotency-Key`` (as Stripe and Novu do it) is remembered for 24 h: the same key with the same
body replays the first answer and publishes nothing new; with a different body it is refused
(``KeyReused``); while the first request is still in flight, it is refused for now (``InFlight``).
``functions/main.py`` alone turns these results into HTTP answers.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from shared import bus, instance, jobs, logs
from shared import claims as ledger
from shared.config import settings
from shared.errors import REDIS_OUTAGE, RedisUnavailable

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

# An Idempotency-Key's record keeps the first answer as it was given (status and body), and a
# replay gives it back as stored, whichever deploy wrote it: so a new record stores the status
# that an accepted request has always been answered with.
RECORDED_ACCEPTED_STATUS = 202

log = logs.get("accept")


@dataclass(frozen=True)
class Accepted:
    """The job is on the bus: it will be delivered (``id`` is its notification id)."""

    id: str


@dataclass(frozen=True)
class Replayed:
    """The same Idempotency-Key and body were accepted before: the first answer, as stored."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class InFlight:
    """A request with this Idempotency-Key has not finished yet: try again in a moment."""

    reason: ClassVar[str] = "a request with this Idempotency-Key is still in flight"


@dataclass(frozen=True)
class KeyReused:
    """This Idempotency-Key came with a different body before: refused, nothing published."""

    reason: ClassVar[str] = "Idempotency-Key was already used with a different request body"


Result = Accepted | Replayed | InFlight | KeyReused


@dataclass(frozen=True)
class NotFound:
    """No notification has this id (or it is past LEDGER_TTL_SECONDS)."""

    reason: ClassVar[str] = "no such notification"


def fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def keyed_id(idempotency_key: str, body_fingerprint: str) -> str:
    digest = hashlib.sha256(f"{idempotency_key}\n{body_fingerprint}".encode()).digest()
    return "k-" + base64.urlsafe_b64encode(digest).decode().rstrip("=")[:30]


def accept(body: Any, *, idempotency_key: str | None = None) -> Result:
    """Validate and publish; raises JobError (the request is invalid), Unavailable (the bus, or any Redis error)."""
    job = jobs.parse_request(body, now=datetime.fromtimestamp(ledger.wall_clock(), UTC))
    if idempotency_key is None and job.audience is not None:
        raise jobs.JobError(
            "Idempotency-Key header is required with audience: a retried broadcast must never reach its devices twice"
        )
    if idempotency_key is None:
        return _publish(job)
    if not IDEMPOTENCY_KEY.match(idempotency_key):
        raise jobs.JobError("Idempotency-Key must be 1 to 255 printable ASCII characters")
    claims = instance.claims()
    print_ = fingerprint(body)
    # The id comes from the key and the body: a retry whose first publish timed out (and may have
    # reached the bus after all) is the same notification, which the ledger delivers once.
    job = dataclasses.replace(job, id=keyed_id(idempotency_key, print_))
    try:
        held = claims.idempotency_begin(idempotency_key, print_)
    except REDIS_OUTAGE as exc:
        raise _outage(exc) from None
    if held is not None:
        if held.get("fingerprint") != print_:
            return KeyReused()
        if held.get("state") != "done":
            return InFlight()
        return Replayed(held["status"], held["body"])
    try:
        accepted = _publish(job)
    except BaseException:
        try:
            claims.idempotency_abort(idempotency_key)
        except REDIS_OUTAGE:
            pass
        raise
    try:
        claims.idempotency_finish(idempotency_key, print_, RECORDED_ACCEPTED_STATUS, {"id": accepted.id})
    except REDIS_OUTAGE:
        pass  # the notification is on its way; a retry with the key is InFlight until the marker expires
    return accepted


def _outage(exc: Exception) -> RedisUnavailable:
    """Any Redis error makes send unavailable (see shared/errors.py), logged with what it means."""
    outage = RedisUnavailable(exc)
    log.warning("Redis cannot serve send: retry later", extra={"reason": str(outage)})
    return outage


def _publish(job: jobs.Job) -> Accepted:
    claims = instance.claims()
    parts = jobs.part_count(len(job.user_ids), settings().fanout_users_per_part)
    try:
        send_at = jobs.epoch_ms(jobs.last_due(job))
        if job.audience is not None:  # its parts are known once deliver has expanded it
            claims.create_status(job.id, targeted=0, audience=True, send_at=send_at)
        else:
            claims.create_status(job.id, targeted=len(job.user_ids), parts_total=parts, send_at=send_at)
    except REDIS_OUTAGE as exc:
        raise _outage(exc) from None
    try:
        bus.publish(jobs.to_v1(job), {"notification_id": job.id})
    except bus.BusUnavailable:
        try:
            claims.delete_status(job.id)
        except REDIS_OUTAGE:
            pass
        raise
    return Accepted(job.id)


def status(nid: str) -> dict[str, Any] | NotFound:
    """A notification's status document (its shape: ``Claims.status``), or ``NotFound``."""
    if not re.match(jobs.ID_PATTERN, nid):
        return NotFound()
    try:
        found = instance.claims().status(nid)
    except REDIS_OUTAGE as exc:
        raise _outage(exc) from None
    return NotFound() if found is None else found
