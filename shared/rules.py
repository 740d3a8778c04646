"""The domain-event rules file: read it, validate it, and name every problem. No I/O but reading the file.

The rules file is JSON::

    {"rules": [
      {"type": "order.completed", "recipients": {"field": "user_id"},
       "title": "Order {order_id} completed", "body": "Your order {order_id} is on its way.",
       "data": {"order_id": "{order_id}", "kind": "order"}},
      {"type": "maintenance.scheduled", "recipients": {"users": ["ops-1", "ops-2"]},
       "title": "Maintenance", "body": "Starts at {starts_at}"}
    ]}

Title, body, data values and once are templates (``shared/templates.py``); ``analytics_label`` is a
literal (FCM's rule: 1 to 50 of A-Z a-z 0-9 - _ . ~ %) given to every job of the rule, and so are
``category`` (what users may mute) and ``urgent`` (true: past the daily cap and quiet hours); each of
the three makes the rule's jobs version 2. What a job allows
(user ids, platforms, data keys, the payload size) is checked by the job's own rules
(``shared/jobs.py``), so a rule that loads renders jobs that ``send`` would accept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import jobs, templates
from shared.config import Settings
from shared.jobs import JobError, type_name
from shared.templates import clip

__all__ = [
    "TYPE_PATTERN",
    "Rule",
    "RulesError",
    "check_rules_file",
    "default_rules_path",
    "load_rules",
    "parse_rules",
    "rules_path",
]

TYPE_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

_TYPE_RE = re.compile(TYPE_PATTERN)
_ONCE_CHARS_RE = re.compile(r"[A-Za-z0-9_.-]*")

RULES_FIELDS = ("rules",)
RULE_FIELDS = (
    "type",
    "recipients",
    "title",
    "body",
    "data",
    "platforms",
    "once",
    "analytics_label",
    "category",
    "urgent",
)
RECIPIENT_FIELDS = ("field", "users")


class RulesError(ValueError):
    """The rules file is unusable. The message names the rule (its event type) and every problem found."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = list(problems) or [message]


@dataclass(frozen=True)
class Rule:
    """One validated rule. Templates are kept as written; ``events.render`` fills them."""

    type: str
    recipients_field: str | None
    recipients: tuple[str, ...] | None
    title: str | None
    body: str | None
    data: dict[str, str]
    platforms: tuple[str, ...] | None
    once: str | None
    category: str | None = None  # the job's category (fixed text, not a template)
    urgent: bool = False
    analytics_label: str | None = None  # a literal (FCM's rule), never a template


# --- one rule's fields -------------------------------------------------------------------------


def _unknown(obj: Mapping, allowed: tuple[str, ...], path: str) -> str | None:
    unknown = [k for k in obj if k not in allowed]
    if not unknown:
        return None
    noun = "key" if len(unknown) == 1 else "keys"
    names = ", ".join(repr(k) for k in unknown)
    return f"unknown {noun} {names} in {path}; allowed: {', '.join(allowed)}"


def _check_template(value: object, where: str, problems: list[str]) -> tuple[templates.Part, ...] | None:
    if not isinstance(value, str):
        problems.append(f"{where} must be a string template, got {type_name(value)}")
        return None
    try:
        return templates.parse(value)
    except templates.TemplateError as exc:
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
    try:
        return None, jobs.check_user_ids(users, "recipients.users")
    except JobError as exc:
        problems.append(exc.message)
        return None, None


def _check_data(value: object, problems: list[str]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        problems.append(f"data must be an object of string templates, got {type_name(value)}")
        return {}
    if not value:
        problems.append("data must have at least one key (leave data out to send none)")
        return {}
    out: dict[str, str] = {}
    for key, item in value.items():
        try:
            jobs.check_data_key(key)
        except JobError as exc:
            problems.append(exc.message)
            continue
        if _check_template(item, f"data[{key!r}]", problems) is not None:
            out[key] = item
    return out


def _check_platforms(value: object, problems: list[str]) -> tuple[str, ...] | None:
    try:
        return jobs.check_platforms(value)
    except JobError as exc:
        problems.append(exc.message)
        return None


def _check_once(value: object, problems: list[str]) -> str | None:
    parts = _check_template(value, "once", problems)
    if parts is None:
        return None
    assert isinstance(value, str)
    literal = templates.literal_text(parts)
    if not _ONCE_CHARS_RE.fullmatch(literal):
        problems.append(f"once {value!r} may only contain A-Z a-z 0-9 _ . - outside its placeholders")
        return None
    if not value or len(literal) > jobs.MAX_ONCE_CHARS:
        problems.append(f"once must render to 1 to {jobs.MAX_ONCE_CHARS} characters; {value!r} cannot")
        return None
    return value


def _check_job_field(obj: Mapping, name: str, problems: list[str]) -> Any:
    """A field the rule copies into its jobs as it is (``category``, ``urgent``), checked by the job's rule."""
    if name not in obj:
        return None
    try:
        jobs.parse_v1({"version": 2, "user_ids": ["u"], "notification": {"title": "t"}, name: obj[name]})
    except JobError as exc:
        problems.append(exc.message)
        return None
    return obj[name]


def _check_analytics_label(value: object, problems: list[str]) -> str | None:
    """A literal label (jobs.check_analytics_label): FCM groups by it, so it is not filled from events."""
    try:
        return jobs.check_analytics_label(value)
    except JobError as exc:
        problems.append(f"{exc.message} (a literal: no placeholders)")
        return None


def _check_type(obj: Mapping, problems: list[str]) -> None:
    rule_type = obj.get("type")
    if "type" not in obj:
        problems.append("type is required")
    elif not isinstance(rule_type, str) or not _TYPE_RE.fullmatch(rule_type):
        shown = repr(clip(rule_type)) if isinstance(rule_type, str) else type_name(rule_type)
        problems.append(f"type must be 1 to 128 characters of A-Z a-z 0-9 _ . : -, got {shown}")


def _check_fixed_size(title: str | None, body: str | None, data: dict[str, str], problems: list[str]) -> None:
    """The payload of the rule's fixed text alone (every field empty) must fit FCM's limit."""
    notification = {}
    if title is not None:
        notification["title"] = templates.literal_text(templates.parse(title))
    if body is not None:
        notification["body"] = templates.literal_text(templates.parse(body))
    literal_data = {k: templates.literal_text(templates.parse(v)) for k, v in data.items()} or None
    size = jobs.payload_size(notification, literal_data)
    if size > jobs.MAX_PAYLOAD_BYTES:
        problems.append(f"its fixed text alone is {size} bytes of payload; FCM allows at most {jobs.MAX_PAYLOAD_BYTES}")


# --- a rule, the file --------------------------------------------------------------------------


def _rule_name(obj: object, index: int) -> str:
    if isinstance(obj, Mapping):
        t = obj.get("type")
        if isinstance(t, str) and t:
            return f"rule {clip(t)!r}"
    return f"rules[{index}]"


def _check_rule(obj: object, index: int) -> tuple[Rule | None, list[str]]:
    """Validate one rule; return it (or None) and its problems, each prefixed with the rule's name."""
    name = _rule_name(obj, index)
    if not isinstance(obj, Mapping):
        return None, [f"{name} must be an object, got {type_name(obj)}"]
    problems: list[str] = []
    unknown = _unknown(obj, RULE_FIELDS, "the rule")
    if unknown:
        problems.append(unknown)
    _check_type(obj, problems)
    field, users = None, None
    if "recipients" not in obj:
        problems.append('recipients is required: {"field": NAME} or {"users": [...]}')
    else:
        field, users = _check_recipients(obj["recipients"], problems)
    title, body = obj.get("title"), obj.get("body")
    if "title" in obj:
        _check_template(title, "title", problems)
    if "body" in obj:
        _check_template(body, "body", problems)
    if not (isinstance(title, str) and title) and not (isinstance(body, str) and body):
        problems.append("the rule needs a non-empty title or body")
    data = _check_data(obj["data"], problems) if "data" in obj else {}
    platforms = _check_platforms(obj["platforms"], problems) if "platforms" in obj else None
    once = _check_once(obj["once"], problems) if "once" in obj else None
    category, urgent = _check_job_field(obj, "category", problems), _check_job_field(obj, "urgent", problems)
    label = _check_analytics_label(obj["analytics_label"], problems) if "analytics_label" in obj else None
    if not problems:
        _check_fixed_size(title, body, data, problems)
    if problems:
        return None, [f"{name}: {p}" for p in problems]
    rule = Rule(
        type=obj["type"],
        recipients_field=field,
        recipients=users,
        title=title,
        body=body,
        data=data,
        platforms=platforms,
        once=once,
        category=category,
        urgent=bool(urgent),
        analytics_label=label,
    )
    return rule, []


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
                    f"rule {clip(t)!r}: duplicate type (rules[{first_index[t]}] and rules[{index}] both have it)"
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
            raise ValueError(f"duplicate key {clip(key)!r} in one JSON object")
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
