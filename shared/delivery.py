"""The deliver use case: a Pub/Sub message in, notifications out.

A message is either a public v1 job (``send``'s body plus ``"version": 1``; any service may
publish one) or an internal part (``{"kind": "part", ...}``, published by ``deliver`` itself when a
job fans out). Returning means "acknowledge"; ``RetryLater`` means "let the bus redeliver":

- a job for more than ``FANOUT_USERS_PER_PART`` users is split into parts published back to the
  topic; the job is acknowledged only after every part is published;
- a part reads its users' tokens (Redis, rebuilt from PostgreSQL when wiped), filters platforms,
  takes one-time claims, puts its tokens in the ledger and sends (``dispatch``);
- it acknowledges only when every token is final (``expired`` too: a token whose delivery window
  closed, ``shared.expiry``); tokens leased by another live copy, retries not due within this
  instance's wait, users whose tokens could not be read, and any Redis error
  (unreachable, out of memory, read-only, ...: ``shared/errors.py``) all raise ``RetryLater``
  (the ledger makes the redelivery skip what is final);
- a malformed message (undecodable, or an invalid job of a version we know) is logged and
  acknowledged: it would never become valid;
- a message of a job version or kind this deliver does not know is not acknowledged (``Unknown``
  → ``RetryLater``): during a rolling deploy a newer ``send`` or ``deliver`` may publish it while
  this one still runs, and an instance that knows it takes it later (if none ever does, the
  subscription dead-letters it and ``replay-dead-letters`` brings it back).

``RetryLater``, ``Malformed``, ``Unknown`` and the envelope are the bus's inbound side
(``shared/inbound.py``), shared with ``on_event``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from shared import bus, expiry, instance, jobs, logs
from shared.claims import Claims, PartClock, now_ms
from shared.config import Settings, settings
from shared.dispatch import IN_PROCESS_WAIT_MS, dispatch
from shared.errors import REDIS_OUTAGE
from shared.fcm_message import MessageTemplate
from shared.inbound import Envelope, Malformed, RetryLater, Unknown, envelope, json_object, redelivered_on_outage

log = logs.get("deliver")


# What a newer deploy could publish: a kind named like ours, a whole version number above ours.
_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
_MAX_VERSION = 2**31 - 1


def derived_id(attributes: Mapping[str, str], message_id: str) -> str:
    """The notification id of a published job without an ``id``: from its idempotency key, else
    its message id (so a redelivered or re-published message is the same notification)."""
    basis = attributes.get("idempotency_key") or f"msg:{message_id}"
    digest = hashlib.sha256(basis.encode()).digest()
    return "j-" + base64.urlsafe_b64encode(digest).decode().rstrip("=")[:30]


def unknown_shape(payload: dict[str, Any]) -> str | None:
    """What in a message this deliver does not know yet (``"job version 2"``), or None."""
    kind = payload.get("kind")
    if isinstance(kind, str) and kind != "part" and _KIND.match(kind):
        return f"message kind {kind!r}"
    job = payload.get("job") if kind == "part" else payload
    version = job.get("version") if isinstance(job, dict) else None
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if isinstance(version, int) and not isinstance(version, bool) and jobs.VERSION < version <= _MAX_VERSION:
        return f"job version {version}"
    return None


def decode(env: Envelope) -> tuple[jobs.Job, int, int]:
    """(job, part index, parts) of a message; Malformed when it can never be delivered, Unknown when
    a newer deploy may deliver it."""
    payload = json_object(env, "message")
    newer = unknown_shape(payload)
    if newer:
        raise Unknown(newer)
    kind = payload.get("kind")
    try:
        if kind is None:
            return jobs.parse_v1(payload, default_id=derived_id(env.attributes, env.message_id)), 0, 0
        if kind == "part":
            part, parts = payload.get("part"), payload.get("parts")
            if not (isinstance(part, int) and isinstance(parts, int) and 0 <= part < parts):
                raise Malformed("part message without a valid part/parts")
            job = jobs.parse_v1(payload.get("job"), default_id=derived_id(env.attributes, env.message_id))
            return job, part, parts
    except jobs.JobError as exc:
        raise Malformed(f"invalid job: {exc.message}") from None
    raise Malformed(f"unknown message kind {kind!r}")


def part_messages(job: jobs.Job, per_part: int) -> list[dict[str, Any]]:
    users = job.user_ids
    chunks = [users[i : i + per_part] for i in range(0, len(users), per_part)]
    return [
        {"kind": "part", "part": i, "parts": len(chunks), "job": jobs.to_v1(jobs.with_users(job, chunk))}
        for i, chunk in enumerate(chunks)
    ]


def handle(event_data: Any) -> str:
    """Process one Pub/Sub message; returns what happened, raises RetryLater to be redelivered."""
    try:
        env = envelope(event_data)
        job, part, parts = decode(env)
    except Malformed as exc:
        log.error("malformed message acknowledged without sending", extra={"reason": str(exc)})
        _count("invalid_jobs")
        return "malformed"
    except Unknown as exc:
        log.warning(
            f"{exc} is unknown to this deliver: not acknowledged, the bus redelivers it to an instance "
            "that knows it (a newer deploy rolling out?), or dead-letters it",
            extra={"unknown": str(exc)},
        )
        raise RetryLater(f"{exc} unknown to this deliver") from None
    with redelivered_on_outage(redis_note="nothing sent without a claim"):
        if parts == 0:  # a whole job
            return _whole_job(job)
        return _part(job, part, parts)


def _whole_job(job: jobs.Job) -> str:
    s = settings()
    claims = instance.claims()
    per_part = s.fanout_users_per_part
    parts = jobs.part_count(len(job.user_ids), per_part)
    claims.create_status(job.id, targeted=len(job.user_ids), parts_total=parts)
    claims.set_parts_total(job.id, parts)  # deliver's FANOUT_USERS_PER_PART decides, not send's
    if parts <= 1:
        return _part(job, 0, 1)
    if claims.fanout_done(job.id):
        return "fanned-out-before"
    for message in part_messages(job, per_part):
        bus.publish(message, {"notification_id": job.id, "kind": "part"})
    claims.mark_fanout(job.id)
    log.info("job fanned out", extra={"notification_id": job.id, "parts": parts, "users": len(job.user_ids)})
    return "fanned-out"


def _part(job: jobs.Job, part: int, parts: int) -> str:
    s = settings()
    _not_while_paused(job)
    store, claims = instance.token_store(), instance.claims()
    store.settle_dead_tokens()
    devices = store.tokens_for_users(job.user_ids, extend_ttl=True)
    unresolved = [u for u in job.user_ids if u not in devices]
    holders: dict[str, str] = {}
    per_user: dict[str, list[str]] = {}
    for user_id, user_devices in devices.items():
        tokens = [t for t, p in user_devices.items() if not job.platforms or p in job.platforms]
        if tokens:
            per_user[user_id] = tokens
    without_tokens = len(devices) - len(per_user)
    skipped: list[str] = []
    if job.once:
        allowed, skipped = claims.claim_once(job.id, job.once, sorted(per_user))
        per_user = {u: per_user[u] for u in allowed}
    for user_id, tokens in per_user.items():
        for token in tokens:
            holders.setdefault(token, user_id)
    tokens = list(holders)
    clock = _into_ledger(claims, job, part, tokens, without_tokens, len(skipped), complete=not unresolved)
    deadlines = _deadlines(job, devices, clock, s)
    template = MessageTemplate(job)

    def remove_dead(dead: list[str]) -> None:
        store.remove_dead_many({t: [holders[t]] for t in dead if t in holders})

    async def run() -> Any:
        client = await instance.fcm_client()
        return await dispatch(
            job.id,
            tokens,
            message_for=template.for_token,
            send=client.send,
            claims=claims,
            remove_dead=remove_dead,
            max_in_flight=s.fcm_max_in_flight,
            # outlives a live request (its token fetch and its send, each bounded by the timeout)
            # and the confirmation that follows it
            lease_ms=(2 * s.fcm_timeout_seconds + 5) * 1000,
            deadlines=deadlines,
            breaker=instance.breaker(),
        )

    outcome = instance.run(run())
    if job.once:
        _release_undelivered_once(job, per_user)
    log.info(
        "part processed",
        extra={
            "notification_id": job.id,
            "part": part,
            "parts": parts,
            "tokens": len(tokens),
            "sent": outcome.sent,
            "dead_removed": len(outcome.removed),
            "busy": len(outcome.busy),
            "later": len(outcome.later),
            "expired": outcome.expired,
            "paused": outcome.paused,
            "unresolved_users": len(unresolved),
        },
    )
    if unresolved:
        raise RetryLater(f"{len(unresolved)} users' tokens unreadable (PostgreSQL down, not cached)")
    if outcome.busy:
        entries = claims.ledger(job.id, list(outcome.busy))
        if not all(entry.final for entry in entries.values()):
            raise RetryLater(
                f"{len(outcome.busy)} tokens held by another copy of this message (or their lease was lost)"
            )
    if outcome.later and outcome.paused:
        raise RetryLater(f"FCM outage: sending is paused project-wide; {len(outcome.later)} tokens wait")
    if outcome.later:
        raise RetryLater(f"{len(outcome.later)} tokens wait for a retry beyond this instance's wait")
    return "delivered"


def _into_ledger(
    claims: Claims, job: jobs.Job, part: int, tokens: list[str], without_tokens: int, skipped: int, *, complete: bool
) -> PartClock:
    """Put the part's tokens in the ledger; read back its window's clock in the same round trip (the part's
    first processing only when the job has its own expiry: only that may not cut into its wait)."""
    started = bool(expiry.own_expiry(job, now_ms()))
    return claims.register_part(job.id, part, tokens, without_tokens, skipped, complete=complete, started=started)


def _deadlines(
    job: jobs.Job, devices: Mapping[str, Mapping[str, str | None]], clock: PartClock, s: Settings
) -> expiry.Deadlines:
    """The part's delivery deadlines: DELIVERY_WINDOW_SECONDS from the notification's acceptance, and the
    job's own expiry per platform (never inside the in-process wait of the part's first processing: a
    redelivery, after a pause or a retry beyond that wait, gets no grace of its own). ``clock``: what
    putting the part in the ledger read back (one round trip for both)."""
    started = clock.started if clock.started is not None else clock.at
    return expiry.deadlines_for(
        job,
        devices,
        accepted_at=clock.accepted_at,
        window_seconds=s.delivery_window_seconds,
        grace_until=started + IN_PROCESS_WAIT_MS,
    )


def _not_while_paused(job: jobs.Job) -> None:
    """A part redelivered while the breaker's pause holds costs a Redis round trip or two: no token
    read, nothing sent, unless its probe is due and nobody else probes (then this copy may be the prober),
    or its delivery window has closed (then it expires what is left, and is acknowledged)."""
    pause = instance.breaker().holds(now_ms())
    if pause is not None:
        accepted = instance.claims().accepted_at(job.id)
        if accepted is not None and now_ms() >= expiry.window_end(accepted, settings().delivery_window_seconds):
            return
        wait = max(0, pause.next_probe - now_ms()) / 1000
        raise RetryLater(f"FCM outage: sending is paused project-wide (next probe in {wait:.1f} s)")


def _release_undelivered_once(job: jobs.Job, per_user: dict[str, list[str]]) -> None:
    """Give back the one-time claim of users none of whose devices got the notification."""
    claims = instance.claims()
    tokens = [t for ts in per_user.values() for t in ts]
    entries = claims.ledger(job.id, tokens)
    release = []
    for user_id, user_tokens in per_user.items():
        finished = all(entries[t].final for t in user_tokens)
        if finished and not any(entries[t].delivered for t in user_tokens):
            release.append(user_id)
    if release:
        claims.release_once(job.id, job.once or "", release)


def _count(name: str) -> None:
    try:
        instance.claims().count(name)
    except REDIS_OUTAGE:
        pass
