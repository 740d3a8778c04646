"""The job model: parse, validate and encode a notification job. Pure Python, no I/O.

A job asks for one notification to be sent to many users. It reaches the pipeline two ways:

* ``send``'s HTTP request body, read by :func:`parse_request` (the id is generated here);
* the public **job** on the Pub/Sub topic: the same body plus ``"version"`` and an optional
  ``"id"``, read by :func:`parse_v1` and written by :func:`to_v1`. Any service may publish one, so
  it is validated exactly as ``send`` validates (the same code).

**Versions.** A job that uses any field of ``V2_FIELDS`` is ``"version": 2``; one that uses none is
written ``"version": 1`` exactly as before, so a reader that knows only version 1 keeps reading every
job it can deliver correctly (and does not acknowledge a version-2 job: ``shared/delivery.py``).
The parser reads both; a version-1 job that carries a ``V2_FIELDS`` field is refused, naming it.
**Adding a field that older readers must not ignore** (an extension point): append its name to
``V2_FIELDS``, give ``Job`` an attribute of that name that is None when the field is absent, parse
it in ``_build``, and describe it in ``infra/job.schema.json`` (a property, plus a line in
``dependentSchemas`` requiring version 2; ``tests/test_jobs.py`` checks both). :func:`to_v1` writes it
(dicts and tuples as JSON objects and lists) and picks the version by itself.

``infra/job.schema.json`` describes the job as a JSON Schema; ``tests/test_jobs.py`` keeps the
two in agreement. What the schema cannot say: duplicate user ids are removed, strings must be
valid Unicode (no lone surrogates), two ``localized`` locales may not be equal once canonical, and
notification (or any localized variant) + data must fit FCM's 4,096 bytes.

Every rule failure is a :class:`JobError` whose message names the field path and the problem.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from shared import audience as audience_rules
from shared.attributes import AttributeRuleError, canonical_locale, check_time_zone
from shared.json_types import type_name
from shared.preferences import CATEGORY_PATTERN

__all__ = [
    "ANALYTICS_LABEL_PATTERN",
    "DUE_ATTRIBUTES",
    "ID_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "MAX_USER_IDS",
    "MAX_VARIANTS",
    "PLATFORMS",
    "V2_FIELDS",
    "Job",
    "JobError",
    "check_analytics_label",
    "check_data_key",
    "check_platforms",
    "check_send_at_window",
    "check_user_ids",
    "epoch_ms",
    "format_local",
    "format_time",
    "last_due",
    "new_id",
    "parse_request",
    "parse_v1",
    "part_count",
    "to_v1",
    "type_name",
    "valid_unicode",
    "version_of",
    "with_users",
]

VERSION = 1  # a job using no V2_FIELDS field is written as this version: every reader knows it
LATEST_VERSION = 2  # the newest version this service reads and writes
VERSIONS = (1, 2)
ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
# No ":" in once keys: notif:onetime:{user_id}:{key} then names one user and key unambiguously.
MAX_ONCE_CHARS = 64
ONCE_PATTERN = rf"^[A-Za-z0-9_.-]{{1,{MAX_ONCE_CHARS}}}$"
# FCM's rule for fcm_options.analytics_label (it groups delivery reports and the BigQuery export by it)
ANALYTICS_LABEL_PATTERN = r"^[A-Za-z0-9_.~%-]{1,50}$"
MAX_USER_IDS = 10_000
MAX_USER_ID_CHARS = 256
MAX_PAYLOAD_BYTES = 4096
MAX_OPTION_CHARS = 1024  # android/apns/webpush strings: not counted in the payload, so capped here
MAX_URL_CHARS = 2048
MAX_BADGE = 2**31 - 1
MAX_TTL_SECONDS = 28 * 86_400  # FCM keeps a message at most 4 weeks
PLATFORMS = ("android", "ios", "web")
MAX_VARIANTS = 100  # localized: variants per job

# FCM's documented reserved data keys: "from", "notification", "message_type", and any key starting
# with "google." or "gcm.". ("collapse_key" is not reserved in HTTP v1: it lives in android.collapse_key.)
RESERVED_DATA_KEYS = frozenset({"from", "message_type", "notification"})
RESERVED_DATA_PREFIXES = ("google.", "gcm.")

# The fields that make a job version 2 (see the module docstring: one line here per new field).
V2_FIELDS: tuple[str, ...] = (
    "localized",
    "analytics_label",
    "category",
    "urgent",
    "audience",
    "send_at",
    "send_at_local",
    "default_time_zone",
)
V1_REQUEST_FIELDS = ("user_ids", "notification", "data", "platforms", "once", "android", "apns", "webpush")
REQUEST_FIELDS = (*V1_REQUEST_FIELDS, *V2_FIELDS)
V1_FIELDS = ("version", "id", *V1_REQUEST_FIELDS)
JOB_FIELDS = ("version", "id", *REQUEST_FIELDS)
# send_at: RFC 3339 with an offset (Z or +hh:mm), seconds required, at most 9 fractional digits.
SEND_AT_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
MAX_SCHEDULE_DAYS = 30  # send_at at most this long after acceptance
# send_at_local: a wall-clock time without offset, seconds optional (each device's own time zone).
SEND_AT_LOCAL_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?$"
SEND_AT_PAST_SECONDS = 1  # and at most this far in the past (a clock a little behind the caller's)
# The bus attribute of a scheduled job published once it is due (tick, a local-time slot already past, an
# audience expansion continuing): deliver sends it whatever its own clock says, and never records it again.
DUE_ATTRIBUTES: Mapping[str, str] = MappingProxyType({"due": "1"})

_ID_RE = re.compile(ID_PATTERN)
_ONCE_RE = re.compile(ONCE_PATTERN)
_CATEGORY_RE = re.compile(CATEGORY_PATTERN)
_ANALYTICS_LABEL_RE = re.compile(ANALYTICS_LABEL_PATTERN)
_SEND_AT_RE = re.compile(SEND_AT_PATTERN)
_SEND_AT_LOCAL_RE = re.compile(SEND_AT_LOCAL_PATTERN)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")
_DURATION_RE = re.compile(r"([0-9]+)(\.[0-9]{1,9})?s")
# An absolute URL with a lowercase http(s) scheme, a non-empty host part, and no spaces or controls.
_HTTP_URL_RE = re.compile(r"https?://[^/?#\x00-\x20\x7f-\x9f]+(?:[/?#][^\x00-\x20\x7f-\x9f]*)?")
_HTTPS_URL_RE = re.compile(r"https://[^/?#\x00-\x20\x7f-\x9f]+(?:[/?#][^\x00-\x20\x7f-\x9f]*)?")


class JobError(ValueError):
    """A job (or ``send`` body) breaks a rule. ``message`` says what is wrong and where."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Job:
    """A validated job. Treat the dicts as read-only: they are shared with the messages built from it."""

    id: str
    user_ids: tuple[str, ...]
    notification: dict | None = None
    data: dict[str, str] | None = None
    platforms: tuple[str, ...] | None = None
    once: str | None = None
    android: dict | None = None
    apns: dict | None = None
    webpush: dict | None = None
    # version 2 (V2_FIELDS): None when absent
    localized: dict[str, dict] | None = None  # canonical locale -> notification text, in the given order
    category: str | None = None  # what a user may mute (shared/preferences.py); None: never muted
    urgent: bool | None = None  # True: past quiet hours and the daily cap (never a mute); false is None
    analytics_label: str | None = None  # FCM's fcm_options.analytics_label of every message
    audience: dict[str, Any] | None = None  # the devices to reach instead of user_ids (shared.audience)
    send_at: datetime | None = None  # (UTC) not sent before: deliver records it until tick finds it due
    # each device at this wall-clock time in its own zone (naive), default_time_zone for devices without
    # one; with send_at too, the job is one slot (send_at: its instant) of such a send (shared/slots.py)
    send_at_local: datetime | None = None
    default_time_zone: str | None = None


def version_of(job: Job) -> int:
    """The version ``job`` is written as: 2 when it uses a ``V2_FIELDS`` field, else 1."""
    return LATEST_VERSION if any(getattr(job, name) is not None for name in V2_FIELDS) else VERSION


def new_id() -> str:
    """A fresh random job id: 22 URL-safe characters (128 bits), matching ``ID_PATTERN``."""
    return secrets.token_urlsafe(16)


# --- small checks ------------------------------------------------------------------------------


def _shown(value: object) -> str:
    """A value for an error message: JSON-like for short scalars, else its type."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if (isinstance(value, int) and abs(value) < 10**15) or isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and len(value) <= 100:
        return repr(value)
    return type_name(value)


def _shown_text(value: object) -> str:
    """A string value (quoted, if short) or the type of a non-string, for an error message."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 100 else f"a string of {len(value)} characters"
    return type_name(value)


def valid_unicode(value: str) -> bool:
    """False for strings with lone surrogates (they cannot be encoded to send)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _string(value: object, path: str, *, max_chars: int | None = MAX_OPTION_CHARS) -> str:
    if not isinstance(value, str):
        raise JobError(f"{path} must be a string, got {type_name(value)}")
    if max_chars is not None and len(value) > max_chars:
        raise JobError(f"{path} must be at most {max_chars} characters, got {len(value)}")
    if not valid_unicode(value):
        raise JobError(f"{path} must be valid Unicode text (it contains a lone surrogate)")
    return value


def _object(value: object, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise JobError(f"{path} must be an object, got {type_name(value)}")
    return value


def _key_list(keys: Iterable[object]) -> str:
    return ", ".join(repr(k) for k in keys)


def _no_unknown(obj: Mapping, allowed: Iterable[str], path: str) -> None:
    """Refuse keys outside ``allowed``, naming them by their full path (``android.foo``)."""
    allowed = tuple(allowed)
    unknown = [k for k in obj if k not in allowed]
    if not unknown:
        return
    names = ", ".join(f"{path}.{k}" if isinstance(k, str) else repr(k) for k in unknown)
    noun = "field" if len(unknown) == 1 else "fields"
    raise JobError(f"unknown {noun} {names}; allowed in {path}: {', '.join(allowed)}")


def _enum(*choices: str) -> Callable[[object, str], str]:
    def check(value: object, path: str) -> str:
        if not isinstance(value, str) or value not in choices:
            shown = _shown_text(value)
            raise JobError(f"{path} must be one of {', '.join(repr(c) for c in choices)}, got {shown}")
        return value

    return check


def _option_string(value: object, path: str) -> str:
    return _string(value, path)


def _digits(value: object, path: str) -> str:
    if not isinstance(value, str) or not _DIGITS_RE.fullmatch(value):
        shown = _shown_text(value)
        raise JobError(f'{path} must be a string of 1 to 10 digits (e.g. "3600"), got {shown}')
    return value


def _duration(value: object, path: str) -> str:
    if not isinstance(value, str) or not _DURATION_RE.fullmatch(value):
        shown = _shown_text(value)
        raise JobError(f'{path} must be a duration in seconds like "3600s" or "1.5s", got {shown}')
    if Decimal(value[:-1]) > MAX_TTL_SECONDS:
        raise JobError(f"{path} is {value}; FCM allows at most {MAX_TTL_SECONDS}s (28 days)")
    return value


def _url(value: object, path: str, pattern: re.Pattern[str], what: str) -> str:
    text = _string(value, path, max_chars=MAX_URL_CHARS)
    if not pattern.fullmatch(text):
        raise JobError(f"{path} must be {what}, got {_shown_text(text)}")
    return text


def _http_url(value: object, path: str) -> str:
    return _url(value, path, _HTTP_URL_RE, "an absolute http:// or https:// URL without spaces")


def _https_url(value: object, path: str) -> str:
    return _url(value, path, _HTTPS_URL_RE, "an absolute https:// URL without spaces")


def _badge(value: object, path: str) -> int:
    # JSON has one number type: 3.0 is the whole number 3 (as in JSON Schema's "integer").
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BADGE:
        shown = type_name(value) if isinstance(value, bool | str) else _shown(value)
        raise JobError(f"{path} must be a whole number from 0 to {MAX_BADGE}, got {shown}")
    return value


# --- android / apns / webpush: an allow-list of FCM v1 fields ----------------------------------

_Spec = dict[str, "Callable[[object, str], Any] | _Spec"]

OPTION_SPECS: dict[str, _Spec] = {
    "android": {
        "priority": _enum("normal", "high"),
        "ttl": _duration,
        "collapse_key": _option_string,
        "notification": {
            "sound": _option_string,
            "channel_id": _option_string,
            "click_action": _option_string,
        },
    },
    "apns": {
        "headers": {
            "apns-priority": _enum("5", "10"),
            "apns-expiration": _digits,
        },
        "payload": {
            "aps": {
                "sound": _option_string,
                "badge": _badge,
                "category": _option_string,
                "thread-id": _option_string,
            },
        },
    },
    "webpush": {
        "headers": {
            "TTL": _digits,
            "Urgency": _enum("very-low", "low", "normal", "high"),
        },
        "fcm_options": {"link": _https_url},
    },
}


def _options(value: object, spec: _Spec, path: str) -> dict:
    obj = _object(value, path)
    _no_unknown(obj, spec, path)
    out: dict = {}
    for key, item in obj.items():
        rule = spec[key]
        sub = f"{path}.{key}"
        out[key] = _options(item, rule, sub) if isinstance(rule, dict) else rule(item, sub)
    return out


# --- the fields ------------------------------------------------------------------------------


def check_user_ids(value: object, path: str = "user_ids") -> tuple[str, ...]:
    """The user ids of a job (1 to 10,000 strings of 1 to 256 characters, no control characters),
    duplicates removed keeping order. Raises JobError naming ``path`` (e.g. ``user_ids[3]``)."""
    if not isinstance(value, list | tuple):
        raise JobError(f"{path} must be a list of 1 to {MAX_USER_IDS} user ids, got {type_name(value)}")
    if not value:
        raise JobError(f"{path} must not be empty")
    if len(value) > MAX_USER_IDS:
        raise JobError(f"{path} has {len(value)} entries; at most {MAX_USER_IDS} are allowed per job")
    seen: dict[str, None] = {}
    for i, uid in enumerate(value):
        if not isinstance(uid, str) or not uid or len(uid) > MAX_USER_ID_CHARS:
            raise JobError(f"{path}[{i}] must be a non-empty string of at most {MAX_USER_ID_CHARS} characters")
        if _CONTROL_RE.search(uid):
            raise JobError(f"{path}[{i}] must not contain control characters")
        if not valid_unicode(uid):
            raise JobError(f"{path}[{i}] must be valid Unicode text (it contains a lone surrogate)")
        seen[uid] = None
    return tuple(seen)


def _notification(value: object, path: str = "notification") -> dict:
    obj = _object(value, path)
    _no_unknown(obj, ("title", "body", "image"), path)
    out: dict = {}
    for key in ("title", "body"):
        if key in obj:
            out[key] = _string(obj[key], f"{path}.{key}", max_chars=None)  # the payload limit applies
    if not out.get("title") and not out.get("body"):
        raise JobError(f"{path} must have a non-empty title or body")
    if "image" in obj:
        out["image"] = _http_url(obj["image"], f"{path}.image")
    return out


def _localized(value: object, notification: dict | None, data: dict | None) -> dict[str, dict]:
    """``localized``: locale -> a whole notification text (title, body, image) for the devices it
    selects; keys made canonical (two equal once canonical are refused); each variant with ``data``
    within FCM's payload limit."""
    obj = _object(value, "localized")
    if notification is None:
        raise JobError("localized needs a notification (for devices no variant selects): not on a data-only job")
    if not obj:
        raise JobError("localized must have at least one variant (leave localized out to send none)")
    if len(obj) > MAX_VARIANTS:
        raise JobError(f"localized has {len(obj)} variants; at most {MAX_VARIANTS} are allowed")
    out: dict[str, dict] = {}
    given: dict[str, str] = {}
    for key, item in obj.items():
        try:
            tag = canonical_locale(key)
        except AttributeRuleError as exc:
            raise JobError(f"localized keys {exc}") from None
        if tag in out:
            raise JobError(f"localized has the locale {tag!r} twice ({given[tag]!r} and {key!r})")
        variant = _notification(item, f"localized.{key}")
        size = payload_size(variant, data)
        if size > MAX_PAYLOAD_BYTES:
            raise JobError(
                f"payload is {size} bytes with localized.{key}; FCM allows at most {MAX_PAYLOAD_BYTES} "
                "(compact JSON of the variant and data)"
            )
        out[tag], given[tag] = variant, key
    return out


def check_data_key(key: object) -> str:
    """A data key: a non-empty string that FCM does not reserve. Raises JobError."""
    if not isinstance(key, str) or not key:
        raise JobError(f"data keys must be non-empty strings, got {key!r}")
    if not valid_unicode(key):
        raise JobError(f"data key {key!r} must be valid Unicode text (it contains a lone surrogate)")
    if key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_PREFIXES):
        raise JobError(f"data key {key!r} is reserved by FCM")
    return key


def _data(value: object) -> dict[str, str]:
    obj = _object(value, "data")
    if not obj:
        raise JobError("data must have at least one key (leave data out to send none)")
    out: dict[str, str] = {}
    for key, item in obj.items():
        check_data_key(key)
        if not isinstance(item, str):
            raise JobError(f"data[{key!r}] must be a string, got {type_name(item)} (FCM data values are strings)")
        out[key] = _string(item, f"data[{key!r}]", max_chars=None)  # the payload limit applies
    return out


def check_platforms(value: object) -> tuple[str, ...]:
    """A non-empty list of distinct platforms, in ``PLATFORMS`` order. Raises JobError."""
    if not isinstance(value, list | tuple) or not value:
        raise JobError(f"platforms must be a non-empty list of {', '.join(repr(p) for p in PLATFORMS)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or item not in PLATFORMS:
            shown = _shown_text(item)
            raise JobError(f"platforms[{i}] must be one of {', '.join(repr(p) for p in PLATFORMS)}, got {shown}")
        if item in value[:i]:
            raise JobError(f"platforms[{i}] repeats {item!r}")
    return tuple(p for p in PLATFORMS if p in value)


def _category(value: object) -> str:
    if not isinstance(value, str) or not _CATEGORY_RE.fullmatch(value):
        raise JobError(f"category must be 1 to 64 characters of a-z 0-9 _ . -, got {_shown_text(value)}")
    return value


def _urgent(value: object) -> bool | None:
    """``urgent``: true, or false (the default, kept as None: a job with ``"urgent": false`` is the same
    job as one without it)."""
    if not isinstance(value, bool):
        raise JobError(f"urgent must be true or false, got {type_name(value)}")
    return True if value else None


def check_analytics_label(value: object, path: str = "analytics_label") -> str:
    """FCM's analytics label: 1 to 50 of A-Z a-z 0-9 - _ . ~ %. Raises JobError naming ``path``."""
    if not isinstance(value, str) or not _ANALYTICS_LABEL_RE.fullmatch(value):
        shown = _shown_text(value)
        raise JobError(f"{path} must be 1 to 50 characters of A-Z a-z 0-9 - _ . ~ % (FCM's rule), got {shown}")
    return value


def _once(value: object) -> str:
    if not isinstance(value, str) or not _ONCE_RE.fullmatch(value):
        shown = _shown_text(value)
        raise JobError(f"once must be 1 to 64 characters of A-Z a-z 0-9 _ . : -, got {shown}")
    return value


def _id(value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        shown = _shown_text(value)
        raise JobError(f"id must be 1 to 32 characters of A-Z a-z 0-9 _ -, got {shown}")
    return value


def _send_at(value: object) -> datetime:
    """An RFC 3339 date-time with an offset, as an aware UTC datetime (fractions beyond microseconds
    round up: never due before the instant asked for)."""
    match = _SEND_AT_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        shown = _shown_text(value)
        example = '"2026-12-24T09:00:00Z"'
        raise JobError(f"send_at must be an RFC 3339 date-time with an offset (e.g. {example}), got {shown}")
    text = value.upper() if isinstance(value, str) else ""
    fraction, offset = match.group(1) or "", match.group(2).upper()
    try:
        hours, minutes = (0, 0) if offset == "Z" else (int(offset[1:3]), int(offset[4:6]))
        if hours > 23 or minutes > 59:
            raise ValueError("offset")
        sign = -1 if offset.startswith("-") else 1
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
        whole = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=zone)
    except ValueError:
        raise JobError(f"send_at is not a valid date-time, got {_shown_text(value)}") from None
    micros = math.ceil(Decimal(fraction or "0") * 1_000_000) if fraction else 0
    return (whole + timedelta(microseconds=micros)).astimezone(UTC)


def _send_at_local(value: object) -> datetime:
    if not isinstance(value, str) or not _SEND_AT_LOCAL_RE.fullmatch(value):
        shown = _shown_text(value)
        raise JobError(f'send_at_local must be a wall-clock time without offset like "2026-12-24T09:00", got {shown}')
    try:
        return datetime.strptime(value if len(value) > 16 else value + ":00", "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise JobError(f"send_at_local is not a valid date and time, got {_shown_text(value)}") from None


def _local_time(obj: Mapping) -> tuple[datetime | None, str | None]:
    """``send_at_local`` and its required ``default_time_zone`` (both or neither)."""
    if "send_at_local" not in obj and "default_time_zone" not in obj:
        return None, None
    if "send_at_local" not in obj:
        raise JobError("default_time_zone belongs to send_at_local, which is missing")
    if "default_time_zone" not in obj:
        raise JobError("default_time_zone is required with send_at_local (for devices registered without one)")
    local = _send_at_local(obj["send_at_local"])
    try:
        zone = check_time_zone(obj["default_time_zone"])
    except AttributeRuleError as exc:
        raise JobError(f"default_time_zone {exc}") from None
    return local, zone


def check_send_at_window(send_at: datetime, now: datetime) -> None:
    """``send``'s rule for send_at: not more than a second before ``now``, at most 30 days after it."""
    if send_at < now - timedelta(seconds=SEND_AT_PAST_SECONDS):
        raise JobError(f"send_at is in the past ({format_time(send_at)} is before now, {format_time(now)})")
    if send_at > now + timedelta(days=MAX_SCHEDULE_DAYS):
        raise JobError(f"send_at is more than {MAX_SCHEDULE_DAYS} days after now ({format_time(send_at)})")


def check_local_window(local: datetime, now: datetime) -> None:
    """``send``'s rule for send_at_local: its latest slot (the last zone to reach that wall-clock time)
    at most 30 days after ``now``, and not more than a second before it (earlier slots are sent at once)."""
    from shared.slots import slots  # (the zone database: loaded only for a local-time send)

    latest = max(slots(local))
    if latest < now - timedelta(seconds=SEND_AT_PAST_SECONDS):
        raise JobError(
            f"send_at_local is in the past in every time zone (the last reached it at {format_time(latest)})"
        )
    if latest > now + timedelta(days=MAX_SCHEDULE_DAYS):
        raise JobError(
            f"send_at_local is more than {MAX_SCHEDULE_DAYS} days after now in some time zone ({format_time(latest)})"
        )


def last_due(job: Job) -> datetime | None:
    """When the whole job is due: its send_at, or its latest slot for send_at_local; None when not scheduled."""
    if job.send_at_local is not None and job.send_at is None:
        from shared.slots import slots

        return max(slots(job.send_at_local))
    return job.send_at


def format_local(local: datetime) -> str:
    """A naive wall-clock time as ``send_at_local`` writes it (``2026-12-24T09:00``, seconds when any)."""
    return local.strftime("%Y-%m-%dT%H:%M" if not local.second else "%Y-%m-%dT%H:%M:%S")


def format_time(moment: datetime) -> str:
    """An aware datetime as RFC 3339 in UTC (``2026-12-24T08:00:00Z``, microseconds when it has any)."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + (f".{utc.microsecond:06d}" if utc.microsecond else "") + "Z"


def epoch_ms(moment: datetime | None) -> int | None:
    """An aware datetime as epoch milliseconds, rounded up (never before the moment); None stays None."""
    if moment is None:
        return None
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta // timedelta(microseconds=1) + 999) // 1000


def payload_size(notification: dict | None, data: dict | None) -> int:
    """Bytes of the compact UTF-8 JSON of ``{"notification": ..., "data": ...}`` (present ones only)."""
    payload = {}
    if notification is not None:
        payload["notification"] = notification
    if data is not None:
        payload["data"] = data
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _target(obj: Mapping) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    """A job's target: exactly one of ``user_ids`` and ``audience`` (which refuses platforms and once)."""
    if "user_ids" in obj and "audience" in obj:
        raise JobError("user_ids and audience cannot both be given: a job names exactly one of them")
    if "user_ids" not in obj and "audience" not in obj:
        raise JobError("user_ids is required (or audience): a job names exactly one of them")
    if "user_ids" in obj:
        return check_user_ids(obj["user_ids"]), None
    for name in ("platforms", "once"):
        if name in obj:
            where = "audience.platforms" if name == "platforms" else "user_ids"
            raise JobError(f"{name} cannot be used with audience (use {where} instead)")
    try:
        return (), audience_rules.parse(obj["audience"], PLATFORMS)
    except audience_rules.AudienceError as exc:
        raise JobError(str(exc)) from None


def _build(obj: Mapping, job_id: str) -> Job:
    user_ids, audience = _target(obj)
    notification = _notification(obj["notification"]) if "notification" in obj else None
    data = _data(obj["data"]) if "data" in obj else None
    if notification is None and data is None:
        raise JobError("a job needs a notification, data, or both")
    platforms = check_platforms(obj["platforms"]) if "platforms" in obj else None
    once = _once(obj["once"]) if "once" in obj else None
    options = {name: _options(obj[name], OPTION_SPECS[name], name) for name in OPTION_SPECS if name in obj}

    if notification is None:
        if "notification" in options.get("android", {}):
            raise JobError(
                "android.notification needs a notification: a data-only message must not carry one "
                "(Android would display it)"
            )
        if options.get("apns", {}).get("headers", {}).get("apns-priority") == "10":
            raise JobError('apns.headers.apns-priority must be "5" for a data-only message (FCM rejects "10")')

    size = payload_size(notification, data)
    if size > MAX_PAYLOAD_BYTES:
        raise JobError(
            f"payload is {size} bytes; FCM allows at most {MAX_PAYLOAD_BYTES} (compact JSON of notification and data)"
        )
    localized = _localized(obj["localized"], notification, data) if "localized" in obj else None
    category = _category(obj["category"]) if "category" in obj else None
    urgent = _urgent(obj["urgent"]) if "urgent" in obj else None
    label = check_analytics_label(obj["analytics_label"]) if "analytics_label" in obj else None
    send_at = _send_at(obj["send_at"]) if "send_at" in obj else None
    send_at_local, default_time_zone = _local_time(obj)
    if audience is not None and send_at_local is not None:  # slots expand user lists only, so far
        raise JobError("send_at_local cannot be combined with audience (yet): give send_at, or user_ids")
    return Job(
        id=job_id,
        user_ids=user_ids,
        notification=notification,
        data=data,
        platforms=platforms,
        once=once,
        android=options.get("android"),
        apns=options.get("apns"),
        webpush=options.get("webpush"),
        localized=localized,
        category=category,
        urgent=urgent,
        analytics_label=label,
        audience=audience,
        send_at=send_at,
        send_at_local=send_at_local,
        default_time_zone=default_time_zone,
    )


# --- public API --------------------------------------------------------------------------------


def parse_request(body: object, now: datetime | None = None) -> Job:
    """Validate ``send``'s request body (decoded JSON) and return a Job with a new id.

    ``version`` and ``id`` are not accepted here (they are fields of the published job).
    Duplicate ``user_ids`` are removed, keeping the first occurrence's order. ``send_at`` must lie
    between a second before ``now`` (the acceptance; default: the clock) and 30 days after it.
    """
    obj = _object(body, "the request body")
    unknown = [k for k in obj if k not in REQUEST_FIELDS]
    if unknown:
        hint = ""
        if "version" in unknown or "id" in unknown:
            hint = " (version and id belong to a job published on the topic, not to send's body)"
        noun = "field" if len(unknown) == 1 else "fields"
        raise JobError(f"unknown {noun}: {_key_list(unknown)}; allowed: {', '.join(REQUEST_FIELDS)}{hint}")
    job = _build(obj, new_id())
    if job.send_at is not None and job.send_at_local is not None:
        raise JobError("send_at and send_at_local: give one (an instant, or a wall-clock time in each device's zone)")
    if job.send_at is not None:
        check_send_at_window(job.send_at, now or datetime.now(UTC))
    if job.send_at_local is not None:
        check_local_window(job.send_at_local, now or datetime.now(UTC))
    return job


def parse_v1(payload: object, default_id: str | None = None) -> Job:
    """Validate a public job (decoded JSON): ``send``'s body plus ``"version"`` (1, or 2 for a job
    using a ``V2_FIELDS`` field) and an optional ``"id"``.

    The id is the payload's ``id``, else ``default_id``, else a new one. Duplicate ``user_ids`` are
    removed, keeping order. Raises JobError for anything else, including another version and a
    version-1 job carrying a version-2 field.
    """
    obj = _object(payload, "the job")
    if "version" not in obj:
        raise JobError('version is required: a job must say "version": 1 (or 2)')
    version = obj["version"]
    if isinstance(version, bool) or version not in VERSIONS or not isinstance(version, int | float):
        shown = json.dumps(version) if isinstance(version, str) and len(version) <= 100 else _shown(version)
        readable = " and ".join(str(v) for v in VERSIONS)
        raise JobError(f"unsupported job version {shown}; this service reads versions {readable}")
    unknown = [k for k in obj if k not in JOB_FIELDS]
    if unknown:
        noun = "field" if len(unknown) == 1 else "fields"
        raise JobError(f"unknown {noun}: {_key_list(unknown)}; allowed: {', '.join(JOB_FIELDS)}")
    newer = [k for k in V2_FIELDS if k in obj]
    if newer and version < LATEST_VERSION:
        raise JobError(
            f'{newer[0]} needs "version": {LATEST_VERSION}; a version-{int(version)} job cannot carry it '
            "(a reader of that version would ignore it)"
        )
    if "id" in obj:
        job_id = _id(obj["id"])
    elif default_id is not None:
        job_id = _id(default_id)
    else:
        job_id = new_id()
    return _build(obj, job_id)


def _encoded(name: str, value: Any) -> Any:
    if name == "send_at_local":
        return format_local(value)
    return format_time(value) if isinstance(value, datetime) else _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_copy(v) for v in value]
    return value


def to_v1(job: Job) -> dict:
    """Encode a Job as a public job (a JSON-ready dict) of the version it needs (:func:`version_of`):
    version 1 unless it uses a ``V2_FIELDS`` field; ``parse_v1(to_v1(job)) == job``."""
    out: dict[str, Any] = {"version": version_of(job), "id": job.id}
    if job.audience is None:
        out["user_ids"] = list(job.user_ids)
    if job.notification is not None:
        out["notification"] = _copy(job.notification)
    if job.data is not None:
        out["data"] = dict(job.data)
    if job.platforms is not None:
        out["platforms"] = list(job.platforms)
    if job.once is not None:
        out["once"] = job.once
    for name in ("android", "apns", "webpush"):
        value = getattr(job, name)
        if value is not None:
            out[name] = _copy(value)
    for name in V2_FIELDS:
        value = getattr(job, name)
        if value is not None:
            out[name] = _encoded(name, value)
    return out


def with_users(job: Job, user_ids: Iterable[str]) -> Job:
    """A copy of ``job`` (same id, so the same collapse identity) for one fan-out part's users.

    The users are validated like ``user_ids`` (1 to 10,000, duplicates removed keeping order).
    """
    if isinstance(user_ids, str | bytes):
        raise JobError("user_ids must be a list of user ids, got a string")
    return replace(job, user_ids=check_user_ids(list(user_ids)))


def part_count(users: int, per_part: int) -> int:
    """How many fan-out parts ``users`` user ids make, ``per_part`` to a part (the last one may be smaller)."""
    return (users + per_part - 1) // per_part
