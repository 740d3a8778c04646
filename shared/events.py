"""Domain events -> notification jobs: the rules file, its validation, and safe rendering. No I/O but reading the file.

Other services publish domain events ("order completed", "comment posted") on Pub/Sub topics. The
``on_event`` function finds each event's type (:func:`event_type`) and id (:func:`event_id`), looks the
type up in the rules loaded by :func:`load_rules`, and turns the event into a v1 job with :func:`render`.

The rules file is JSON::

    {"rules": [
      {"type": "order.completed", "recipients": {"field": "user_id"},
       "title": "Order {order_id} completed", "body": "Your order {order_id} is on its way.",
       "data": {"order_id": "{order_id}", "kind": "order"}},
      {"type": "maintenance.scheduled", "recipients": {"users": ["ops-1", "ops-2"]},
       "title": "Maintenance", "body": "Starts at {starts_at}"}
    ]}

Templates (title, body, data values, once) use ``{field}`` with plain field names only; ``{{`` and
``}}`` are literal braces. They are rendered by the tiny parser below, never by ``str.format``, so an
event can neither reach attributes (``{x.__class__}``) nor have its values expanded again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.jobs import (
    MAX_PAYLOAD_BYTES,
    MAX_USER_IDS,
    ONCE_PATTERN,
    PLATFORMS,
    RESERVED_DATA_KEYS,
    RESERVED_DATA_PREFIXES,
    JobError,
    parse_v1,
    payload_size,
    type_name,
    valid_unicode,
)

__all__ = [
    "FIELD_NAME_PATTERN",
    "TYPE_PATTERN",
    "EventError",
    "NoRecipientsError",
    "Rule",
    "RulesError",
    "check_rules_file",
    "default_rules_path",
    "event_id",
    "event_type",
    "load_rules",
    "notification_id",
    "parse_rules",
    "render",
    "rules_path",
]

TYPE_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
FIELD_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
NOTIFICATION_ID_PREFIX = "ev-"

_TYPE_RE = re.compile(TYPE_PATTERN)
_NAME_RE = re.compile(FIELD_NAME_PATTERN)
_BRACE_RE = re.compile(r"[{}]")
_ONCE_CHARS_RE = re.compile(r"[A-Za-z0-9_.-]*")
_ONCE_RE = re.compile(ONCE_PATTERN)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_USER_ID_CHARS = 256
_MAX_ONCE_CHARS = 64

RULES_FIELDS = ("rules",)
RULE_FIELDS = ("type", "recipients", "title", "body", "data", "platforms", "once")
RECIPIENT_FIELDS = ("field", "users")


class RulesError(ValueError):
    """The rules file is unusable. The message names the rule (its event type) and every problem found."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = list(problems) or [message]


class EventError(ValueError):
    """An event cannot be rendered by its (valid) rule; the message names the event field at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoRecipientsError(EventError):
    """The recipients field holds an empty list: nobody to notify (a caller may count this as ignored)."""


@dataclass(frozen=True)
class Rule:
    """One validated rule. Templates are kept as written; :func:`render` fills them."""

    type: str
    recipients_field: str | None
    recipients: tuple[str, ...] | None
    title: str | None
    body: str | None
    data: dict[str, str]
    platforms: tuple[str, ...] | None
    once: str | None


# --- templates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str


_Part = str | _Field


class _TemplateError(ValueError):
    pass


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _placeholder_problem(inner: str) -> str:
    shown = "{" + _clip(inner) + "}"
    specials = {
        ".": "uses attribute access",
        "[": "uses indexing",
        "!": "uses a conversion (!r/!s/!a)",
        ":": "uses a format spec",
        "{": "has a nested brace",
    }
    found = [(inner.find(c), c) for c in specials if c in inner]
    if found:
        what = specials[min(found)[1]]
    elif inner == "" or inner.isdigit():
        what = "is a positional field"
    else:
        what = "is not a plain field name"
    return (
        f"placeholder {shown} {what}; only plain field names are allowed "
        "(letters, digits and _, not starting with a digit, e.g. {order_id}); write {{ and }} for literal braces"
    )


@lru_cache(maxsize=4096)
def _parse_template(text: str) -> tuple[_Part, ...]:
    """Split a template into literal text and fields. Raises _TemplateError for anything but ``{name}``."""
    parts: list[_Part] = []
    literal: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        match = _BRACE_RE.search(text, i)
        if match is None:
            literal.append(text[i:])
            break
        j = match.start()
        literal.append(text[i:j])
        if text[j] == "{":
            if text.startswith("{", j + 1):
                literal.append("{")
                i = j + 2
                continue
            end = text.find("}", j + 1)
            if end < 0:
                raise _TemplateError(
                    f"has an unclosed '{{' at character {j + 1} ({_clip(text[j:], 20)!r}); "
                    "write {{ for a literal brace"
                )
            inner = text[j + 1 : end]
            if not _NAME_RE.fullmatch(inner):
                raise _TemplateError(_placeholder_problem(inner))
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_Field(inner))
            i = end + 1
        else:
            if text.startswith("}", j + 1):
                literal.append("}")
                i = j + 2
                continue
            raise _TemplateError(f"has a single '}}' at character {j + 1}; write }}}} for a literal brace")
    if literal and "".join(literal):
        parts.append("".join(literal))
    return tuple(p for p in parts if p != "")


def _literal_text(parts: tuple[_Part, ...]) -> str:
    return "".join(p for p in parts if isinstance(p, str))


def _scalar_text(value: object) -> str | None:
    """The text of a string, int, float or bool (without calling any overridden method); else None."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        try:
            return int.__repr__(value)
        except ValueError:  # more digits than Python will print
            return None
    if isinstance(value, float):
        return float.__repr__(value)
    return None


def _fill(parts: tuple[_Part, ...], data: Mapping, where: str, rule_type: str) -> str:
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        name = part.name
        if name not in data:
            raise EventError(f"event field {name!r} is missing (needed by {where} of rule {rule_type!r})")
        value = data[name]
        text = _scalar_text(value)
        if text is None:
            raise EventError(
                f"event field {name!r} is {type_name(value)}; {where} of rule {rule_type!r} "
                "needs a string, number or boolean there"
            )
        out.append(text)
    return "".join(out)


# --- loading and validation --------------------------------------------------------------------


def _unknown(obj: Mapping, allowed: tuple[str, ...], path: str) -> str | None:
    unknown = [k for k in obj if k not in allowed]
    if not unknown:
        return None
    noun = "key" if len(unknown) == 1 else "keys"
    names = ", ".join(repr(k) for k in unknown)
    return f"unknown {noun} {names} in {path}; allowed: {', '.join(allowed)}"


def _check_template(value: object, where: str, problems: list[str]) -> tuple[_Part, ...] | None:
    if not isinstance(value, str):
        problems.append(f"{where} must be a string template, got {type_name(value)}")
        return None
    try:
        return _parse_template(value)
    except _TemplateError as exc:
        problems.append(f"{where} {exc}")
        return None


def _check_recipients(value: object, problems: list[str]) -> tuple[str | None, tuple[str, ...] | None]:
    if not isinstance(value, Mapping):
        problems.append(
            'recipients must be an object: {"field": "<event field with the user id(s)>"} or '
            f'{{"users": ["<user id>", ...]}}, got {type_name(value)}'
        )
        return None, None
    unknown = _unknown(value, RECIPIENT_FIELDS, "recipients")
    if unknown:
        problems.append(unknown)
        return None, None
    if ("field" in value) == ("users" in value):
        problems.append('recipients must have exactly one of "field" or "users"')
        return None, None
    if "field" in value:
        field = value["field"]
        if not isinstance(field, str) or not field:
            problems.append(
                f"recipients.field must be a non-empty string (an event field name), got {type_name(field)}"
            )
            return None, None
        return field, None
    users = value["users"]
    if not isinstance(users, list) or not users:
        problems.append("recipients.users must be a non-empty list of user ids")
        return None, None
    if len(users) > MAX_USER_IDS:
        problems.append(f"recipients.users has {len(users)} entries; at most {MAX_USER_IDS} are allowed")
        return None, None
    out: dict[str, None] = {}
    for i, uid in enumerate(users):
        if (
            not isinstance(uid, str)
            or not uid
            or len(uid) > _MAX_USER_ID_CHARS
            or _CONTROL_RE.search(uid)
            or not valid_unicode(uid)
        ):
            problems.append(
                f"recipients.users[{i}] must be a non-empty string of at most {_MAX_USER_ID_CHARS} characters "
                "without control characters"
            )
            return None, None
        out[uid] = None
    return None, tuple(out)


def _check_data(value: object, problems: list[str]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        problems.append(f"data must be an object of string templates, got {type_name(value)}")
        return {}
    if not value:
        problems.append("data must have at least one key (leave data out to send none)")
        return {}
    out: dict[str, str] = {}
    for key, item in value.items():
        if not key or not valid_unicode(key):
            problems.append(f"data key {key!r} must be a non-empty string")
            continue
        if key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_PREFIXES):
            problems.append(f"data key {key!r} is reserved by FCM")
            continue
        if _check_template(item, f"data[{key!r}]", problems) is not None:
            out[key] = item
    return out


def _check_platforms(value: object, problems: list[str]) -> tuple[str, ...] | None:
    allowed = ", ".join(repr(p) for p in PLATFORMS)
    if not isinstance(value, list) or not value:
        problems.append(f"platforms must be a non-empty list of {allowed}")
        return None
    for i, item in enumerate(value):
        if not isinstance(item, str) or item not in PLATFORMS:
            shown = repr(_clip(item)) if isinstance(item, str) else type_name(item)
            problems.append(f"platforms[{i}] must be one of {allowed}, got {shown}")
            return None
        if item in value[:i]:
            problems.append(f"platforms[{i}] repeats {item!r}")
            return None
    return tuple(p for p in PLATFORMS if p in value)


def _check_once(value: object, problems: list[str]) -> str | None:
    parts = _check_template(value, "once", problems)
    if parts is None:
        return None
    assert isinstance(value, str)
    literal = _literal_text(parts)
    if not _ONCE_CHARS_RE.fullmatch(literal):
        problems.append(f"once {value!r} may only contain A-Z a-z 0-9 _ . : - outside its placeholders")
        return None
    if not value or len(literal) > _MAX_ONCE_CHARS:
        problems.append(f"once must render to 1 to {_MAX_ONCE_CHARS} characters; {value!r} cannot")
        return None
    return value


def _rule_name(obj: object, index: int) -> str:
    if isinstance(obj, Mapping):
        t = obj.get("type")
        if isinstance(t, str) and t:
            return f"rule {_clip(t)!r}"
    return f"rules[{index}]"


def _check_rule(obj: object, index: int) -> tuple[Rule | None, list[str]]:
    """Validate one rule; return it (or None) and its problems, each prefixed with the rule's name."""
    name = _rule_name(obj, index)
    problems: list[str] = []
    if not isinstance(obj, Mapping):
        return None, [f"{name} must be an object, got {type_name(obj)}"]
    unknown = _unknown(obj, RULE_FIELDS, "the rule")
    if unknown:
        problems.append(unknown)

    rule_type = obj.get("type")
    if "type" not in obj:
        problems.append("type is required")
    elif not isinstance(rule_type, str) or not _TYPE_RE.fullmatch(rule_type):
        shown = repr(_clip(rule_type)) if isinstance(rule_type, str) else type_name(rule_type)
        problems.append(f"type must be 1 to 128 characters of A-Z a-z 0-9 _ . : -, got {shown}")

    field, users = None, None
    if "recipients" not in obj:
        problems.append('recipients is required: {"field": NAME} or {"users": [...]}')
    else:
        field, users = _check_recipients(obj["recipients"], problems)

    title = obj.get("title")
    body = obj.get("body")
    title_parts = _check_template(title, "title", problems) if "title" in obj else None
    body_parts = _check_template(body, "body", problems) if "body" in obj else None
    if not (isinstance(title, str) and title) and not (isinstance(body, str) and body):
        problems.append("the rule needs a non-empty title or body")

    data = _check_data(obj["data"], problems) if "data" in obj else {}
    platforms = _check_platforms(obj["platforms"], problems) if "platforms" in obj else None
    once = _check_once(obj["once"], problems) if "once" in obj else None

    if not problems:
        notification = {}
        if title_parts is not None:
            notification["title"] = _literal_text(title_parts)
        if body_parts is not None:
            notification["body"] = _literal_text(body_parts)
        literal_data = {k: _literal_text(_parse_template(v)) for k, v in data.items()} or None
        size = payload_size(notification, literal_data)
        if size > MAX_PAYLOAD_BYTES:
            problems.append(f"its fixed text alone is {size} bytes of payload; FCM allows at most {MAX_PAYLOAD_BYTES}")

    if problems:
        return None, [f"{name}: {p}" for p in problems]
    assert isinstance(rule_type, str)
    return (
        Rule(
            type=rule_type,
            recipients_field=field,
            recipients=users,
            title=title,
            body=body,
            data=data,
            platforms=platforms,
            once=once,
        ),
        [],
    )


def _collect(obj: object) -> tuple[dict[str, Rule], list[str]]:
    if not isinstance(obj, Mapping):
        return {}, [f'the rules file must be a JSON object {{"rules": [...]}}, got {type_name(obj)}']
    problems: list[str] = []
    unknown = _unknown(obj, RULES_FIELDS, "the rules file")
    if unknown:
        problems.append(unknown)
    if "rules" not in obj:
        problems.append('the rules file must have a "rules" list')
        return {}, problems
    items = obj["rules"]
    if not isinstance(items, list):
        problems.append(f'"rules" must be a list of rules, got {type_name(items)}')
        return {}, problems
    rules: dict[str, Rule] = {}
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        rule, rule_problems = _check_rule(item, index)
        problems.extend(rule_problems)
        t = item.get("type") if isinstance(item, Mapping) else None
        if isinstance(t, str):
            if t in first_index:
                problems.append(
                    f"rule {_clip(t)!r}: duplicate type (rules[{first_index[t]}] and rules[{index}] both have it)"
                )
                continue
            first_index[t] = index
        if rule is not None:
            rules[rule.type] = rule
    return rules, problems


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_clip(key)!r} in one JSON object")
        out[key] = value
    return out


def _read(path: str | Path) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"cannot read the rules file {str(path)!r}: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError; so is a duplicate key
        raise RulesError(f"the rules file {str(path)!r} is not valid JSON: {exc}") from None


def parse_rules(obj: object, source: str = "the rules") -> dict[str, Rule]:
    """Validate decoded rules-file JSON and return the rules by event type. Raises RulesError."""
    rules, problems = _collect(obj)
    if problems:
        if len(problems) == 1:
            message = f"{source}: {problems[0]}"
        else:
            message = f"{source}: {len(problems)} problems: " + "; ".join(problems)
        raise RulesError(message, problems)
    return rules


def load_rules(path: str | Path) -> dict[str, Rule]:
    """Read, validate and return the rules file's rules by event type. Raises RulesError."""
    return parse_rules(_read(path), source=str(path))


def check_rules_file(path: str | Path) -> list[str]:
    """Every problem with a rules file, as human-readable lines (empty when the file is fine)."""
    try:
        obj = _read(path)
    except RulesError as exc:
        return [exc.message]
    return _collect(obj)[1]


def default_rules_path() -> Path:
    """The example rules shipped with the code (used locally when EVENT_RULES is unset)."""
    return Path(__file__).resolve().parent.parent / "infra" / "rules.example.json"


def rules_path(s: Settings) -> Path:
    """EVENT_RULES, else the example file; in the cloud (K_SERVICE set) EVENT_RULES is required."""
    if s.event_rules:
        return Path(s.event_rules)
    if s.in_cloud:
        raise RulesError(
            f"EVENT_RULES is not set while running in the cloud (K_SERVICE={s.k_service}): set it to the "
            "rules file deployed with the function (the example rules are not used in the cloud)"
        )
    return default_rules_path()


# --- events ------------------------------------------------------------------------------------


def event_type(data: Mapping, attributes: Mapping[str, str]) -> str | None:
    """The event's type: the message attribute ``type``, else the data's ``type``; None if neither is a string."""
    value = attributes.get("type") if isinstance(attributes, Mapping) else None
    if isinstance(value, str) and value:
        return value
    value = data.get("type") if isinstance(data, Mapping) else None
    if isinstance(value, str) and value:
        return value
    return None


def event_id(data: Mapping, attributes: Mapping[str, str], message_id: str) -> str:
    """The event's id: attribute ``event_id``, else the data's ``id`` (string or whole number), else the message id."""
    value = attributes.get("event_id") if isinstance(attributes, Mapping) else None
    if isinstance(value, str) and value:
        return value
    value = data.get("id") if isinstance(data, Mapping) else None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        text = _scalar_text(value)
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


def render(rule: Rule, data: Mapping, *, job_id: str | None = None) -> dict:
    """The v1 job for one event: templates filled from ``data``, validated by ``jobs.parse_v1``.

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
        notification["title"] = _fill(_parse_template(rule.title), data, "the title", rule.type)
    if rule.body is not None:
        notification["body"] = _fill(_parse_template(rule.body), data, "the body", rule.type)
    job["notification"] = notification
    if rule.data:
        job["data"] = {k: _fill(_parse_template(v), data, f"data[{k!r}]", rule.type) for k, v in rule.data.items()}
    if rule.platforms is not None:
        job["platforms"] = list(rule.platforms)
    if rule.once is not None:
        once_parts = _parse_template(rule.once)
        once = _fill(once_parts, data, "once", rule.type)
        if not _ONCE_RE.fullmatch(once):
            fields = ", ".join(repr(p.name) for p in once_parts if isinstance(p, _Field))
            raise EventError(
                f"once of rule {rule.type!r} rendered to {_clip(once)!r}, not 1 to {_MAX_ONCE_CHARS} characters of "
                f"A-Z a-z 0-9 _ . : - (check event field(s) {fields})"
            )
        job["once"] = once
    try:
        parse_v1(job)
    except JobError as exc:
        where = f"rule {rule.type!r}"
        if exc.message.startswith("user_ids") and rule.recipients_field is not None:
            where += f", recipients from event field {rule.recipients_field!r}"
        raise EventError(f"the job rendered by {where} is invalid: {exc.message}") from None
    return job


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.events [PATH]``: print the rules file's problems; exit 1 if there are any."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else default_rules_path()
    problems = check_rules_file(path)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{path}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
