"""Domain events: safe templates (shared/templates.py), the rules file and its validation (shared/rules.py), and
rendering an event into a v1 job (shared/events.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import config
from shared import templates as tpl
from shared.events import EventError, NoRecipientsError, event_id, event_type, notification_id, render
from shared.jobs import ID_PATTERN, MAX_USER_IDS, JobError, parse_v1
from shared.rules import Rule, RulesError, check_rules_file, default_rules_path, load_rules, parse_rules, rules_path

EXAMPLE = Path(__file__).resolve().parents[1] / "infra" / "rules.example.json"


def rule(**fields: object) -> dict:
    """A valid rule dict with ``fields`` replaced (a value of ... removes the field)."""
    base: dict = {"type": "order.completed", "recipients": {"field": "user_id"}, "title": "Order {order_id}"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def one(**fields: object) -> Rule:
    rules = parse_rules({"rules": [rule(**fields)]})
    return next(iter(rules.values()))


def refused(*rules: dict, **top: object) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules({"rules": list(rules), **top})
    return str(info.value)


def write(tmp_path: Path, content: object | str) -> Path:
    path = tmp_path / "rules.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# --- loading -----------------------------------------------------------------------------------


def test_the_example_file_loads() -> None:
    assert default_rules_path() == EXAMPLE
    rules = load_rules(EXAMPLE)
    assert list(rules) == ["order.completed", "user.signed_up", "comment.posted", "maintenance.scheduled"]
    order = rules["order.completed"]
    assert order.recipients_field == "user_id" and order.recipients is None
    assert order.title == "Order {order_id} completed"
    assert order.data == {"order_id": "{order_id}", "kind": "order"}
    assert rules["user.signed_up"].once == "welcome"
    assert rules["comment.posted"].platforms == ("android", "ios")
    assert rules["maintenance.scheduled"].recipients == ("ops-1", "ops-2")
    assert rules["maintenance.scheduled"].recipients_field is None
    assert check_rules_file(EXAMPLE) == []


def test_load_rules_accepts_str_paths() -> None:
    assert set(load_rules(str(EXAMPLE))) == set(load_rules(EXAMPLE))


def test_unreadable_and_bad_json_files(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.json")
    with pytest.raises(RulesError, match="not valid JSON"):
        load_rules(write(tmp_path, "{not json"))
    with pytest.raises(RulesError, match="duplicate key 'title'"):
        load_rules(
            write(tmp_path, '{"rules": [{"type": "a", "recipients": {"users": ["u"]}, "title": "x", "title": "y"}]}')
        )
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "bin.json")
    assert check_rules_file(tmp_path / "missing.json")[0].startswith("cannot read")


def test_the_file_must_be_an_object_with_a_rules_list(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="JSON object"):
        load_rules(write(tmp_path, []))
    with pytest.raises(RulesError, match='"rules" list'):
        load_rules(write(tmp_path, {}))
    with pytest.raises(RulesError, match='"rules" must be a list'):
        load_rules(write(tmp_path, {"rules": {}}))
    assert "unknown key 'extra' in the rules file" in refused(rule(), extra=1)
    assert parse_rules({"rules": []}) == {}


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("Order {order.id}", "{order.id} uses attribute access"),
        ("Order {x.__class__}", "{x.__class__} uses attribute access"),
        ("First {items[0]}", "{items[0]} uses indexing"),
        ("Value {x!r}", "{x!r} uses a conversion"),
        ("Value {x:>10}", "{x:>10} uses a format spec"),
        ("Value {x:{y}}", "{x:{y} uses a format spec"),
        ("Value {}", "{} is a positional field"),
        ("Value {0}", "{0} is a positional field"),
        ("Value {1a}", "{1a} is not a plain field name"),
        ("Value {a-b}", "{a-b} is not a plain field name"),
        ("Value { x }", "{ x } is not a plain field name"),
        ("Value {a", "unclosed '{'"),
        ("Value a}", "single '}'"),
    ],
)
@pytest.mark.parametrize("where", ["title", "body", "once", "data"])
def test_bad_placeholders_are_refused_naming_the_rule_and_placeholder(where: str, template: str, problem: str) -> None:
    if where == "data":
        message = refused(rule(data={"ref": template}))
        assert "data['ref']" in message
    else:
        message = refused(rule(**{where: template}))
        assert f"{where} " in message
    assert "rule 'order.completed'" in message
    assert problem in message


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "rules": [
                rule(title="{a.b}", body="{c[0]}"),
                rule(type="other", platforms=["desktop"]),
            ]
        },
    )
    problems = check_rules_file(path)
    assert len(problems) == 3
    assert problems[0].startswith("rule 'order.completed': title") and "{a.b}" in problems[0]
    assert problems[1].startswith("rule 'order.completed': body") and "{c[0]}" in problems[1]
    assert problems[2].startswith("rule 'other': platforms[0]") and "'desktop'" in problems[2]
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.problems == problems
    assert "3 problems" in str(info.value)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"priority": "high"}, "unknown key 'priority' in the rule"),
        ({"recipients": {"field": "u", "extra": 1}}, "unknown key 'extra' in recipients"),
        ({"recipients": {"field": "u", "users": ["a"]}}, 'exactly one of "field" or "users"'),
        ({"recipients": {}}, 'exactly one of "field" or "users"'),
        ({"recipients": "user_id"}, "recipients must be an object"),
        ({"recipients": ...}, "recipients is required"),
        ({"recipients": {"field": ""}}, "recipients.field must be a non-empty string"),
        ({"recipients": {"users": []}}, "recipients.users must be a non-empty list"),
        ({"recipients": {"users": ["ok", 3]}}, "recipients.users[1]"),
        ({"title": ..., "body": ...}, "needs a non-empty title or body"),
        ({"title": "", "body": ...}, "needs a non-empty title or body"),
        ({"title": 5}, "title must be a string template"),
        ({"platforms": ["android", "desktop"]}, "platforms[1] must be one of 'android', 'ios', 'web', got 'desktop'"),
        ({"platforms": []}, "platforms must be a non-empty list"),
        ({"platforms": ["ios", "ios"]}, "platforms[1] repeats 'ios'"),
        ({"data": {}}, "data must have at least one key"),
        ({"data": {"k": 1}}, "data['k'] must be a string template"),
        ({"data": {"from": "x"}}, "data key 'from' is reserved"),
        ({"data": {"google.x": "x"}}, "data key 'google.x' is reserved"),
        ({"once": "welcome back"}, "once 'welcome back' may only contain"),
        ({"once": ""}, "once must render to 1 to 64"),
        ({"once": "x" * 65}, "once must render to 1 to 64"),
        ({"title": "x" * 5000}, "bytes of payload"),
        ({"category": "Marketing"}, "category must be 1 to 64 characters of a-z 0-9 _ . -"),
        ({"category": "{kind}"}, "category must be 1 to 64 characters"),
        ({"urgent": "true"}, "urgent must be true or false, got a string"),
    ],
)
def test_bad_rules_are_refused_naming_the_rule_and_problem(fields: dict, problem: str) -> None:
    message = refused(rule(**fields))
    assert "rule 'order.completed'" in message
    assert problem in message


@pytest.mark.parametrize(
    ("rule_type", "problem"),
    [
        ("has space", "type must be 1 to 128 characters"),
        ("", "type must be 1 to 128 characters"),
        ("x" * 129, "type must be 1 to 128 characters"),
        (7, "type must be 1 to 128 characters"),
    ],
)
def test_bad_types_are_refused(rule_type: object, problem: str) -> None:
    assert problem in refused(rule(type=rule_type))


def test_a_rule_without_a_type_is_named_by_position() -> None:
    message = refused(rule(), rule(type=..., title="x"))
    assert "rules[1]: type is required" in message
    assert "rules[1] must be an object, got a string" in refused(rule(), "nope")


def test_duplicate_types_are_refused() -> None:
    message = refused(rule(), rule(title="again"))
    assert "rule 'order.completed': duplicate type (rules[0] and rules[1] both have it)" in message


def test_valid_variations_load() -> None:
    r = one(title="{{literal}} {a}", body=..., once="welcome-{campaign}", data={"k": "{a}-{{b}}"})
    assert r.body is None and r.once == "welcome-{campaign}"
    assert one(title=..., body="only body").title is None
    assert one(platforms=["web", "android"]).platforms == ("android", "web")
    assert one(recipients={"users": ["a", "b", "a"]}).recipients == ("a", "b")
    assert one(type="billing:invoice_paid-v2").type == "billing:invoice_paid-v2"


# --- rules_path --------------------------------------------------------------------------------


def test_rules_path_uses_event_rules_else_the_example_locally() -> None:
    assert rules_path(config.load({})) == EXAMPLE
    assert rules_path(config.load({"EVENT_RULES": "/etc/rules.json"})) == Path("/etc/rules.json")
    assert rules_path(config.load({"EVENT_RULES": "/etc/rules.json", "K_SERVICE": "on_event"})) == Path(
        "/etc/rules.json"
    )


def test_rules_path_requires_event_rules_in_the_cloud() -> None:
    with pytest.raises(RulesError, match="EVENT_RULES"):
        rules_path(config.load({"K_SERVICE": "on_event"}))


# --- event type and id -------------------------------------------------------------------------


def test_event_type_prefers_the_attribute() -> None:
    assert event_type({"type": "from.data"}, {"type": "from.attr"}) == "from.attr"
    assert event_type({"type": "from.data"}, {}) == "from.data"
    assert event_type({"type": "from.data"}, {"type": ""}) == "from.data"
    assert event_type({}, {}) is None
    assert event_type({"type": 5}, {}) is None
    assert event_type([], {}) is None  # type: ignore[arg-type]


def test_event_id_precedence() -> None:
    assert event_id({"id": "d"}, {"event_id": "a"}, "m") == "a"
    assert event_id({"id": "d"}, {}, "m") == "d"
    assert event_id({"id": 42}, {}, "m") == "42"
    assert event_id({"id": True}, {}, "m") == "m"
    assert event_id({"id": 1.5}, {}, "m") == "m"
    assert event_id({"id": ""}, {"event_id": ""}, "m") == "m"
    assert event_id({}, {}, "m") == "m"


def test_notification_id_is_deterministic_valid_and_type_specific() -> None:
    a = notification_id("order.completed", "1001")
    assert a == notification_id("order.completed", "1001")
    assert re.fullmatch(ID_PATTERN, a) and len(a) == 32 and a.startswith("ev-")
    assert a != notification_id("order.shipped", "1001")
    assert a != notification_id("order.completed", "1002")
    # a type cannot contain the "\n" separator (TYPE_PATTERN), so type + "\n" + id is unambiguous
    assert notification_id("a.b", "c") != notification_id("a", "b.c")
    assert notification_id("a", "1") != notification_id("a", "01")
    assert re.fullmatch(ID_PATTERN, notification_id("t", "\ud800 lone surrogate"))


# --- rendering ---------------------------------------------------------------------------------


def test_render_fills_placeholders_and_literal_braces() -> None:
    r = one(
        title="Order {order_id} {{done}}",
        body="{n} items, {price} EUR, gift: {gift}",
        data={"order_id": "{order_id}", "kind": "order", "raw": "}}{{"},
        once="order-{order_id}",
        platforms=["ios"],
    )
    job = render(r, {"user_id": "u1", "order_id": 1001, "n": 3, "price": 9.5, "gift": False})
    assert job == {
        "version": 1,
        "user_ids": ["u1"],
        "notification": {"title": "Order 1001 {done}", "body": "3 items, 9.5 EUR, gift: False"},
        "data": {"order_id": "1001", "kind": "order", "raw": "}{"},
        "platforms": ["ios"],
        "once": "order-1001",
    }
    parse_v1(job)


def test_render_the_example_rules() -> None:
    rules = load_rules(EXAMPLE)
    job = render(rules["order.completed"], {"user_id": "u1", "order_id": "A-7"}, job_id=notification_id("o", "1"))
    assert job["id"] == notification_id("o", "1")
    assert job["notification"] == {"title": "Order A-7 completed", "body": "Your order A-7 is on its way."}
    assert parse_v1(job).id == job["id"]
    welcome = render(rules["user.signed_up"], {"user_id": "u1", "name": "Ana"})
    assert welcome["once"] == "welcome" and welcome["notification"]["body"] == "Hi Ana, welcome aboard."
    comment = render(rules["comment.posted"], {"subscriber_ids": ["s1", "s2", "s1"], "author": "Bo"})
    assert comment["user_ids"] == ["s1", "s2", "s1"]  # parse_v1 removes the duplicate later
    assert comment["platforms"] == ["android", "ios"]
    ops = render(rules["maintenance.scheduled"], {"starts_at": "02:00", "user_id": "ignored"})
    assert ops["user_ids"] == ["ops-1", "ops-2"]
    assert ops["notification"]["body"] == "Starts at 02:00"


def test_a_missing_field_names_it() -> None:
    r = one(body="Hi {name}")
    with pytest.raises(EventError, match="event field 'name' is missing"):
        render(r, {"user_id": "u1", "order_id": "1"})
    with pytest.raises(EventError, match=r"event field 'user_id'.* is missing"):
        render(r, {"order_id": "1", "name": "x"})


@pytest.mark.parametrize("value", [{"id": 1}, [1, 2], None, b"bytes", object()])
def test_a_non_scalar_value_is_an_event_error_naming_the_field(value: object) -> None:
    with pytest.raises(EventError, match="event field 'order_id' is"):
        render(one(), {"user_id": "u1", "order_id": value})


def test_values_that_look_like_placeholders_are_not_expanded() -> None:
    r = one(title="{a} {b}", data={"k": "{a}"})
    job = render(r, {"user_id": "u1", "a": "{b}", "b": "{x.__class__}"})
    assert job["notification"]["title"] == "{b} {x.__class__}"
    assert job["data"] == {"k": "{b}"}


def test_values_are_not_formatted_through_their_own_methods() -> None:
    class Sneaky(str):
        def __str__(self) -> str:
            raise AssertionError("called")

        def __format__(self, spec: str) -> str:
            raise AssertionError("called")

    job = render(one(), {"user_id": "u1", "order_id": Sneaky("7")})
    assert job["notification"]["title"] == "Order 7"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (5, "must be a user id string or a list of them, got a number"),
        ("", "is an empty string"),
        (["a", 3], r"event field 'user_id'\[1\] must be a non-empty user id string"),
        (["x" * 300], "recipients from event field 'user_id'"),
    ],
)
def test_bad_recipients_are_event_errors(value: object, problem: str) -> None:
    with pytest.raises(EventError, match=problem):
        render(one(), {"user_id": value, "order_id": "1"})


def test_no_recipients_is_its_own_event_error() -> None:
    with pytest.raises(NoRecipientsError, match="empty list"):
        render(one(), {"user_id": [], "order_id": "1"})


def test_the_rendered_job_must_be_valid() -> None:
    with pytest.raises(EventError, match=r"payload is .* bytes"):
        render(one(body="{text}"), {"user_id": "u1", "order_id": "1", "text": "x" * 5000})
    with pytest.raises(EventError, match=r"once of rule 'order.completed' rendered to 'welcome-a b'.*'campaign'"):
        render(one(once="welcome-{campaign}"), {"user_id": "u1", "order_id": "1", "campaign": "a b"})
    with pytest.raises(EventError, match="non-empty title or body"):
        render(one(title="{t}", body=...), {"user_id": "u1", "t": ""})
    with pytest.raises(EventError, match="lone surrogate"):
        render(one(), {"user_id": "u1", "order_id": "\ud800"})
    with pytest.raises(EventError, match="JSON object"):
        render(one(), ["not", "a", "mapping"])  # type: ignore[arg-type]


# --- property: rendering never evaluates anything ----------------------------------------------

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
TEXT = st.text(max_size=12)


@st.composite
def templates(draw: st.DrawFn) -> tuple[list[tuple[str, str]], dict[str, object]]:
    """A template as parts: ("text", raw text) or ("field", name), and values for some of the names."""
    parts = draw(st.lists(st.one_of(st.tuples(st.just("text"), TEXT), st.tuples(st.just("field"), NAMES)), max_size=8))
    names = {value for kind, value in parts if kind == "field"}
    values = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing
        scalar = st.one_of(
            st.text(max_size=20),
            st.sampled_from(["{x}", "{name}", "{{", "}}", "{0}", "{x.__class__}", "{}"]),
            st.integers(),
            st.booleans(),
            st.floats(),
        )
        not_scalar = st.one_of(
            st.lists(st.text(max_size=3), max_size=2),
            st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
            st.none(),
        )
        values[name] = draw(not_scalar if draw(st.integers(0, 9)) == 0 else scalar)
    return parts, values


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(templates(), st.sampled_from(["title", "body", "data"]))
def test_property_rendering_only_substitutes_and_only_raises_event_error(
    template: tuple[list[tuple[str, str]], dict[str, object]], where: str
) -> None:
    parts, values = template
    source = "".join(_escape(v) if kind == "text" else "{" + v + "}" for kind, v in parts)
    fields = {"type": "t", "recipients": {"users": ["u1"]}, "title": "T"}
    if where == "data":
        fields["data"] = {"k": source}
    else:
        fields[where] = source
    if where == "title" and not source:
        fields["body"] = "B"
    r = next(iter(parse_rules({"rules": [fields]}).values()))

    try:
        job = render(r, values)
    except EventError:
        return
    expected = "".join(v if kind == "text" else str(values[v]) for kind, v in parts)
    got = job["data"]["k"] if where == "data" else job["notification"][where]
    assert got == expected  # values (even "{x}") are inserted verbatim, never expanded again
    parse_v1(job)


# --- templates on their own --------------------------------------------------------------------


def test_a_template_is_literal_text_and_fields() -> None:
    parts = tpl.parse("Order {order_id} {{done}} by {who}")
    assert parts == ("Order ", tpl.Field("order_id"), " {done} by ", tpl.Field("who"))
    assert tpl.literal_text(parts) == "Order  {done} by "
    assert tpl.field_names(parts) == ["order_id", "who"]
    assert tpl.fill(parts, {"order_id": 7, "who": "{x}"}) == "Order 7 {done} by {x}"
    assert tpl.parse("") == ()


def test_a_bad_template_says_why() -> None:
    with pytest.raises(tpl.TemplateError, match=r"placeholder \{a\.b\} uses attribute access"):
        tpl.parse("{a.b}")
    with pytest.raises(tpl.TemplateError, match="unclosed"):
        tpl.parse("{a")


def test_filling_names_the_field_at_fault() -> None:
    parts = tpl.parse("{a}")
    with pytest.raises(tpl.MissingField) as missing:
        tpl.fill(parts, {})
    assert missing.value.name == "a"
    with pytest.raises(tpl.NotScalar) as not_scalar:
        tpl.fill(parts, {"a": [1]})
    assert (not_scalar.value.name, not_scalar.value.value) == ("a", [1])
    assert tpl.scalar_text(True) == "True" and tpl.scalar_text(None) is None


# --- the rules speak the job's rules (one definition, in shared/jobs.py) ------------------------


def job_error(**fields: object) -> str:
    with pytest.raises(JobError) as info:
        parse_v1({"version": 1, "user_ids": ["u"], "notification": {"title": "t"}, **fields})
    return info.value.message


@pytest.mark.parametrize(
    "users",
    [[""], ["x" * 257], ["ok", 3], ["a\x00b"], ["\ud800"], ["u"] * (MAX_USER_IDS + 1)],
    ids=["empty", "too-long", "not-a-string", "control", "surrogate", "too-many"],
)
def test_static_recipients_follow_the_job_rules(users: list) -> None:
    expected = job_error(user_ids=users).replace("user_ids", "recipients.users", 1)
    assert expected in refused(rule(recipients={"users": users}))


@pytest.mark.parametrize("platforms", [["android", "desktop"], ["ios", "ios"], [7]])
def test_platforms_follow_the_job_rules(platforms: list) -> None:
    assert job_error(platforms=platforms) in refused(rule(platforms=platforms))


@pytest.mark.parametrize("key", ["from", "google.x", "gcm.y", "message_type", ""])
def test_data_keys_follow_the_job_rules(key: str) -> None:
    assert job_error(data={key: "v"}) in refused(rule(data={key: "v"}))


def test_a_rendered_job_error_names_the_recipients_field_only_when_it_is_about_them() -> None:
    with pytest.raises(EventError) as about_users:
        render(one(), {"user_id": ["x" * 300], "order_id": "1"})
    assert "recipients from event field 'user_id'" in str(about_users.value)
    assert "user_ids[0] must be a non-empty string of at most 256 characters" in str(about_users.value)
    with pytest.raises(EventError) as about_payload:
        render(one(body="{text}"), {"user_id": "u1", "order_id": "1", "text": "x" * 5000})
    assert "recipients" not in str(about_payload.value)


def test_a_rule_with_a_category_or_urgent_renders_a_version_2_job() -> None:
    job = render(one(category="orders", urgent=True), {"user_id": "u1", "order_id": "42"})
    assert job["version"] == 2 and job["category"] == "orders" and job["urgent"] is True
    parsed = parse_v1(job)
    assert parsed.category == "orders" and parsed.urgent is True
    plain = render(one(urgent=False), {"user_id": "u1", "order_id": "42"})
    assert plain["version"] == 1 and "urgent" not in plain and "category" not in plain
