"""Every row of the FCM error -> Outcome table, Retry-After parsing, and exception mapping."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import time
from typing import Any

import pytest
import requests
import urllib3.exceptions
from firebase_admin import exceptions as fb
from firebase_admin import messaging
from google.auth import exceptions as auth_exc

from shared import http1
from shared.outcomes import (
    DELIVERED,
    QUOTA_MIN_RETRY_AFTER,
    Cause,
    Kind,
    Outcome,
    from_credentials_error,
    from_exception,
    from_response,
    from_sdk_exception,
    parse_retry_after,
)

FCM = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def fcm_error(status: int, grpc: str, message: str, code: str | None = None, extra: Any = None) -> dict:
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc}
    details = [{"@type": FCM, "errorCode": code}] if code else []
    if extra:
        details.append(extra)
    if details:
        error["details"] = details
    return {"error": error}


TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"
BAD_REQUEST = {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message"}]}

QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"


def quota_failure(subject: str, description: str) -> dict:
    return {"@type": QUOTA_FAILURE, "violations": [{"subject": subject, "description": description}]}


T, Q, D, C = Cause.TRANSIENT, Cause.QUOTA, Cause.DEVICE_QUOTA, Cause.CREDENTIALS

ROWS = [
    # (status, body, headers, kind, code, cause, sender_mismatch, retry_after)
    (200, {"name": "projects/p/messages/1"}, None, Kind.DELIVERED, "", None, False, None),
    (
        404,
        fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
        None,
        Kind.DEAD_TOKEN,
        "UNREGISTERED",
        None,
        False,
        None,
    ),
    (
        403,
        fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
        None,
        Kind.DEAD_TOKEN,
        "SENDER_ID_MISMATCH",
        None,
        True,
        None,
    ),
    (
        400,
        fcm_error(400, "INVALID_ARGUMENT", TOKEN_MESSAGE, "INVALID_ARGUMENT"),
        None,
        Kind.DEAD_TOKEN,
        "INVALID_ARGUMENT",
        None,
        False,
        None,
    ),
    (
        400,
        fcm_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.", "INVALID_ARGUMENT"),
        None,
        Kind.PAYLOAD_REJECTED,
        "INVALID_ARGUMENT",
        None,
        False,
        None,
    ),
    (
        400,
        fcm_error(
            400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unknown name \"x\" at 'message'", extra=BAD_REQUEST
        ),
        None,
        Kind.PAYLOAD_REJECTED,
        "INVALID_ARGUMENT",
        None,
        False,
        None,
    ),
    # APNs / web-push credentials in the Firebase console: per token, final, and not our OAuth token.
    (
        401,
        fcm_error(401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service", "THIRD_PARTY_AUTH_ERROR"),
        None,
        Kind.CONFIG_ERROR,
        "THIRD_PARTY_AUTH_ERROR",
        None,
        False,
        None,
    ),
    # Our OAuth access token refused, or IAM not (yet) granting the send: an outage of our credentials.
    (
        401,
        fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
        None,
        Kind.RETRY,
        "UNAUTHENTICATED",
        C,
        False,
        None,
    ),
    (401, b"", None, Kind.RETRY, "HTTP_401", C, False, None),
    (
        403,
        fcm_error(403, "PERMISSION_DENIED", "Permission 'cloudmessaging.messages.create' denied on resource."),
        None,
        Kind.RETRY,
        "PERMISSION_DENIED",
        C,
        False,
        None,
    ),
    # QUOTA_EXCEEDED: Retry-After when FCM gives one, else FCM's minimum initial delay of one minute.
    (
        429,
        fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED"),
        {"Retry-After": "120"},
        Kind.RETRY,
        "QUOTA_EXCEEDED",
        Q,
        False,
        120.0,
    ),
    (
        429,
        fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED"),
        None,
        Kind.RETRY,
        "QUOTA_EXCEEDED",
        Q,
        False,
        60.0,
    ),
    (
        429,
        fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded.",
            "QUOTA_EXCEEDED",
            extra=quota_failure("project", "Send requests per minute exceeded"),
        ),
        None,
        Kind.RETRY,
        "QUOTA_EXCEEDED",
        Q,
        False,
        60.0,
    ),
    (
        429,
        fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Sending limit exceeded for the message target.",
            "QUOTA_EXCEEDED",
            extra=quota_failure("device", "Device message rate exceeded"),
        ),
        None,
        Kind.RETRY,
        "QUOTA_EXCEEDED",
        D,
        False,
        60.0,
    ),
    (
        429,
        fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Sending limit exceeded for the message target.",
            "QUOTA_EXCEEDED",
            extra=quota_failure("topic:news", "Topic message rate exceeded"),
        ),
        {"Retry-After": "5"},
        Kind.RETRY,
        "QUOTA_EXCEEDED",
        D,
        False,
        5.0,
    ),
    (
        429,
        fcm_error(429, "RESOURCE_EXHAUSTED", "Topic quota exceeded.", "QUOTA_EXCEEDED"),
        None,
        Kind.RETRY,
        "QUOTA_EXCEEDED",
        D,
        False,
        60.0,
    ),
    (
        429,
        fcm_error(429, "RESOURCE_EXHAUSTED", "Too many requests."),
        None,
        Kind.RETRY,
        "RESOURCE_EXHAUSTED",
        T,
        False,
        None,
    ),
    (408, None, {"Retry-After": "2"}, Kind.RETRY, "HTTP_408", T, False, 2.0),
    (
        503,
        fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"),
        {"retry-after": "1"},
        Kind.RETRY,
        "UNAVAILABLE",
        T,
        False,
        1.0,
    ),
    (
        500,
        fcm_error(500, "INTERNAL", "Internal error encountered.", "INTERNAL"),
        None,
        Kind.RETRY,
        "INTERNAL",
        T,
        False,
        None,
    ),
    (502, "<html>Bad Gateway</html>", {"Retry-After": "7"}, Kind.RETRY, "HTTP_502", T, False, 7.0),
    (504, None, None, Kind.RETRY, "HTTP_504", T, False, None),
    (
        418,
        fcm_error(418, "SOMETHING_NEW", "Unknown.", "SOMETHING_NEW"),
        None,
        Kind.PAYLOAD_REJECTED,
        "SOMETHING_NEW",
        None,
        False,
        None,
    ),
    (409, b"not json", None, Kind.PAYLOAD_REJECTED, "HTTP_409", None, False, None),
    (302, None, None, Kind.RETRY, "HTTP_302", T, False, None),
]


@pytest.mark.parametrize(("status", "body", "headers", "kind", "code", "cause", "mismatch", "retry_after"), ROWS)
def test_response_table(status, body, headers, kind, code, cause, mismatch, retry_after) -> None:
    outcome = from_response(status, body, headers)
    assert outcome.kind is kind
    assert outcome.code == code
    assert outcome.cause is cause
    assert outcome.sender_mismatch is mismatch
    assert outcome.retry_after == retry_after
    assert outcome.maybe_sent is False


@pytest.mark.parametrize(
    ("cause", "charged", "outage"),
    [(None, True, False), (T, True, True), (Q, True, True), (D, True, False), (C, False, True)],
)
def test_charged_and_outage_follow_the_cause(cause: Cause | None, charged: bool, outage: bool) -> None:
    kind = Kind.DELIVERED if cause is None else Kind.RETRY
    outcome = Outcome(kind, cause=cause)
    assert (outcome.charged, outcome.counts_as_outage) == (charged, outage)


def test_outcome_is_cheap() -> None:
    # deliver builds one per answer: slots, frozen, and the 2xx answer is one shared constant.
    assert not hasattr(DELIVERED, "__dict__")
    assert from_response(200, b"{}") is DELIVERED
    with pytest.raises(dataclasses.FrozenInstanceError):
        DELIVERED.kind = Kind.RETRY  # type: ignore[misc]


def test_quota_retry_after_is_at_least_what_fcm_says() -> None:
    body = fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED")
    assert from_response(429, body, {"Retry-After": "300"}).retry_after == 300.0
    assert from_response(429, body, {"Retry-After": "soon"}).retry_after == QUOTA_MIN_RETRY_AFTER


@pytest.mark.parametrize("form", ["dict", "str", "bytes"])
def test_body_forms_are_equivalent(form: str) -> None:
    body: Any = fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
    if form != "dict":
        body = json.dumps(body)
    if form == "bytes":
        body = body.encode()
    outcome = from_response(404, body)
    assert outcome == Outcome(Kind.DEAD_TOKEN, "UNREGISTERED", "Requested entity was not found.")


def test_fcm_error_code_wins_over_http_status() -> None:
    # A 400 whose FcmError says UNREGISTERED is a dead token, not a payload error.
    outcome = from_response(400, fcm_error(400, "INVALID_ARGUMENT", "whatever", "UNREGISTERED"))
    assert outcome.kind is Kind.DEAD_TOKEN


def test_message_never_contains_the_token() -> None:
    token = "abcDEF123:APA91bsecret"
    body = fcm_error(400, "INVALID_ARGUMENT", f"Invalid registration token {token}", "INVALID_ARGUMENT")
    outcome = from_response(400, body, token=token)
    assert token not in outcome.message
    assert outcome.kind is Kind.DEAD_TOKEN


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), ("0", 0.0), ("1.5", 1.5), ("-5", 0.0), ("soon", None), ("", None), (None, None)],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_date() -> None:
    now = time.time()
    future = email.utils.formatdate(now + 90, usegmt=True)
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(future, now=now) == pytest.approx(90, abs=1)
    assert parse_retry_after(past, now=now) == 0.0
    outcome = from_response(503, None, {"Retry-After": future})
    assert outcome.kind is Kind.RETRY
    assert outcome.retry_after is not None
    assert 0 < outcome.retry_after <= 91


@pytest.mark.parametrize(
    ("exc", "code", "maybe_sent"),
    [
        (TimeoutError(), "TIMEOUT", True),
        (http1.AnswerTimeout("slow"), "TIMEOUT", True),
        (http1.ConnectTimeout("slow"), "TIMEOUT", False),
        (http1.ConnectError("refused"), "CONNECTION", False),
        (ConnectionRefusedError(), "CONNECTION", False),
        (http1.ConnectionLost("closed"), "CONNECTION", True),
        (http1.ProtocolError("garbled"), "CONNECTION", True),
        (ConnectionResetError(), "CONNECTION", True),
        (RuntimeError("odd"), "UNKNOWN", True),
    ],
)
def test_exceptions_are_retry(exc: BaseException, code: str, maybe_sent: bool) -> None:
    outcome = from_exception(exc)
    assert outcome.kind is Kind.RETRY
    assert outcome.cause is Cause.TRANSIENT
    assert outcome.code == code
    assert outcome.maybe_sent is maybe_sent


def test_unencodable_message_is_payload_rejected() -> None:
    outcome = from_exception(TypeError("Object of type set is not JSON serializable"))
    assert (outcome.kind, outcome.code, outcome.maybe_sent) == (Kind.PAYLOAD_REJECTED, "INVALID_MESSAGE", False)


def _response(status: int, body: dict, headers: dict[str, str] | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode()
    response.headers.update(headers or {})
    return response


def test_sdk_errors_with_an_http_answer_use_the_same_table() -> None:
    dead = messaging.UnregisteredError(
        "gone",
        http_response=_response(404, fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")),
    )
    assert from_sdk_exception(dead).kind is Kind.DEAD_TOKEN
    quota = messaging.QuotaExceededError(
        "slow down",
        http_response=_response(429, fcm_error(429, "RESOURCE_EXHAUSTED", "q", "QUOTA_EXCEEDED"), {"Retry-After": "4"}),
    )
    assert from_sdk_exception(quota) == Outcome(Kind.RETRY, "QUOTA_EXCEEDED", "q", retry_after=4.0, cause=Cause.QUOTA)
    bad = fb.InvalidArgumentError(
        "bad", http_response=_response(400, fcm_error(400, "INVALID_ARGUMENT", TOKEN_MESSAGE, "INVALID_ARGUMENT"))
    )
    assert from_sdk_exception(bad).kind is Kind.DEAD_TOKEN


def test_sdk_errors_without_an_http_answer() -> None:
    refused = requests.exceptions.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/", urllib3.exceptions.NewConnectionError(None, "refused"))
    )
    outcome = from_sdk_exception(fb.UnavailableError("no connection", cause=refused))
    assert (outcome.kind, outcome.code, outcome.maybe_sent) == (Kind.RETRY, "CONNECTION", False)
    reset = requests.exceptions.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted."))
    assert from_sdk_exception(fb.UnavailableError("lost", cause=reset)).maybe_sent is True
    timeout = fb.DeadlineExceededError("slow", cause=requests.exceptions.ReadTimeout("read timed out"))
    outcome = from_sdk_exception(timeout)
    assert (outcome.kind, outcome.code, outcome.maybe_sent) == (Kind.RETRY, "TIMEOUT", True)


def test_sdk_credential_and_validation_errors() -> None:
    # A credential that cannot be refreshed (a revoked key, a deleted secret version, the metadata server
    # or the token endpoint unreachable) is an outage of ours, never the token's: RETRY, not charged.
    for exc in (
        auth_exc.RefreshError("invalid_grant"),
        auth_exc.RefreshError("try later", retryable=True),
        fb.UnknownError("batch failed", cause=auth_exc.RefreshError("invalid_grant")),
        auth_exc.TransportError("dns"),
        auth_exc.DefaultCredentialsError("no ADC"),
        fb.PermissionDeniedError("no"),
        fb.UnauthenticatedError("no"),
    ):
        outcome = from_sdk_exception(exc)
        assert (outcome.kind, outcome.cause, outcome.charged, outcome.maybe_sent) == (
            Kind.RETRY,
            Cause.CREDENTIALS,
            False,
            False,
        ), exc
    assert from_sdk_exception(ValueError("Message.data must not contain non-string values.")).kind is (
        Kind.PAYLOAD_REJECTED
    )
    internal = from_sdk_exception(fb.InternalError("boom"))
    assert (internal.kind, internal.cause) == (Kind.RETRY, Cause.TRANSIENT)


def test_sdk_401_and_403_answers_use_the_same_table() -> None:
    refused = fb.UnauthenticatedError(
        "no", http_response=_response(401, fcm_error(401, "UNAUTHENTICATED", "Request had invalid credentials."))
    )
    assert (from_sdk_exception(refused).kind, from_sdk_exception(refused).cause) == (Kind.RETRY, Cause.CREDENTIALS)
    apns = messaging.ThirdPartyAuthError(
        "apns",
        http_response=_response(401, fcm_error(401, "UNAUTHENTICATED", "Auth error", "THIRD_PARTY_AUTH_ERROR")),
    )
    assert from_sdk_exception(apns).kind is Kind.CONFIG_ERROR


def test_credentials_error_is_an_uncharged_outage_and_nothing_was_sent() -> None:
    outcome = from_credentials_error(TimeoutError())
    assert (outcome.kind, outcome.cause, outcome.code) == (Kind.RETRY, Cause.CREDENTIALS, "CREDENTIALS")
    assert (outcome.charged, outcome.counts_as_outage, outcome.maybe_sent) == (False, True, False)
    assert "TimeoutError" in outcome.message
