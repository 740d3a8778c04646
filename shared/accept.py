"""The send use case: validate a request, remember its Idempotency-Key, publish the job.

Nothing reaches FCM here: the request is answered 202 once the bus has acknowledged the job.
An ``Idempotency-Key`` (as Stripe and Novu do it) is remembered for 24 h: the same key with the
same body returns the first response and publishes nothing new; with a different body it is 422;
while the first request is still in flight, 409 with ``Retry-After``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from shared import bus, jobs, logs
from shared.claims import Claims
from shared.errors import REDIS_OUTAGE, RedisUnavailable

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

log = logs.get("accept")


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def keyed_id(idempotency_key: str, body_fingerprint: str) -> str:
    digest = hashlib.sha256(f"{idempotency_key}\n{body_fingerprint}".encode()).digest()
    return "k-" + base64.urlsafe_b64encode(digest).decode().rstrip("=")[:30]


def accept(body: Any, claims: Claims, *, users_per_part: int, idempotency_key: str | None = None) -> Answer:
    """Validate and publish; raises JobError (400), Unavailable (503: the bus, or any Redis error)."""
    job = jobs.parse_request(body)
    if idempotency_key is None:
        return _publish(job, claims, users_per_part)
    if not IDEMPOTENCY_KEY.match(idempotency_key):
        raise jobs.JobError("Idempotency-Key must be 1 to 255 printable ASCII characters")
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
            return Answer(422, {"error": "Idempotency-Key was already used with a different request body"})
        if held.get("state") != "done":
            return Answer(
                409, {"error": "a request with this Idempotency-Key is still in flight"}, {"Retry-After": "1"}
            )
        return Answer(held["status"], held["body"], {"Idempotent-Replayed": "true"})
    try:
        answer = _publish(job, claims, users_per_part)
    except BaseException:
        try:
            claims.idempotency_abort(idempotency_key)
        except REDIS_OUTAGE:
            pass
        raise
    try:
        claims.idempotency_finish(idempotency_key, print_, answer.status, answer.body)
    except REDIS_OUTAGE:
        pass  # the notification is on its way; a retry with the key will get 409 until the marker expires
    return answer


def _outage(exc: Exception) -> RedisUnavailable:
    """Any Redis error answers 503 (see shared/errors.py), logged with what it means."""
    outage = RedisUnavailable(exc)
    log.warning("Redis cannot serve send: answered 503", extra={"reason": str(outage)})
    return outage


def _publish(job: jobs.Job, claims: Claims, users_per_part: int) -> Answer:
    parts = jobs.part_count(len(job.user_ids), users_per_part)
    try:
        claims.create_status(job.id, targeted=len(job.user_ids), parts_total=parts)
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
    return Answer(202, {"id": job.id})


def status(nid: str, claims: Claims) -> Answer:
    if not re.match(jobs.ID_PATTERN, nid):
        return Answer(404, {"error": "no such notification"})
    try:
        found = claims.status(nid)
    except REDIS_OUTAGE as exc:
        raise _outage(exc) from None
    if found is None:
        return Answer(404, {"error": "no such notification"})
    return Answer(200, found)
