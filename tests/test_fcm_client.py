"""The real FCM clients (HTTP and SDK) against the fake FCM over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.auth.exceptions import RefreshError

from local.fake_fcm import FakeFcm
from shared import config, logs
from shared.credentials import AccessTokenProvider, CredentialsAlarm, StaticTokenCredentials
from shared.fcm import HttpFcmClient, SdkFcmClient, make_client
from shared.outcomes import Cause, Kind, Outcome

PROJECT = "demo-fcm-test"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeFcm]:
    fake = FakeFcm()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server: FakeFcm) -> FakeFcm:
    server.configure(delay_ms=0, fail_rate=0.0, seed=0, fail_codes=["UNAVAILABLE"], record=True, refused_bearers=[])
    server.reset()
    return server


class CountingCredentials(StaticTokenCredentials):
    """A credential that hands out a new token on every refresh (tok-1, tok-2, ...)."""

    def __init__(self) -> None:
        super().__init__("tok-0")
        self.count = 0

    def refresh(self, request: Any) -> None:
        self.count += 1
        self.token = f"tok-{self.count}"


class BrokenCredentials(CountingCredentials):
    """Refreshes work ``good`` times, then fail as a revoked key or an unreachable metadata server does."""

    def __init__(self, good: int = 0, token: str | None = None) -> None:
        super().__init__()
        self.good = good
        self.token = token

    def refresh(self, request: Any) -> None:
        if self.count >= self.good:
            raise RefreshError("invalid_grant: Invalid JWT Signature.")
        super().refresh(request)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def http_client(
    url: str, creds: Any = None, timeout: float = 5.0, max_connections: int = 500, alarm: Any = None
) -> HttpFcmClient:
    tokens = AccessTokenProvider(creds or StaticTokenCredentials())
    return HttpFcmClient(PROJECT, url, tokens=tokens, max_connections=max_connections, timeout=timeout, alarm=alarm)


def sdk_client(url: str, creds: Any = None, timeout: float = 5.0, alarm: Any = None) -> SdkFcmClient:
    return SdkFcmClient(
        PROJECT, credentials=creds or StaticTokenCredentials(), endpoint=url, timeout=timeout, alarm=alarm
    )


def make(kind: str, url: str, **kwargs: Any) -> HttpFcmClient | SdkFcmClient:
    return http_client(url, **kwargs) if kind == "http" else sdk_client(url, **kwargs)


def send_all(client: HttpFcmClient | SdkFcmClient, messages: list[dict[str, Any]]) -> list[Outcome]:
    async def run() -> list[Outcome]:
        try:
            return list(await asyncio.gather(*(client.send(m) for m in messages)))
        finally:
            await client.close()

    return asyncio.run(run())


def send_each_in_turn(client: HttpFcmClient | SdkFcmClient, messages: list[dict[str, Any]]) -> list[Outcome]:
    async def run() -> list[Outcome]:
        try:
            return [await client.send(m) for m in messages]
        finally:
            await client.close()

    return asyncio.run(run())


@contextlib.contextmanager
def critical_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Yields a function returning the CRITICAL JSON log lines written under ``pushline`` so far."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.setLevel(logging.CRITICAL)
    logger = logging.getLogger("pushline")
    logger.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)


CLIENTS = ["http", "sdk"]
# The token each client's first request carries: the HTTP client refreshes before its first request
# (tok-1); the SDK uses the credential's token while it is valid (tok-0).
FIRST_TOKEN = {"http": "tok-1", "sdk": "tok-0"}


@pytest.mark.parametrize("kind", CLIENTS)
def test_success_sends_the_message_as_given(fake: FakeFcm, kind: str) -> None:
    message = {
        "token": "healthy-1",
        "notification": {"title": "Hi", "body": "there"},
        "data": {"k": "v"},
        "apns": {"headers": {"apns-collapse-id": "job1"}, "payload": {"aps": {"sound": "default"}}},
        "android": {"notification": {"tag": "job1"}},
    }
    assert send_all(make(kind, fake.url), [message]) == [Outcome(Kind.DELIVERED)]
    [received] = fake.messages("healthy-1")
    assert received["message"] == message
    assert (received["attempt"], received["status"], received["answer"]) == (1, 200, "OK")


@pytest.mark.parametrize("kind", CLIENTS)
def test_each_error_kind(fake: FakeFcm, kind: str) -> None:
    tokens = ["dead-1", "malformed-1", "mismatch-1", "payload-1", "flaky-1", "quota-1", "fine-1"]
    results = send_all(make(kind, fake.url), [{"token": t} for t in tokens])
    got = {t: (o.kind, o.code) for t, o in zip(tokens, results, strict=True)}
    assert got == {
        "dead-1": (Kind.DEAD_TOKEN, "UNREGISTERED"),
        "malformed-1": (Kind.DEAD_TOKEN, "INVALID_ARGUMENT"),
        "mismatch-1": (Kind.DEAD_TOKEN, "SENDER_ID_MISMATCH"),
        "payload-1": (Kind.PAYLOAD_REJECTED, "INVALID_ARGUMENT"),
        "flaky-1": (Kind.RETRY, "UNAVAILABLE"),
        "quota-1": (Kind.RETRY, "QUOTA_EXCEEDED"),
        "fine-1": (Kind.DELIVERED, ""),
    }
    by_token = dict(zip(tokens, results, strict=True))
    assert by_token["mismatch-1"].sender_mismatch
    assert by_token["flaky-1"].retry_after == 1.0
    assert by_token["quota-1"].retry_after == 1.0
    # One send is one attempt: the SDK's own retries on 503 are switched off.
    assert fake.stats()["received"] == len(tokens)


@pytest.mark.parametrize("kind", CLIENTS)
def test_flaky_token_recovers_on_the_third_attempt(fake: FakeFcm, kind: str) -> None:
    kinds = []
    for _ in range(3):
        [outcome] = send_all(make(kind, fake.url), [{"token": "flaky-7"}])
        kinds.append(outcome.kind)
    assert kinds == [Kind.RETRY, Kind.RETRY, Kind.DELIVERED]
    assert [m["attempt"] for m in fake.messages("flaky-7")] == [1, 2, 3]


@pytest.mark.parametrize("kind", CLIENTS)
def test_scripted_answers(fake: FakeFcm, kind: str) -> None:
    fake.script("s-1", ["INTERNAL", "PERMISSION_DENIED", "OK"])
    outcomes = [send_all(make(kind, fake.url), [{"token": "s-1"}])[0] for _ in range(4)]
    assert [(o.kind, o.code) for o in outcomes] == [
        (Kind.RETRY, "INTERNAL"),
        (Kind.RETRY, "PERMISSION_DENIED"),
        (Kind.DELIVERED, ""),
        (Kind.DELIVERED, ""),
    ]
    assert [m["attempt"] for m in fake.messages("s-1")] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", CLIENTS)
def test_many_in_flight_at_once(fake: FakeFcm, kind: str) -> None:
    fake.configure(delay_ms=50)
    results = send_all(make(kind, fake.url), [{"token": f"c-{i}"} for i in range(300)])
    assert all(o.kind is Kind.DELIVERED for o in results)
    stats = fake.stats()
    assert stats["received"] == 300
    # Serial sending would never have more than one request open at the fake. (The SDK starts a
    # thread per message, so its requests open more slowly.)
    assert stats["max_in_flight"] >= (100 if kind == "http" else 20)


@pytest.mark.parametrize("kind", CLIENTS)
def test_unencodable_message_is_rejected_alone(fake: FakeFcm, kind: str) -> None:
    bad, good = send_all(make(kind, fake.url), [{"token": "enc-1", "data": {"k": {1, 2}}}, {"token": "enc-2"}])
    assert (bad.kind, bad.code) == (Kind.PAYLOAD_REJECTED, "INVALID_MESSAGE")
    assert good.kind is Kind.DELIVERED
    assert fake.stats()["received"] == 1


def test_http_concurrency_is_bounded_by_max_connections(fake: FakeFcm) -> None:
    fake.configure(delay_ms=20)
    results = send_all(http_client(fake.url, max_connections=10), [{"token": f"b-{i}"} for i in range(100)])
    assert all(o.kind is Kind.DELIVERED for o in results)
    assert 2 <= fake.stats()["max_in_flight"] <= 10


def test_sdk_sends_slices_of_at_most_500(fake: FakeFcm) -> None:
    client = sdk_client(fake.url)
    results = send_all(client, [{"token": f"m-{i}"} for i in range(1200)])
    assert all(o.kind is Kind.DELIVERED for o in results)
    assert client.largest_batch <= 500
    assert client.batches >= 3
    assert fake.stats()["received"] == 1200


@pytest.mark.parametrize("kind", CLIENTS)
def test_refused_access_token_is_refreshed_once_and_the_request_retried_inline(fake: FakeFcm, kind: str) -> None:
    # FCM answers 401 UNAUTHENTICATED (no FCM code) to every request carrying the first access token.
    creds = CountingCredentials()
    fake.configure(refused_bearers=[FIRST_TOKEN[kind]])
    tokens = [f"refused-{kind}-{i}" for i in range(50)]
    results = send_all(make(kind, fake.url, creds=creds), [{"token": t} for t in tokens])
    assert [o.kind for o in results] == [Kind.DELIVERED] * 50  # each send retried inline with the new token
    assert fake.stats()["answers"]["UNAUTHENTICATED"] == 50
    # Fifty concurrent refusals, one refresh (the HTTP client also fetched its first token).
    assert creds.count == (2 if kind == "http" else 1)
    assert all(len(fake.messages(t)) == 1 for t in tokens)


@pytest.mark.parametrize("kind", CLIENTS)
def test_access_token_refused_again_is_a_credentials_outage(fake: FakeFcm, kind: str) -> None:
    creds = CountingCredentials()
    fake.configure(refused_bearers=["*"])
    results = send_all(make(kind, fake.url, creds=creds), [{"token": f"always-{i}"} for i in range(10)])
    assert {(o.kind, o.cause, o.code, o.charged, o.maybe_sent) for o in results} == {
        (Kind.RETRY, Cause.CREDENTIALS, "UNAUTHENTICATED", False, False)
    }
    assert fake.stats()["answers"]["UNAUTHENTICATED"] == 20  # each request once more, not more
    assert creds.count == (2 if kind == "http" else 1)


@pytest.mark.parametrize("kind", CLIENTS)
def test_third_party_auth_error_keeps_the_access_token(fake: FakeFcm, kind: str) -> None:
    # A broken APNs / web push key answers 401 THIRD_PARTY_AUTH_ERROR: a fact about those devices'
    # platform, not about our OAuth token, so no refresh and no second request.
    creds = CountingCredentials()
    fake.script("apns-1", ["THIRD_PARTY_AUTH_ERROR"])
    fake.script("apns-2", ["THIRD_PARTY_AUTH_ERROR"])
    first, second, after = send_each_in_turn(
        make(kind, fake.url, creds=creds), [{"token": "apns-1"}, {"token": "apns-2"}, {"token": "ok-1"}]
    )
    assert (first.kind, first.code, second.kind) == (Kind.CONFIG_ERROR, "THIRD_PARTY_AUTH_ERROR", Kind.CONFIG_ERROR)
    assert after.kind is Kind.DELIVERED
    assert creds.count == (1 if kind == "http" else 0)
    assert len(fake.messages("apns-1")) == 1 and len(fake.messages("apns-2")) == 1


@pytest.mark.parametrize("kind", CLIENTS)
def test_permission_denied_is_a_credentials_outage_with_one_critical_line_a_minute(fake: FakeFcm, kind: str) -> None:
    # IAM not (yet) granting cloudmessaging.messages.create: 403 PERMISSION_DENIED without an FCM code.
    clock = Clock()
    secret = "projects/demo-fcm-test/secrets/fcm-key/versions/3"
    alarm = CredentialsAlarm(PROJECT, secret, clock=clock)
    creds = CountingCredentials()
    fake.configure(fail_rate=1.0, fail_codes=["PERMISSION_DENIED"])

    def burst(n: int) -> list[Outcome]:
        return send_all(make(kind, fake.url, creds=creds, alarm=alarm), [{"token": f"iam-{i}"} for i in range(n)])

    with critical_lines() as lines:
        results = burst(40)
        assert {(o.kind, o.cause, o.code, o.charged) for o in results} == {
            (Kind.RETRY, Cause.CREDENTIALS, "PERMISSION_DENIED", False)
        }
        [line] = lines()
        assert "cloudmessaging.messages.create" in line["message"] and secret in line["message"]
        assert f"GOOGLE_CLOUD_PROJECT={PROJECT}" in line["message"]
        clock.now += 59
        burst(10)
        assert len(lines()) == 1
        clock.now += 2
        burst(5)
        assert len(lines()) == 2
        assert [line["similar_answers"] for line in lines()] == [1, 50]  # the 49 not logged in between, and this one
        assert all("tok-" not in json.dumps(line) for line in lines())
    # A 403 is not an access-token problem: no refresh (the HTTP clients each fetched their first token).
    assert creds.count == (3 if kind == "http" else 0)


@pytest.mark.parametrize("kind", CLIENTS)
def test_failed_refresh_is_a_credentials_outage_and_sends_nothing(fake: FakeFcm, kind: str) -> None:
    alarm = CredentialsAlarm(PROJECT, None, clock=Clock())
    with critical_lines() as lines:
        results = send_all(make(kind, fake.url, creds=BrokenCredentials(), alarm=alarm), [{"token": "nr-1"}])
        [line] = lines()
    [outcome] = results
    assert (outcome.kind, outcome.cause, outcome.charged, outcome.maybe_sent) == (
        Kind.RETRY,
        Cause.CREDENTIALS,
        False,
        False,
    )
    assert "RefreshError" in outcome.message and "invalid_grant" in outcome.message
    assert "FCM_CREDENTIALS_SECRET" in line["message"] and "metadata server" in line["message"]
    assert fake.stats()["received"] == 0


@pytest.mark.parametrize("kind", CLIENTS)
def test_failed_refresh_after_a_refused_token_is_a_credentials_outage(fake: FakeFcm, kind: str) -> None:
    # The first token works until FCM refuses it; then the key turns out to be revoked.
    creds = BrokenCredentials(good=1 if kind == "http" else 0, token="tok-0")
    fake.configure(refused_bearers=[FIRST_TOKEN[kind]])
    results = send_all(make(kind, fake.url, creds=creds), [{"token": f"rv-{i}"} for i in range(5)])
    assert {(o.kind, o.cause, o.code, o.charged) for o in results} == {
        (Kind.RETRY, Cause.CREDENTIALS, "CREDENTIALS", False)
    }
    assert fake.stats()["answers"]["UNAUTHENTICATED"] == 5


@pytest.mark.parametrize("kind", CLIENTS)
def test_quota_exceeded_waits_a_minute_unless_fcm_says_otherwise(fake: FakeFcm, kind: str) -> None:
    fake.script("q-project", ["PROJECT_QUOTA_EXCEEDED"])
    fake.script("q-said", ["QUOTA_EXCEEDED:120"])
    fake.script("q-device", ["DEVICE_QUOTA_EXCEEDED"])
    results = send_all(make(kind, fake.url), [{"token": t} for t in ["q-project", "q-said", "q-device"]])
    assert [(o.kind, o.cause, o.retry_after, o.charged) for o in results] == [
        (Kind.RETRY, Cause.QUOTA, 60.0, True),
        (Kind.RETRY, Cause.QUOTA, 120.0, True),
        (Kind.RETRY, Cause.DEVICE_QUOTA, 60.0, True),
    ]
    assert [o.counts_as_outage for o in results] == [True, True, False]


def test_fake_requires_a_bearer_token(fake: FakeFcm) -> None:
    request = urllib.request.Request(
        f"{fake.url}/v1/projects/{PROJECT}/messages:send",
        data=json.dumps({"message": {"token": "x"}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 401
    assert json.loads(err.value.read())["error"]["status"] == "UNAUTHENTICATED"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", CLIENTS)
def test_connection_refused_is_retry(kind: str) -> None:
    [outcome] = send_all(make(kind, f"http://127.0.0.1:{_closed_port()}"), [{"token": "t"}])
    assert (outcome.kind, outcome.code, outcome.maybe_sent) == (Kind.RETRY, "CONNECTION", False)


@pytest.mark.parametrize("kind", CLIENTS)
def test_timeout_is_retry_and_maybe_sent(fake: FakeFcm, kind: str) -> None:
    fake.configure(delay_ms=1500)
    [outcome] = send_all(make(kind, fake.url, timeout=0.2), [{"token": "slow-1"}])
    assert (outcome.kind, outcome.code, outcome.maybe_sent) == (Kind.RETRY, "TIMEOUT", True)
    assert len(fake.messages("slow-1")) == 1  # it did reach FCM


def test_dropped_connection_is_retry_and_maybe_sent(fake: FakeFcm) -> None:
    fake.script("drop-1", ["DROP"])
    [outcome] = send_all(http_client(fake.url), [{"token": "drop-1"}])
    assert (outcome.kind, outcome.maybe_sent) == (Kind.RETRY, True)


@pytest.mark.parametrize("kind", CLIENTS)
def test_make_client_from_settings(fake: FakeFcm, kind: str) -> None:
    s = config.load({"FCM_ENDPOINT": fake.url, "GOOGLE_CLOUD_PROJECT": PROJECT, "FCM_CLIENT": kind})
    client = make_client(s)
    assert isinstance(client, HttpFcmClient if kind == "http" else SdkFcmClient)
    assert send_all(client, [{"token": "cfg-1"}]) == [Outcome(Kind.DELIVERED)]


def test_injected_failures_repeat_for_the_same_seed(fake: FakeFcm) -> None:
    messages = [{"token": f"r-{i}"} for i in range(60)]

    def run() -> list[Kind]:
        fake.reset()
        fake.configure(fail_rate=0.5, seed=42, fail_codes=["UNAVAILABLE", "QUOTA_EXCEEDED"])
        return [o.kind for o in send_all(http_client(fake.url), messages)]

    first, second = run(), run()
    assert first == second
    assert 10 < first.count(Kind.RETRY) < 50


def test_control_api_over_http(fake: FakeFcm) -> None:
    def call(method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{fake.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    assert call("GET", "/healthz") == {"ok": True}
    call("POST", "/_fake/script", {"token": "api-1", "responses": ["UNREGISTERED"]})
    [outcome] = send_all(http_client(fake.url), [{"token": "api-1"}])
    assert outcome.kind is Kind.DEAD_TOKEN
    found = call("GET", "/_fake/messages?token=api-1")["messages"]
    assert [m["message"]["token"] for m in found] == ["api-1"]
    assert call("GET", "/_fake/stats")["answers"] == {"UNREGISTERED": 1}
    call("DELETE", "/_fake/messages")
    assert call("GET", "/_fake/messages")["messages"] == []
