"""The deliver use case: a Pub/Sub message in, notifications out.

A message is either a public job (``send``'s body plus ``"version"``, 1 or 2: ``shared/jobs.py``;
any service may publish one) or an internal part (``{"kind": "part", ...}``, published by ``deliver`` itself when a
job fans out). Returning means "acknowledge"; ``RetryLater`` means "let the bus redeliver":

- a job for more than ``FANOUT_USERS_PER_PART`` users is split into parts published back to the
  topic; the job is acknowledged only after every part is published;
- a part reads its users' tokens and their locales (Redis, rebuilt from PostgreSQL when wiped), filters platforms,
  takes one-time claims, puts its tokens in the ledger and sends (``dispatch``); users inside their
  quiet hours are first recorded as a deferred part (``{"kind": "deferred", ...}``, ``shared/deferral.py``,
  published by ``tick`` when they end), which is handled like a part when it comes;
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
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from shared import bus, deferral, expansion, expiry, instance, jobs, logs, recipients, slots
from shared.audience_store import Device
from shared.claims import Claims, FinalOutcome, LedgerState, now_ms
from shared.config import Settings, settings
from shared.deferral import DeferredPart
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
    if isinstance(kind, str) and kind not in ("part", deferral.KIND) and _KIND.match(kind):
        return f"message kind {kind!r}"
    job = payload.get("job") if kind in ("part", deferral.KIND) else payload
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
    deferred: DeferredPart | None = None  # a part deferred by quiet hours (shared/deferral.py)


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
        if kind == deferral.KIND:
            where = deferral.parse(payload)
            job = jobs.parse_v1(payload.get("job"), default_id=derived_id(env.attributes, env.message_id))
            return Decoded(job, 0, 1, deferred=where)
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


def part_messages(job: jobs.Job, per_part: int, first: int = 0, total: int | None = None) -> list[dict[str, Any]]:
    """The job's fan-out parts, numbered from ``first`` of ``total`` (a slot's parts among all its slots')."""
    users = job.user_ids
    chunks = [users[i : i + per_part] for i in range(0, len(users), per_part)]
    return [
        {
            "kind": "part",
            "part": first + i,
            "parts": total or len(chunks),
            "job": jobs.to_v1(jobs.with_users(job, chunk)),
        }
        for i, chunk in enumerate(chunks)
    ]


def slot_of_job(job: jobs.Job) -> tuple[int, int]:
    """(index, count) of a slot job (``send_at_local`` with ``send_at``: one instant of it); (0, 1) for
    any other. ``Malformed`` when its send_at is none of its local time's slots."""
    if job.send_at_local is None or job.send_at is None:
        return 0, 1
    instants = list(slots.slots(job.send_at_local))
    if job.send_at not in instants:
        raise Malformed(f"send_at {jobs.format_time(job.send_at)} is no slot of send_at_local")
    return instants.index(job.send_at), len(instants)


def handle(event_data: Any) -> str:
    """Process one Pub/Sub message; returns what happened, raises RetryLater to be redelivered."""
    try:
        env = envelope(event_data)
        job, part, parts, devices, deferred = decode(env)
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
        if deferred is not None:
            return _part(job, 0, 1, deferred=deferred)
        if parts == 0 and job.send_at_local is not None and job.send_at is None:
            return _schedule_local(job)
        if parts == 0 and job.send_at is not None and not _due(job, env):
            return _schedule(job)
        if job.audience is not None:
            return _expand(job)
        if parts == 0:  # a whole job
            return _whole_job(job)
        return _part(job, part, parts)


def _due(job: jobs.Job, env: Envelope) -> bool:
    """A scheduled job is due when published due (``jobs.DUE_ATTRIBUTES``: by tick, or by an audience
    expansion continuing), or when its send_at has passed by this clock."""
    published_due = jobs.DUE_ATTRIBUTES.items() <= env.attributes.items()
    return published_due or (jobs.epoch_ms(job.send_at) or 0) <= now_ms()


def _schedule(job: jobs.Job) -> str:
    """A job not due yet: recorded durably (PostgreSQL, once per notification), its status mirrored in
    Redis, then acknowledged; tick publishes it when it is due (unless it is cancelled by then)."""
    send_at = jobs.epoch_ms(job.send_at) or 0
    if send_at > now_ms() + jobs.MAX_SCHEDULE_DAYS * 86_400_000:
        log.error("malformed message acknowledged without sending", extra={"reason": "send_at beyond 30 days"})
        _count("invalid_jobs")
        return "malformed"
    assert job.send_at is not None
    if instance.claims().cancelled(job.id):  # cancelled before it was recorded: nothing to keep
        log.info("cancelled scheduled job acknowledged without recording", extra={"notification_id": job.id})
        return "cancelled"
    slot = jobs.format_time(job.send_at) if job.send_at_local is not None else ""
    recorded = instance.schedule().record(job.id, job.send_at, jobs.to_v1(job), slot=slot)
    until = jobs.epoch_ms(_all_due(job))
    if job.audience is not None:  # its parts are known once expanded, when due
        instance.claims().create_status(job.id, targeted=0, audience=True, send_at=until)
    else:
        _, count = slot_of_job(job)
        parts = count * jobs.part_count(len(job.user_ids), settings().fanout_users_per_part)
        instance.claims().create_status(job.id, targeted=len(job.user_ids), parts_total=parts, send_at=until)
    log.info(
        "scheduled job recorded" if recorded else "scheduled job was recorded before",
        extra={"notification_id": job.id, "send_at": jobs.format_time(job.send_at)},
    )
    return "scheduled"


def _all_due(job: jobs.Job) -> datetime | None:
    """When the whole notification is due (its status lives LEDGER_TTL_SECONDS beyond): send_at, or the
    latest slot of a local-time job (of which a slot job is one)."""
    return max(slots.slots(job.send_at_local)) if job.send_at_local is not None else job.send_at


def _schedule_local(job: jobs.Job) -> str:
    """A local-time job: one slot per distinct instant its wall-clock time maps to (shared/slots.py);
    each slot still ahead recorded like a scheduled job, each already past published at once."""
    assert job.send_at_local is not None
    claims, now = instance.claims(), now_ms()
    instants = list(slots.slots(job.send_at_local))
    if (jobs.epoch_ms(instants[-1]) or 0) > now + jobs.MAX_SCHEDULE_DAYS * 86_400_000:
        log.error("malformed message acknowledged without sending", extra={"reason": "send_at_local beyond 30 days"})
        _count("invalid_jobs")
        return "malformed"
    if claims.cancelled(job.id):
        log.info("cancelled scheduled job acknowledged without recording", extra={"notification_id": job.id})
        return "cancelled"
    parts = len(instants) * jobs.part_count(len(job.user_ids), settings().fanout_users_per_part)
    # every slot's parts (send counted one slot's)
    claims.create_status(job.id, len(job.user_ids), parts, send_at=jobs.epoch_ms(instants[-1]), decides_parts=True)
    schedule, past = instance.schedule(), []
    for at in instants:
        slot_job = jobs.to_v1(replace(job, send_at=at))
        if (jobs.epoch_ms(at) or 0) > now:
            schedule.record(job.id, at, slot_job, slot=jobs.format_time(at))
        else:
            past.append(slot_job)
    for slot_job in past:  # already due where it is that time: at once
        bus.publish(slot_job, {"notification_id": job.id, **jobs.DUE_ATTRIBUTES})
    log.info("local-time job recorded", extra={"notification_id": job.id, "slots": len(instants), "now": len(past)})
    return "scheduled"


def _expand(job: jobs.Job) -> str:
    """An audience job (due): expanded into parts (shared/expansion.py)."""
    if job.send_at is not None:  # a scheduled one leaves "scheduled"
        instance.claims().mark_due(job.id, now_ms())
    return expansion.expand(job)


def _whole_job(job: jobs.Job) -> str:
    s = settings()
    claims = instance.claims()
    per_part = s.fanout_users_per_part
    index, count = slot_of_job(job)  # a local-time job's slot numbers its parts after the earlier slots'
    own = jobs.part_count(len(job.user_ids), per_part)
    parts = count * own
    send_at = jobs.epoch_ms(_all_due(job))  # (deliver's FANOUT_USERS_PER_PART decides the parts, not send's)
    claims.create_status(job.id, targeted=len(job.user_ids), parts_total=parts, send_at=send_at, decides_parts=True)
    if job.send_at is not None:
        claims.mark_due(job.id, now_ms())
    if own <= 1:
        return _part(job, index, parts)
    fanout = job.id if count == 1 else f"{job.id}/{index}"
    if claims.fanout_done(fanout):
        return "fanned-out-before"
    if claims.cancelled(job.id):
        log.info("cancelled job acknowledged without fanning out", extra={"notification_id": job.id})
        return "cancelled"
    for message in part_messages(job, per_part, first=index * own, total=parts):
        bus.publish(message, {"notification_id": job.id, "kind": "part"})
    claims.mark_fanout(fanout)
    log.info("job fanned out", extra={"notification_id": job.id, "parts": parts, "users": len(job.user_ids)})
    return "fanned-out"


def _part(job: jobs.Job, part: int, parts: int, deferred: DeferredPart | None = None) -> str:
    """A part of a user-id job. A deferred part (``deferred``: users whose quiet hours held it back) is
    the same with its own part id (its slot), its window opening at its due time, and its users'
    deferral settled."""
    opens = deferred.due_at if deferred is not None else 0
    part_id: int | str = deferred.slot if deferred is not None else part
    _not_while_paused(job, opens)
    store, claims = instance.token_store(), instance.claims()
    if deferred is not None and claims.cancelled(job.id) and not _entered_before(job, part_id, claims):
        claims.register_part(job.id, part_id, [], 0, 0)  # its tokens were counted cancelled by the cancel
        return "cancelled"
    store.settle_dead_tokens()
    devices, locales = store.devices_for_users(job.user_ids, extend_ttl=True)
    in_slot = _in_slot(job, devices, deferred)
    elsewhere = set(devices) - set(in_slot)  # read, but all their devices are in another slot's zones
    return _deliver_to(job, part_id, parts, in_slot, locales, claims, elsewhere=elsewhere, deferred=deferred)


def _entered_before(job: jobs.Job, part_id: int | str, claims: Claims) -> bool:
    """Whether an earlier copy of a (deferred) part put tokens in the ledger: it counted the part, or it
    could not read every user (then the part is not counted) and crashed. Such a part goes on after a
    cancel, so those tokens come back ``cancelled`` instead of waiting for ever (deferrals.settle keeps
    each counted once)."""
    if claims.part_counted(job.id, part_id):
        return True
    devices, _ = instance.token_store().devices_for_users(job.user_ids)
    entries = claims.ledger(job.id, [token for user_devices in devices.values() for token in user_devices])
    return any(entry.state is not LedgerState.ABSENT for entry in entries.values())


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
    part: int | str,
    parts: int,
    devices: Mapping[str, Mapping[str, str | None]],
    locales: Mapping[str, str],
    claims: Claims,
    *,
    elsewhere: set[str] | frozenset[str] = frozenset(),
    deferred: DeferredPart | None = None,
) -> str:
    """The part's users' rules (``recipients``), the quiet-hours deferrals recorded (before anything is
    acknowledged), its tokens into the ledger, sent; acknowledged once every token is final."""
    opens = deferred.due_at if deferred is not None else 0
    chosen = recipients.choose(job, devices, part, claims, at=max(now_ms(), opens))
    unresolved = [u for u in chosen.unresolved if u not in elsewhere]
    holders = _register(job, part, chosen, unresolved, deferred, claims)
    if holders is None:
        return "done-before"
    tokens = list(holders)
    outcome = _send(job, part, holders, devices, locales, claims, opens)
    _give_back(job, chosen.per_user, claims)
    _log_part(job, part, parts, tokens, outcome, unresolved)
    if unresolved:
        raise RetryLater(f"{len(unresolved)} users' tokens or preferences unreadable (PostgreSQL down, not cached)")
    return _finish(job, part, claims, outcome)


def _register(
    job: jobs.Job,
    part: int | str,
    chosen: recipients.Recipients,
    unresolved: list[str],
    deferred: DeferredPart | None,
    claims: Claims,
) -> dict[str, str] | None:
    """Record the part's quiet-hours deferrals (PostgreSQL, then their counts), put its tokens in the ledger
    with its user counts, and, for a deferred part, settle its users' deferral (in that order: the status
    never looks done meanwhile). Returns token -> its user; None once the notification is done."""
    if chosen.deferred:
        deferral.record(job, chosen.deferred)
    holders: dict[str, str] = {}
    for user_id, tokens in chosen.per_user.items():
        for token in tokens:
            holders.setdefault(token, user_id)
    registered = claims.register_part(
        job.id,
        part,
        list(holders),
        chosen.without_tokens,
        chosen.skipped_once,
        complete=not unresolved,
        muted=chosen.muted,
        capped=chosen.capped,
    )
    if registered is None:
        return None
    if deferred is not None:
        resolved = [u for u in job.user_ids if u not in unresolved]
        instance.deferrals().settle(job.id, deferred.slot, resolved, entered=chosen.per_user.keys())
    return holders


def _send(
    job: jobs.Job,
    part: int | str,
    holders: dict[str, str],
    devices: Mapping[str, Mapping[str, str | None]],
    locales: Mapping[str, str],
    claims: Claims,
    opens: int = 0,
) -> PartOutcome:
    """Send the part's tokens (``holders``: token -> its user; ``locales``: token -> its locale, for
    localized text) through the send window (``opens``: a deferred part's window opens at its due time)."""
    s = settings()
    store = instance.token_store()
    deadlines = _deadlines(job, part, devices, claims, s, opens)
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


def _finish(job: jobs.Job, part: int | str, claims: Claims, outcome: PartOutcome) -> str:
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


def _in_slot(
    job: jobs.Job, devices: dict[str, dict[str, str | None]], deferred: DeferredPart | None = None
) -> dict[str, dict[str, str | None]]:
    """A local-time job's slot reaches the devices whose zone (or default_time_zone) maps its wall-clock
    time to this slot's instant: the others wait for their own slot. A user without any device is
    counted (``without_tokens``) in the first slot only; one whose devices are all elsewhere, in none.
    A deferred part merges the users that every slot's parts deferred to its minute (its job names one
    of those slots): it reaches their devices of every slot due by then (the ledger sends each once)."""
    if job.send_at_local is None or job.send_at is None:
        return devices
    local, default, at = job.send_at_local, job.default_time_zone or "UTC", job.send_at
    zones = instance.token_store().time_zones([u for u, d in devices.items() if d])
    first = deferred is not None or slot_of_job(job)[0] == 0
    due = datetime.fromtimestamp(deferred.due_at / 1000, UTC) if deferred is not None else None

    def ours(slot: datetime) -> bool:
        return slot == at if due is None else slot <= due

    kept: dict[str, dict[str, str | None]] = {}
    for user, user_devices in devices.items():
        mine = {t: p for t, p in user_devices.items() if ours(slots.slot_of(local, zones.get(t), default))}
        if mine or (not user_devices and first):
            kept[user] = mine
    return kept


def _log_part(
    job: jobs.Job, part: int | str, parts: int, tokens: list[str], outcome: PartOutcome, unresolved: list[str]
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
    job: jobs.Job,
    part: int | str,
    devices: Mapping[str, Mapping[str, str | None]],
    claims: Claims,
    s: Settings,
    opens: int = 0,
) -> expiry.Deadlines:
    """The part's delivery deadlines: DELIVERY_WINDOW_SECONDS from the notification's acceptance (a scheduled
    one's due time; a part deferred by quiet hours: its due time, ``opens``), and the
    job's own expiry per platform (never inside the in-process wait of the part's first processing: a
    redelivery, after a pause or a retry beyond that wait, gets no grace of its own)."""
    now = now_ms()
    started = claims.part_started(job.id, part, now) if expiry.own_expiry(job, now) else now
    return expiry.deadlines_for(
        job,
        devices,
        accepted_at=expiry.deferred_window_opens(expiry.window_opens(job, claims.accepted_at(job.id) or now), opens),
        window_seconds=s.delivery_window_seconds,
        grace_until=started + IN_PROCESS_WAIT_MS,
    )


def _not_while_paused(job: jobs.Job, opens: int = 0) -> None:
    """A part redelivered while the breaker's pause holds costs a Redis round trip or two: no token
    read, nothing sent, unless its probe is due and nobody else probes (then this copy may be the prober),
    or its delivery window has closed (then it expires what is left, and is acknowledged), or the
    notification is cancelled (then it cancels what is left, sending nothing, and is acknowledged)."""
    pause = instance.breaker().holds(now_ms())
    if pause is not None:
        if instance.claims().cancelled(job.id):
            return
        accepted = instance.claims().accepted_at(job.id)
        opened = (
            expiry.deferred_window_opens(expiry.window_opens(job, accepted), opens) if accepted is not None else None
        )
        if opened is not None and now_ms() >= expiry.window_end(opened, settings().delivery_window_seconds):
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
