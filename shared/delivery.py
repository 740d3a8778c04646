"""The deliver use case: a Pub/Sub message in, notifications out.

A message is either a public job (``send``'s body plus ``"version"``, 1 or 2: ``shared/jobs.py``;
any service may publish one) or an internal part (``{"kind": "part", ...}``, published by ``deliver`` itself when a
job fans out). Returning means "acknowledge"; ``RetryLater`` means "let the bus redeliver":

- a job for more than ``FANOUT_USERS_PER_PART`` users is split into parts published back to the
  topic; the job is acknowledged only after every part is published;
- a part reads its users' tokens and their locales (Redis, rebuilt from PostgreSQL when wiped), filters platforms,
  takes one-time claims, puts its tokens in the ledger and sends (``dispatch``);
- it acknowledges only when every token is final (``expired`` too: a token whose delivery window
  closed, ``shared.expiry``); tokens leased by another live copy, retries not due within this
  instance's wait, users whose tokens could not be read, and any Redis error
  (unreachable, out of memory, read-only, ...: ``shared/errors.py``) all raise ``RetryLater``
  (the ledger makes the redelivery skip what is final);
- a job with an ``audience`` is expanded (``shared/expansion.py``) into parts that carry their devices;
  an audience part sends to them through the same steps, with a ledger sharded by token (each device
  once however its parts repeat) and, once the notification is done, nothing at all;
- a cancelled notification (``shared/cancel.py``) sends nothing more: a job not yet fanned out publishes
  no part; a part (a whole job of one part too) puts its tokens in the ledger, where each one not held
  by a live lease becomes final ``cancelled`` (counted once, however many copies arrive; a one-time
  claim it takes is given back, as for any user none of whose devices got it), and is acknowledged
  as soon as its tokens are final;
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
from typing import Any, NamedTuple

from shared import bus, expansion, expiry, instance, jobs, logs, recipients
from shared.audience_store import Device
from shared.claims import Claims, FinalOutcome, now_ms
from shared.config import Settings, settings
from shared.dispatch import IN_PROCESS_WAIT_MS, PartOutcome, dispatch
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
    """What in a message this deliver does not know yet (``"job version 3"``), or None."""
    kind = payload.get("kind")
    if isinstance(kind, str) and kind != "part" and _KIND.match(kind):
        return f"message kind {kind!r}"
    job = payload.get("job") if kind == "part" else payload
    version = job.get("version") if isinstance(job, dict) else None
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if isinstance(version, int) and not isinstance(version, bool) and jobs.LATEST_VERSION < version <= _MAX_VERSION:
        return f"job version {version}"
    return None


class Decoded(NamedTuple):
    """A message: its job, part number and parts (0: the whole job; 0 for an audience part too, whose
    parts are not known when it is published), and an audience part's devices (None otherwise)."""

    job: jobs.Job
    part: int = 0
    parts: int = 0
    devices: tuple[Device, ...] | None = None


def decode(env: Envelope) -> Decoded:
    """The message's job and part; Malformed when it can never be delivered, Unknown when a newer
    deploy may deliver it."""
    payload = json_object(env, "message")
    newer = unknown_shape(payload)
    if newer:
        raise Unknown(newer)
    kind = payload.get("kind")
    try:
        if kind is None:
            return Decoded(jobs.parse_v1(payload, default_id=derived_id(env.attributes, env.message_id)))
        if kind == "part":
            job = jobs.parse_v1(payload.get("job"), default_id=derived_id(env.attributes, env.message_id))
            part, parts = payload.get("part"), payload.get("parts")
            if "devices" in payload:
                return _audience_part(job, part, payload["devices"])
            if not (isinstance(part, int) and isinstance(parts, int) and 0 <= part < parts):
                raise Malformed("part message without a valid part/parts")
            return Decoded(job, part, parts)
    except jobs.JobError as exc:
        raise Malformed(f"invalid job: {exc.message}") from None
    raise Malformed(f"unknown message kind {kind!r}")


def _audience_part(job: jobs.Job, part: object, rows: object) -> Decoded:
    """An audience part: ``devices`` is a list of [token, user id, platform or null, locale or null]."""
    if job.audience is None or not isinstance(part, int) or isinstance(part, bool) or part < 0:
        raise Malformed("audience part without an audience job or a valid part number")
    if not isinstance(rows, list) or not rows:
        raise Malformed("audience part without devices")
    devices = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and all(isinstance(v, str) for v in row[:2])):
            raise Malformed("audience part with a malformed device")
        if not all(v is None or isinstance(v, str) for v in row[2:]):
            raise Malformed("audience part with a malformed device")
        devices.append(Device(*row))
    return Decoded(job, part, 0, tuple(devices))


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
        job, part, parts, devices = decode(env)
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
        if devices is not None:
            return _audience_part_delivery(job, part, devices)
        if job.audience is not None:
            return expansion.expand(job)
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
    if claims.cancelled(job.id):
        log.info("cancelled job acknowledged without fanning out", extra={"notification_id": job.id})
        return "cancelled"
    for message in part_messages(job, per_part):
        bus.publish(message, {"notification_id": job.id, "kind": "part"})
    claims.mark_fanout(job.id)
    log.info("job fanned out", extra={"notification_id": job.id, "parts": parts, "users": len(job.user_ids)})
    return "fanned-out"


def _part(job: jobs.Job, part: int, parts: int) -> str:
    _not_while_paused(job)
    store = instance.token_store()
    store.settle_dead_tokens()
    devices, locales = store.devices_for_users(job.user_ids, extend_ttl=True)
    return _deliver_to(job, part, parts, devices, locales, instance.claims())


def _audience_part_delivery(job: jobs.Job, part: int, devices: tuple[Device, ...]) -> str:
    """An audience part: its devices come with it (the expansion read them); its ledger is sharded by
    token, so a device in two parts (an expansion redone) is sent once; once the notification is done,
    any copy of it is a no-op (the done marker)."""
    claims = instance.claims().sharded()
    if claims.is_done(job.id):
        return "done-before"
    _not_while_paused(job)
    instance.token_store().settle_dead_tokens()
    by_user: dict[str, dict[str, str | None]] = {}
    for device in devices:
        by_user.setdefault(device.user_id, {})[device.token] = device.platform
    locales = {d.token: d.locale for d in devices if d.locale}
    return _deliver_to(job, part, 0, by_user, locales, claims)


def _deliver_to(
    job: jobs.Job,
    part: int,
    parts: int,
    devices: Mapping[str, Mapping[str, str | None]],
    locales: Mapping[str, str],
    claims: Claims,
) -> str:
    """The part's users' rules (``recipients``), its tokens into the ledger, sent; acknowledged once
    every token is final."""
    chosen = recipients.choose(job, devices)
    unresolved = chosen.unresolved
    holders: dict[str, str] = {}
    for user_id, tokens in chosen.per_user.items():
        for token in tokens:
            holders.setdefault(token, user_id)
    tokens = list(holders)
    registered = claims.register_part(
        job.id,
        part,
        tokens,
        chosen.without_tokens,
        chosen.skipped_once,
        complete=not unresolved,
        muted=chosen.muted,
        capped=chosen.capped,
    )
    if registered is None:
        return "done-before"
    outcome = _send(job, part, holders, devices, locales, claims)
    _give_back(job, chosen.per_user, claims)
    _log_part(job, part, parts, tokens, outcome, unresolved)
    if unresolved:
        raise RetryLater(f"{len(unresolved)} users' tokens or preferences unreadable (PostgreSQL down, not cached)")
    return _finish(job, part, claims, outcome)


def _send(
    job: jobs.Job,
    part: int,
    holders: dict[str, str],
    devices: Mapping[str, Mapping[str, str | None]],
    locales: Mapping[str, str],
    claims: Claims,
) -> PartOutcome:
    """Send the part's tokens (``holders``: token -> its user; ``locales``: token -> its locale, for
    localized text) through the send window."""
    s = settings()
    store = instance.token_store()
    deadlines = _deadlines(job, part, devices, claims, s)
    template = MessageTemplate(job)

    def remove_dead(dead: list[str]) -> None:
        store.remove_dead_many({t: [holders[t]] for t in dead if t in holders})

    async def run() -> PartOutcome:
        client = await instance.fcm_client()
        return await dispatch(
            job.id,
            list(holders),
            message_for=template.message_for(locales),
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

    return instance.run(run())


def _finish(job: jobs.Job, part: int, claims: Claims, outcome: PartOutcome) -> str:
    """Acknowledge the part once every token is final (and count it done); else RetryLater."""
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
    claims.part_done(job.id, part)
    return "delivered"


def _log_part(
    job: jobs.Job, part: int, parts: int, tokens: list[str], outcome: PartOutcome, unresolved: list[str]
) -> None:
    """One line per processing of a part: what it sent, and the tokens it made final, per outcome (the
    log-based metrics of infra/monitoring count messages from these fields: README "Dashboard and alerts")."""
    log.info(
        "part processed",
        extra={
            "event": "part_processed",
            "notification_id": job.id,
            "part": part,
            "parts": parts,
            "tokens": len(tokens),
            "sent": outcome.sent,
            **{final.value: outcome.finals[final.value] for final in FinalOutcome},
            "busy": len(outcome.busy),
            "later": len(outcome.later),
            "paused": outcome.paused,
            "unresolved_users": len(unresolved),
        },
    )


def _deadlines(
    job: jobs.Job, part: int, devices: Mapping[str, Mapping[str, str | None]], claims: Claims, s: Settings
) -> expiry.Deadlines:
    """The part's delivery deadlines: DELIVERY_WINDOW_SECONDS from the notification's acceptance, and the
    job's own expiry per platform (never inside the in-process wait of the part's first processing: a
    redelivery, after a pause or a retry beyond that wait, gets no grace of its own)."""
    now = now_ms()
    started = claims.part_started(job.id, part, now) if expiry.own_expiry(job, now) else now
    return expiry.deadlines_for(
        job,
        devices,
        accepted_at=claims.accepted_at(job.id) or now,
        window_seconds=s.delivery_window_seconds,
        grace_until=started + IN_PROCESS_WAIT_MS,
    )


def _not_while_paused(job: jobs.Job) -> None:
    """A part redelivered while the breaker's pause holds costs a Redis round trip or two: no token
    read, nothing sent, unless its probe is due and nobody else probes (then this copy may be the prober),
    or its delivery window has closed (then it expires what is left, and is acknowledged), or the
    notification is cancelled (then it cancels what is left, sending nothing, and is acknowledged)."""
    pause = instance.breaker().holds(now_ms())
    if pause is not None:
        if instance.claims().cancelled(job.id):
            return
        accepted = instance.claims().accepted_at(job.id)
        if accepted is not None and now_ms() >= expiry.window_end(accepted, settings().delivery_window_seconds):
            return
        wait = max(0, pause.next_probe - now_ms()) / 1000
        raise RetryLater(f"FCM outage: sending is paused project-wide (next probe in {wait:.1f} s)")


def _give_back(job: jobs.Job, per_user: dict[str, list[str]], claims: Claims) -> None:
    """What the notification took from users it did not reach goes back: the one-time claim of a user
    none of whose devices got it (all final, none delivered), and the daily cap's slot of a user all of
    whose devices were cancelled (the notification was cancelled before it was sent to any of them)."""
    cap = instance.daily_cap()
    cancelled = bool(cap.limit) and not job.urgent and claims.cancelled(job.id)
    if not job.once and not cancelled:
        return
    tokens = [t for ts in per_user.values() for t in ts]
    entries = claims.ledger(job.id, tokens)
    once, slots = [], []
    for user_id, user_tokens in per_user.items():
        finished = all(entries[t].final for t in user_tokens)
        if finished and not any(entries[t].delivered for t in user_tokens):
            once.append(user_id)
        if all(entries[t].outcome is FinalOutcome.CANCELLED for t in user_tokens):
            slots.append(user_id)
    if job.once and once:
        claims.release_once(job.id, job.once, once)
    if cancelled:
        cap.release(job.id, slots)


def _count(name: str) -> None:
    try:
        instance.claims().count(name)
    except REDIS_OUTAGE:
        pass
