"""infra/openapi.yaml against the RUNNING functions: schemathesis generates valid and invalid requests
(over 1,000 in all) for register and send on a local stack (functions-framework processes, the local
bus, the fake FCM, real Redis and PostgreSQL), and each answer is checked:

- never a 5xx; every error is JSON ``{"error": "..."}``; status, content type, headers and body
  conform to the document; data that breaks the document is rejected (4xx);
- register: a missing or invalid ID token is 401, and a rejected registration stores nothing;
- register's receipts: a missing or invalid ID token is 401; only a real device's receipt of a notification
  it was sent is stored (every receipt Redis holds is of an accepted notification and a registered token);
- send: an audience (with an Idempotency-Key half the time: it is refused without) reaches every
  registered device, the canary's too; nothing from a rejected request reaches FCM (every message FCM
  received carries, as its collapse id, the id of an accepted request), and accepted ones are delivered.

The document names each operation with its function's prefix (``/register``, ``/send``); each
function serves it at ``/`` of its own URL, so the prefix is stripped before calling.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from local.idtoken import emulator_id_token
from local.servers import wait_until
from shared.db import Database
from tests.conftest import ORIGIN, ROOT, clean, start_stack

slow = pytest.mark.slow

DOCUMENT = ROOT / "infra" / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
FUNCTION = {
    "/register": "register",
    "/register/receipts": "register",
    "/register/preferences": "register",
    "/send": "send",
    "/send/{id}": "send",
}
PREFIX = {
    "/register": "/register",
    "/register/receipts": "/register",
    "/register/preferences": "/register",
    "/send": "/send",
    "/send/{id}": "/send",
}
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
CANARY_USER, CANARY_TOKEN = "canary-user", f"canary-{uuid.uuid4().hex}"
CANARY_NOTIFICATION = ""  # sent to the canary by the stack fixture: the real target of generated receipts
CANARY_LOCALE = "de-AT"  # takes the "de" variant of the send example's localized text
MIN_REQUESTS = 1000

# (operation, mode) -> max_examples; Hypothesis may stop earlier when it has seen everything.
BUDGET = {
    ("/register", "POST"): 200,
    ("/register", "DELETE"): 120,
    ("/register", "OPTIONS"): 40,
    ("/register/receipts", "POST"): 120,
    ("/register/preferences", "GET"): 30,
    ("/register/preferences", "PUT"): 150,
    ("/send", "POST"): 250,
    ("/send/{id}", "GET"): 60,
    ("/send/{id}", "DELETE"): 40,
}


@dataclass
class Record:
    """What the run did, for the checks that need every request (and a count of them)."""

    requests: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    accepted_tokens: set[str] = field(default_factory=set)  # in a register call answered 200
    rejected_tokens: set[str] = field(default_factory=set)  # only in register calls answered 4xx
    accepted_ids: set[str] = field(default_factory=set)  # ids of sends answered 202
    counted: Counter = field(default_factory=Counter)  # receipts answered 200, by "counted"
    accepted_fields: Counter = field(default_factory=Counter)  # (operation, field) in accepted bodies, not null
    preferences: dict[str, Any] = field(default_factory=dict)  # user -> the document of their last PUT answered 200


RECORD = Record()


@pytest.fixture(scope="module")
def stack(servers):
    clean(servers)
    stack = start_stack(
        use_emulator=False,
        redis_url=servers.redis_url,
        database_url=servers.database_url,
        functions=("register", "send", "deliver"),
        env={"CORS_ALLOWED_ORIGINS": ORIGIN, "MAX_TOKENS_PER_USER": "1000"},
    )
    project = stack.config.project
    r = requests.post(
        stack.url("register") + "/",
        json={"token": CANARY_TOKEN, "platform": "android", "locale": CANARY_LOCALE},
        headers={"Authorization": f"Bearer {emulator_id_token(CANARY_USER, project)}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    global CANARY_NOTIFICATION
    r = requests.post(stack.url("send") + "/", json={"user_ids": [CANARY_USER], "data": {"k": "v"}}, timeout=30)
    assert r.status_code == 202, r.text
    CANARY_NOTIFICATION = r.json()["id"]
    RECORD.accepted_ids.add(CANARY_NOTIFICATION)
    wait_until(
        lambda: requests.get(f"{stack.url('send')}/{CANARY_NOTIFICATION}", timeout=30).json()["state"] == "done",
        timeout=60,
        what="the canary's notification to be done (the receipts' real target)",
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def http():
    session = requests.Session()
    yield session
    session.close()


def authorizations(project: str) -> dict[str, str | None]:
    """Authorization headers: two valid users, and what must be refused."""
    return {
        "fuzz-alice": f"Bearer {emulator_id_token('fuzz-alice', project)}",
        "fuzz-bob": f"Bearer {emulator_id_token('fuzz-bob', project)}",
        "missing": None,
        "garbage": "Bearer not.a.jwt",
        "other-project": f"Bearer {emulator_id_token('fuzz-alice', 'someone-elses-project')}",
        "basic": f"Basic {emulator_id_token('fuzz-alice', project)}",
        "empty": "Bearer ",
    }


VALID_CALLERS = {"fuzz-alice", "fuzz-bob"}


def call(stack, http: requests.Session, case, extra_headers: dict[str, str] | None = None) -> requests.Response:
    path = case.operation.path
    base = stack.url(FUNCTION[path])
    extra = {k: v for k, v in (extra_headers or {}).items() if v is not None}
    kwargs = case.as_transport_kwargs(base_url=base, headers=extra)
    for name, value in (extra_headers or {}).items():
        if value is None:  # e.g. no Authorization at all
            kwargs["headers"].pop(name, None)
    url: str = kwargs["url"]
    assert url.startswith(base + PREFIX[path]), url
    rest = url[len(base) + len(PREFIX[path]) :]
    kwargs["url"] = base + (rest if rest.startswith("/") else "/" + rest)
    response = http.request(**kwargs, timeout=30, allow_redirects=False)
    RECORD.requests[(path, case.method.upper())] += 1
    RECORD.statuses[response.status_code] += 1
    return response


def check_answer(case, response: requests.Response) -> None:
    assert response.status_code < 500, f"{case.method} {case.operation.path}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], response.text
    case.validate_response(response, checks=CHECKS)


def body_token(case) -> str | None:
    body = getattr(case, "body", None)
    if isinstance(body, dict) and isinstance(body.get("token"), str):
        return body["token"]
    return None


def fuzz(operation: str, method: str, mode: GenerationMode, run: Any) -> None:
    strategy = SCHEMA[operation][method].as_strategy(generation_mode=mode)
    budget = BUDGET[(operation, method)]

    @settings(
        max_examples=budget,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, data=st.data())
    def test(case, data):
        run(case, data)

    test()


MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def fuzz_register(stack, http, method: str, mode: GenerationMode, operation: str = "/register") -> None:
    callers = authorizations(stack.config.project)

    valid, invalid = sorted(VALID_CALLERS), sorted(set(callers) - VALID_CALLERS)

    def run(case, data):
        who = data.draw(st.sampled_from(valid) | st.sampled_from(invalid), label="caller")  # half and half
        response = call(stack, http, case, {"Authorization": callers[who]})
        check_answer(case, response)
        if who not in VALID_CALLERS:
            assert response.status_code == 401, (who, response.status_code, response.text)
            assert response.headers.get("WWW-Authenticate") == "Bearer"
        if operation == "/register/preferences" and method == "PUT" and response.status_code == 200:
            RECORD.preferences[who] = response.json()
        token = body_token(case)
        if method == "POST" and token is not None:
            if response.status_code == 200:
                RECORD.accepted_tokens.add(token)
                RECORD.accepted_fields.update(("register", k) for k, v in case.body.items() if v is not None)
            else:
                RECORD.rejected_tokens.add(token)

    fuzz(operation, method, mode, run)


def fuzz_register_preflight(stack, http, mode: GenerationMode) -> None:
    def run(case, data):
        origin = data.draw(st.sampled_from([None, ORIGIN, "https://evil.example"]), label="origin")
        response = call(stack, http, case, {"Origin": origin} if origin else None)
        check_answer(case, response)
        sent_origin = (case.headers or {}).get("Origin") if origin is None else origin
        if response.status_code == 204:
            assert sent_origin is not None and sent_origin.rstrip("/") == ORIGIN
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        else:
            assert "Access-Control-Allow-Origin" not in response.headers

    fuzz("/register", "OPTIONS", mode, run)


def fuzz_receipts(stack, http, mode: GenerationMode) -> None:
    project = stack.config.project
    callers = {**authorizations(project), CANARY_USER: f"Bearer {emulator_id_token(CANARY_USER, project)}"}
    valid, invalid = sorted(VALID_CALLERS | {CANARY_USER}), sorted(set(callers) - VALID_CALLERS - {CANARY_USER})

    def run(case, data):
        body = getattr(case, "body", None)
        # Make some well-formed receipts real ones (the canary's device, a notification it was sent).
        if isinstance(body, dict) and mode is GenerationMode.POSITIVE and data.draw(st.booleans(), label="real"):
            body.update(notification_id=CANARY_NOTIFICATION, token=CANARY_TOKEN)
        who = data.draw(st.sampled_from(valid) | st.sampled_from(invalid), label="caller")
        response = call(stack, http, case, {"Authorization": callers[who]})
        check_answer(case, response)
        if who not in valid:
            assert response.status_code == 401, (who, response.status_code, response.text)
        if response.status_code == 200:
            assert who == CANARY_USER and body["token"] == CANARY_TOKEN, (who, body)
            RECORD.counted[response.json()["counted"]] += 1

    fuzz("/register/receipts", "POST", mode, run)


def fuzz_send(stack, http, mode: GenerationMode) -> None:
    def run(case, data):
        body = getattr(case, "body", None)
        # Make requests name a user who has a device, so a rejected one that leaked would show at FCM.
        if isinstance(body, dict) and isinstance(body.get("user_ids"), list) and data.draw(st.booleans()):
            body["user_ids"].append(CANARY_USER)
        extra = None
        has_key = "Idempotency-Key" in (case.headers or {})  # (a negative case's key may be what is invalid)
        if isinstance(body, dict) and "audience" in body and not has_key and data.draw(st.booleans(), label="key"):
            extra = {"Idempotency-Key": f"fuzz-{uuid.uuid4().hex}"}  # an audience is accepted only with one
        response = call(stack, http, case, extra)
        check_answer(case, response)
        if response.status_code == 202:
            RECORD.accepted_ids.add(response.json()["id"])
            RECORD.accepted_fields.update(("send", k) for k in body or ())

    fuzz("/send", "POST", mode, run)


def fuzz_send_status(stack, http, mode: GenerationMode) -> None:
    def run(case, data):
        known = sorted(RECORD.accepted_ids)
        if known and mode is GenerationMode.POSITIVE and data.draw(st.booleans(), label="known id"):
            case.path_parameters = {"id": data.draw(st.sampled_from(known))}
        response = call(stack, http, case)
        check_answer(case, response)

    fuzz("/send/{id}", "GET", mode, run)


def fuzz_send_cancel(stack, http, mode: GenerationMode) -> None:
    """DELETE /send/{id}: unknown ids (404), invalid ids (400), and some accepted ones (200, or 409 once done)."""

    def run(case, data):
        known = sorted(RECORD.accepted_ids)
        if known and mode is GenerationMode.POSITIVE and data.draw(st.booleans(), label="known id"):
            case.path_parameters = {"id": data.draw(st.sampled_from(known))}
        response = call(stack, http, case)
        check_answer(case, response)
        if response.status_code == 200:
            assert response.json()["state"] == "cancelled"

    fuzz("/send/{id}", "DELETE", mode, run)


# (function, method) pairs that no operation of the document serves: each must be a JSON 405.
OTHER_METHODS = [
    (function, method)
    for function in ("register", "send")
    for method in ("GET", "PUT", "PATCH")
    if (function, method) != ("send", "GET")  # GET is send's status operation
]


def other_method(stack, http, function: str, method: str) -> None:
    r = http.request(method, stack.url(function) + "/", data=b'{"token": "x"}', timeout=30)
    RECORD.requests[("other", method)] += 1
    assert r.status_code == 405 and "error" in r.json() and r.headers["Allow"]


# Every generated run, in the order the later ones need (send's status reads the ids send accepted).
RUNS: dict[str, Callable[..., None]] = {
    **{
        f"register {method} {mode}": partial(fuzz_register, method=method, mode=mode)
        for method in ("POST", "DELETE")
        for mode in MODES
    },
    **{f"register OPTIONS {mode}": partial(fuzz_register_preflight, mode=mode) for mode in MODES},
    **{f"register receipts POST {mode}": partial(fuzz_receipts, mode=mode) for mode in MODES},
    **{
        f"register {method} /preferences {mode}": partial(
            fuzz_register, method=method, mode=mode, operation="/register/preferences"
        )
        for method in ("GET", "PUT")
        for mode in MODES
    },
    **{f"send POST {mode}": partial(fuzz_send, mode=mode) for mode in MODES},
    **{f"send GET {mode}": partial(fuzz_send_status, mode=mode) for mode in MODES},
    **{f"send DELETE {mode}": partial(fuzz_send_cancel, mode=mode) for mode in MODES},
    **{
        f"{function} {method} is 405": partial(other_method, function=function, method=method)
        for function, method in OTHER_METHODS
    },
}


@pytest.fixture(scope="module")
def fuzzed(stack, http) -> dict[str, BaseException | None]:
    """Every run of generated requests, once per module, whichever of its tests is selected: each
    run's failure (None: it passed) for its own test, and RECORD for the counts and leak checks."""
    outcome: dict[str, BaseException | None] = {}
    for name, run in RUNS.items():
        try:
            run(stack, http)
        except Exception as exc:  # reported by this run's own test, not by the fixture
            outcome[name] = exc
        else:
            outcome[name] = None
    return outcome


@slow
@pytest.mark.parametrize("run", RUNS)
def test_generated_requests(fuzzed, run):
    failure = fuzzed[run]
    if failure is not None:
        raise failure


@slow
def test_nothing_stored_or_sent_for_rejected_requests(fuzzed, stack, http):
    """After the fuzzing: no token of a rejected registration is stored, every accepted notification
    is done (or cancelled by a DELETE of the fuzzing), and FCM received only messages of accepted
    notifications (and the canary got them)."""
    db = Database(stack.env["DATABASE_URL"])
    try:
        stored = {row[0] for row in db.run("SELECT token FROM device_tokens")}
        documents = {u: json.loads(d) for u, d in db.run("SELECT user_id, document::text FROM user_preferences")}
    finally:
        db.close()
    cache = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        cached = {
            m.decode("utf-8", "surrogateescape") for k in cache.scan_iter("notif:token:*") for m in cache.smembers(k)
        }
    finally:
        cache.close()
    rejected = RECORD.rejected_tokens - RECORD.accepted_tokens
    assert rejected, "no registration was rejected: the negative cases do not reach the function"
    leaked = rejected & (stored | cached)
    assert not leaked, f"tokens of rejected registrations were stored: {sorted(leaked)[:5]}"
    assert CANARY_TOKEN in stored
    assert documents == RECORD.preferences, "a rejected PUT /preferences changed what is stored"
    assert RECORD.accepted_ids, "no send was accepted: the positive cases do not reach the function"

    pending: dict[str, Any] = {}

    def all_done() -> bool:
        pending.clear()
        for nid in RECORD.accepted_ids:
            status = http.get(f"{stack.url('send')}/{nid}", timeout=30).json()
            if status.get("state") not in ("done", "cancelled"):
                pending[nid] = status
        return not pending

    wait_until(all_done, timeout=90, interval=0.5, what=f"accepted notifications to be done ({len(pending)} left)")
    messages = http.get(stack.url("fcm") + "/_fake/messages", timeout=30).json()["messages"]
    ids = {m["message"].get("apns", {}).get("headers", {}).get("apns-collapse-id") for m in messages}
    assert ids <= RECORD.accepted_ids, (
        f"FCM got messages of requests that were not accepted: {ids - RECORD.accepted_ids}"
    )
    assert any(m["message"]["token"] == CANARY_TOKEN for m in messages), "the canary got nothing"
    # the new fields were generated, accepted and used: the canary (de-AT) got a "de" variant
    assert {f for op, f in RECORD.accepted_fields if op == "register"} >= {"locale", "time_zone", "app_version"}
    assert ("send", "localized") in RECORD.accepted_fields
    hallo = {"title": "Hallo", "body": "Es gibt Neues"}
    assert any(m["message"]["token"] == CANARY_TOKEN and m["message"].get("notification") == hallo for m in messages)


@slow
def test_only_real_receipts_are_stored(fuzzed, stack, http):
    """After the fuzzing: receipts were counted (once per event of the canary's device), and Redis holds
    receipts only of the canary's notification and device."""
    assert RECORD.counted[True] >= 1, f"no receipt was counted: {RECORD.counted}"
    assert RECORD.counted[True] <= 2  # opened and dismissed, once each
    cache = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        stored = {k.decode(): cache.smembers(k) for k in cache.scan_iter("notif:receipts:*")}
    finally:
        cache.close()
    canary = {f"{event}:{CANARY_TOKEN}".encode() for event in ("opened", "dismissed")}
    assert set(stored) == {f"notif:receipts:{CANARY_NOTIFICATION}"}, sorted(stored)[:5]
    assert stored[f"notif:receipts:{CANARY_NOTIFICATION}"] <= canary
    status = http.get(f"{stack.url('send')}/{CANARY_NOTIFICATION}", timeout=30).json()
    assert sum(status["receipts"].values()) == RECORD.counted[True]


@slow
def test_at_least_a_thousand_requests(fuzzed):
    total = sum(RECORD.requests.values())
    summary = json.dumps(
        {"requests": {f"{m} {p}": n for (p, m), n in sorted(RECORD.requests.items())}, "statuses": RECORD.statuses},
        default=dict,
    )
    print(summary)
    assert total >= MIN_REQUESTS, summary
    assert RECORD.statuses[401] and RECORD.statuses[400] and RECORD.statuses[200] and RECORD.statuses[202], summary


# --- the document itself (fast) ------------------------------------------------------------------


def _document() -> dict:
    import yaml

    return yaml.safe_load(DOCUMENT.read_text())


def test_document_is_valid_openapi_3_0():
    import jsonschema
    from schemathesis.specs.openapi.definitions import OPENAPI_30

    document = _document()
    assert document["openapi"] == "3.0.3"
    jsonschema.Draft4Validator(OPENAPI_30).validate(document)
    assert {p: document["paths"][p]["x-pushline-function"] for p in document["paths"]} == FUNCTION


def _keys(spec: dict, schema: dict, components: dict) -> dict:
    """The nested key tree of an allow-list schema, to compare with jobs.OPTION_SPECS."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    props = schema.get("properties", {})
    return {k: _keys(spec[k], props[k], components) if isinstance(spec.get(k), dict) else None for k in props}


def test_document_agrees_with_the_validators():
    from shared import jobs, receipts, registration
    from shared.claims import OUTCOME_COUNTS, RECEIPT_EVENTS, USER_COUNTS
    from shared.jobs import PLATFORMS

    components = _document()["components"]["schemas"]
    job_schema = json.loads((ROOT / "infra" / "job.schema.json").read_text())
    send = components["SendRequest"]
    assert set(send["properties"]) == set(jobs.REQUEST_FIELDS) == set(job_schema["properties"]) - {"version", "id"}
    assert send["additionalProperties"] is False and "required" not in send
    assert [branch["required"] for branch in send["oneOf"]] == [["user_ids"], ["audience"]]  # exactly one
    assert send["properties"]["user_ids"]["maxItems"] == jobs.MAX_USER_IDS
    assert send["properties"]["user_ids"]["items"]["maxLength"] == jobs.MAX_USER_ID_CHARS
    assert send["properties"]["once"]["pattern"] == jobs.ONCE_PATTERN
    assert send["properties"]["analytics_label"]["pattern"] == jobs.ANALYTICS_LABEL_PATTERN
    assert job_schema["properties"]["analytics_label"]["pattern"] == jobs.ANALYTICS_LABEL_PATTERN
    assert components["Accepted"]["properties"]["id"]["pattern"] == jobs.ID_PATTERN
    for name, spec in jobs.OPTION_SPECS.items():

        def tree(s):
            return {k: tree(v) if isinstance(v, dict) else None for k, v in s.items()}

        assert _keys(spec, send["properties"][name], components) == tree(spec), name
    for name in ("notification", "data", "platforms", "once"):
        assert send["properties"][name].get("type") == job_schema["properties"][name].get("type", "string"), name

    register = components["RegisterRequest"]
    assert set(register["properties"]) == {"token", *registration.ATTRIBUTE_CHECKS}
    assert register["additionalProperties"] is False
    assert register["properties"]["platform"]["enum"] == list(PLATFORMS) == list(jobs.PLATFORMS)
    assert components["DeviceToken"]["maxLength"] == registration.MAX_TOKEN_LENGTH
    removal = components["RemoveRequest"]["oneOf"]
    assert [set(o["properties"]) for o in removal] == [{"token"}, {"all"}]

    from shared import preferences

    prefs = components["PreferencesRequest"]
    assert set(prefs["properties"]) == set(preferences.FIELDS) and prefs["additionalProperties"] is False
    assert prefs["properties"]["muted_categories"]["maxItems"] == preferences.MAX_MUTED_CATEGORIES
    assert components["Category"]["pattern"] == preferences.CATEGORY_PATTERN
    quiet = components["QuietHours"]
    assert quiet["required"] == list(preferences.QUIET_FIELDS) == list(quiet["properties"])

    status = components["Status"]
    assert status["properties"]["counts"]["required"] == list(OUTCOME_COUNTS)
    assert status["properties"]["users"]["required"] == ["targeted", *USER_COUNTS]
    assert set(status["required"]) == {
        "id",
        "state",
        "counts",
        "progress",
        "tokens",
        "receipts",
        "created_at",
        "updated_at",
    }
    assert [branch["required"] for branch in status["oneOf"]] == [["users"], ["devices_matched"]]
    assert status["properties"]["receipts"]["required"] == list(RECEIPT_EVENTS)

    receipt = components["ReceiptRequest"]
    assert tuple(receipt["properties"]) == receipts.FIELDS and receipt["required"] == list(receipts.FIELDS)
    assert receipt["additionalProperties"] is False
    assert receipt["properties"]["event"]["enum"] == list(RECEIPT_EVENTS)
    assert receipt["properties"]["notification_id"]["pattern"] == jobs.ID_PATTERN
