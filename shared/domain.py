"""The on_event use case: a domain event in, a notification job out (through the same pipeline).

The rules file is loaded and validated on the first event an instance handles, never at import,
so a bad file cannot take down the functions that share ``main.py``. With a bad file every event
fails (``RulesUnavailable``): the bus retries it, then dead-letters it, and
``replay-dead-letters`` brings it back once the file is fixed.
"""

from __future__ import annotations

import functools
from typing import Any

from shared import bus, events, instance, logs
from shared.config import settings
from shared.inbound import Malformed, RetryLater, envelope, json_object, redelivered_on_outage
from shared.rules import Rule, RulesError, load_rules, rules_path

log = logs.get("on_event")


__all__ = ["RetryLater", "RulesUnavailable", "handle", "rules"]


class RulesUnavailable(RetryLater):
    """The rules file is missing or invalid: fail the event so the bus retries it later."""


@functools.cache
def _rules() -> dict[str, Rule]:
    return load_rules(rules_path(settings()))


def rules() -> dict[str, Rule]:
    try:
        return _rules()
    except RulesError as exc:
        log.error(
            "event rules are invalid: every event fails until they are fixed",
            extra={"event": "config_error", "config": "event_rules", "reason": str(exc)},
        )
        raise RulesUnavailable(str(exc)) from None


def handle(event_data: Any) -> str:
    """Turn one domain event into a job published to PUBSUB_TOPIC; returns what happened.

    Raises ``RetryLater`` (the bus redelivers) when the rules are unusable, the bus is down, or Redis
    fails in any way (unreachable, out of memory, read-only, ...).
    """
    with redelivered_on_outage():
        return _handle(event_data)


def _handle(event_data: Any) -> str:
    loaded = rules()
    claims = instance.claims()
    try:
        env = envelope(event_data)
        data = json_object(env, "event")
    except Malformed as exc:
        log.error("malformed event acknowledged", extra={"reason": str(exc)})
        claims.count("events_invalid")
        return "invalid"
    kind = events.event_type(data, env.attributes)
    rule = loaded.get(kind or "")
    if rule is None:
        log.info("event type without a rule ignored", extra={"event_type": kind})
        claims.count("events_ignored")
        return "ignored"
    event_id = events.event_id(data, env.attributes, env.message_id)
    nid = events.notification_id(rule.type, event_id)
    try:
        job = events.render(rule, data, job_id=nid)
    except events.EventError as exc:
        log.error("event rejected", extra={"event_type": kind, "reason": str(exc), "notification_id": nid})
        claims.count("events_invalid")
        return "invalid"
    bus.publish(job, {"notification_id": nid, "event_type": rule.type})
    claims.count("events_rendered")
    log.info("event turned into a notification", extra={"event_type": kind, "notification_id": nid})
    return "rendered"
