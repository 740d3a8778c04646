"""A domain event -> a notification job: the event's type and id, and its rule rendered into a v1 job. Pure Python.

Other services publish domain events ("order completed", "comment posted") on Pub/Sub topics. The
``on_event`` use case (``shared/domain.py``) finds each event's type (:func:`event_type`) and id
(:func:`event_id`), looks the type up in the rules (``shared/rules.py``), and turns the event into a
v1 job with :func:`render`, which fills the rule's templates (``shared/templates.py``) from the event.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from shared import jobs, templates
from shared.jobs import JobError, type_name
from shared.rules import Rule
from shared.templates import clip

__all__ = [
    "EventError",
    "NoRecipientsError",
    "event_id",
    "event_type",
    "notification_id",
    "render",
]

NOTIFICATION_ID_PREFIX = "ev-"

_ONCE_RE = re.compile(jobs.ONCE_PATTERN)


class EventError(ValueError):
    """An event cannot be rendered by its (valid) rule; the message names the event field at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoRecipientsError(EventError):
    """The recipients field holds an empty list: nobody to notify (a caller may count this as ignored)."""


def _text_field(source: object, name: str) -> str | None:
    """``source[name]`` when ``source`` is a mapping and the value a non-empty string, else None."""
    value = source.get(name) if isinstance(source, Mapping) else None
    return value if isinstance(value, str) and value else None


def event_type(data: Mapping, attributes: Mapping[str, str]) -> str | None:
    """The event's type: the message attribute ``type``, else the data's ``type``; None if neither is a string."""
    return _text_field(attributes, "type") or _text_field(data, "type")


def event_id(data: Mapping, attributes: Mapping[str, str], message_id: str) -> str:
    """The event's id: attribute ``event_id``, else the data's ``id`` (string or whole number), else the message id."""
    found = _text_field(attributes, "event_id") or _text_field(data, "id")
    if found:
        return found
    value = data.get("id") if isinstance(data, Mapping) else None
    if isinstance(value, int) and not isinstance(value, bool):
        text = templates.scalar_text(value)
        if text is not None:
            return text
    return message_id


def notification_id(event_type: str, event_id: str) -> str:
    """A job id derived from the event: the same event (type and id) always gives the same id.

    ``"ev-"`` + the first 29 characters of the URL-safe base64 of SHA-256(type + "\\n" + id): 32
    characters matching ``jobs.ID_PATTERN``. Redelivered or republished events therefore collapse onto one job.
    """
    key = f"{event_type}\n{event_id}".encode("utf-8", "surrogatepass")
    digest = base64.urlsafe_b64encode(hashlib.sha256(key).digest()).decode("ascii")
    return NOTIFICATION_ID_PREFIX + digest[:29]


def _recipients(rule: Rule, data: Mapping) -> list[str]:
    if rule.recipients is not None:
        return list(rule.recipients)
    field = rule.recipients_field
    assert field is not None
    if field not in data:
        raise EventError(f"event field {field!r} (the recipients of rule {rule.type!r}) is missing")
    value = data[field]
    if isinstance(value, str):
        if not value:
            raise EventError(f"event field {field!r} (the recipients) is an empty string")
        return [value]
    if isinstance(value, list | tuple):
        if not value:
            raise NoRecipientsError(f"event field {field!r} (the recipients) is an empty list: nobody to notify")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise EventError(
                    f"event field {field!r}[{i}] must be a non-empty user id string, got {type_name(item)}"
                )
        return list(value)
    raise EventError(
        f"event field {field!r} (the recipients) must be a user id string or a list of them, got {type_name(value)}"
    )


def _fill(template: str, data: Mapping, where: str, rule_type: str) -> str:
    try:
        return templates.fill(templates.parse(template), data)
    except templates.MissingField as exc:
        raise EventError(f"event field {exc.name!r} is missing (needed by {where} of rule {rule_type!r})") from None
    except templates.NotScalar as exc:
        raise EventError(
            f"event field {exc.name!r} is {type_name(exc.value)}; {where} of rule {rule_type!r} "
            "needs a string, number or boolean there"
        ) from None


def _once(rule: Rule, data: Mapping) -> str:
    assert rule.once is not None
    once = _fill(rule.once, data, "once", rule.type)
    if not _ONCE_RE.fullmatch(once):
        fields = ", ".join(repr(name) for name in templates.field_names(templates.parse(rule.once)))
        raise EventError(
            f"once of rule {rule.type!r} rendered to {clip(once)!r}, not 1 to {jobs.MAX_ONCE_CHARS} characters of "
            f"A-Z a-z 0-9 _ . - (check event field(s) {fields})"
        )
    return once


def _check(rule: Rule, job: dict) -> None:
    """The rendered job must be one ``send`` would accept; user ids taken from an event field are
    checked first, so that their problem names the field."""
    if rule.recipients_field is not None:
        try:
            jobs.check_user_ids(job["user_ids"])
        except JobError as exc:
            raise EventError(
                f"the job rendered by rule {rule.type!r}, recipients from event field {rule.recipients_field!r} "
                f"is invalid: {exc.message}"
            ) from None
    try:
        jobs.parse_v1(job)
    except JobError as exc:
        raise EventError(f"the job rendered by rule {rule.type!r} is invalid: {exc.message}") from None


def render(rule: Rule, data: Mapping, *, job_id: str | None = None) -> dict:
    """The job for one event (version 1, or 2 with a version-2 field such as ``analytics_label``,
    ``category`` or ``urgent``): templates filled from ``data``, validated by ``jobs.parse_v1``.

    ``job_id`` (e.g. :func:`notification_id`) becomes the job's ``id`` when given. Raises EventError
    naming the event field when a placeholder's field is missing or not a string/number/boolean, or
    when the job breaks a job rule (e.g. more than 4,096 bytes of payload).
    """
    if not isinstance(data, Mapping):
        raise EventError(f"the event data must be a JSON object, got {type_name(data)}")
    job: dict[str, Any] = {"version": 1}
    if job_id is not None:
        job["id"] = job_id
    job["user_ids"] = _recipients(rule, data)
    notification: dict[str, str] = {}
    if rule.title is not None:
        notification["title"] = _fill(rule.title, data, "the title", rule.type)
    if rule.body is not None:
        notification["body"] = _fill(rule.body, data, "the body", rule.type)
    job["notification"] = notification
    if rule.data:
        job["data"] = {k: _fill(v, data, f"data[{k!r}]", rule.type) for k, v in rule.data.items()}
    if rule.platforms is not None:
        job["platforms"] = list(rule.platforms)
    if rule.once is not None:
        job["once"] = _once(rule, data)
    if rule.category is not None:
        job["category"] = rule.category
    if rule.urgent:
        job["urgent"] = True
    if rule.analytics_label is not None:
        job["analytics_label"] = rule.analytics_label
    if any(name in job for name in jobs.V2_FIELDS):
        job["version"] = jobs.LATEST_VERSION  # the version that carries them (shared/jobs.py)
    _check(rule, job)
    return job
