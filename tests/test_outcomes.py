"""Every row of the FCM error -> Outcome table, Retry-After parsing, and exception mapping."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import aiohttp
import pytest
import requests
import urllib3.exceptions
from firebase_admin import exceptions as fb
from firebase_admin import messaging
from google.auth import exceptions as auth_exc

from shared.outcomes import Kind, Outcome, from_exception, from_response, from_sdk_exception, parse_retry_after

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

ROWS = [
    # (status, body, headers, kind, code, sender_mismatch, retry_after)
    (200, {"name": "projects/p/messages/1"}, None, Kind.DELIVERED, "", False, None),
    (
        404,
        fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
        None,
        Kind.DEAD_TOKEN,
        "UNREGISTERED",
        False,
        None,
    ),
    (
        403,
        fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
        None,
        Kind.DEAD_TOKEN,
        "SENDER_ID_MISMATCH",
        True,
        None,
    ),
    (
        400,
        fcm_error(400, "INVALID_ARGUMENT", TOKEN_MESSAGE, "INVALID_ARGUMENT"),
        None,
        Kind.DEAD_TOKEN,
        "INVALID_ARGUMENT",
        False,
        None,
    ),
    (
        400,
        fcm_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.", "INVALID_ARGUMENT"),
        None,
        Kind.PAYLOAD_REJECTED,
        "INVALID_ARGUMENT",
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
        False,
        None,
    ),
    (
        401,
        fcm_error(401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service", "THIRD_PARTY_AUTH_ERROR"),
        None,
        Kind.CONFIG_ERROR,
        "THIRD_PARTY_AUTH_ERROR",
        False,
        None,
    ),
    (
        401,
        fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
        None,
        Kind.CONFIG_ERROR,
        "UNAUTHENTICATED",
        False,
        None,
    ),
    (
        403,
        fcm_error(403, "PERMISSION_DENIED", "Permission denied."),
        None,
        Kind.CONFIG_ERROR,
        "PERMISSION_DENIED",
        False,
        None,
    ),
    (
        429,
        fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED"),
        {"Retry-After": "30"},
        Kind.RETRY,
        "QUOTA_EXCEEDED",
        False,
        30.0,
    ),
    (
        503,
        fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"),
        {"retry-after": "1"},
        Kind.RETRY,
        "UNAVAILABLE",
        False,
        1.0,
    ),
    (
        500,
        fcm_error(500, "INTERNAL", "Internal error encountered.", "INTERNAL"),
        None,
        Kind.RETRY,
        "INTERNAL",
        False,
        None,
    ),
    (502, "<html>Bad Gateway</html>", {"Retry-After": "7"}, Kind.RETRY, "HTTP_502", False, 7.0),
    (504, None, None, Kind.RETRY, "HTTP_504", False, None),
    (
        418,
        fcm_error(418, "SOMETHING_NEW", "Unknown.", "SOMETHING_NEW"),
        None,
        Kind.PAYLOAD_REJECTED,
        "SOMETHING_NEW",
        False,
        None,
    ),
    (409, b"not json", None, Kind.PAYLOAD_REJECTED, "HTTP_409", False, None),
    (302, None, None, Kind.RETRY, "HTTP_302", False, None),
]


@pytest.mark.parametrize(("status", "body", "headers", "kind", "code", "mismatch", "retry_after"), ROWS)
def test_response_table(status, body, headers, kind, code, mismatch, retry_after) -> None:
    outcome = from_response(status, body, headers)
    assert outcome.kind is kind
    assert outcome.code == code
    assert outcome.sender_mismatch is mismatch
    assert outcome.retry_after == retry_after
    assert outcome.maybe_sent is False


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


def _connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))


@pytest.mark.parametrize(
    ("exc", "code", "maybe_sent"),
    [
        (TimeoutError(), "TIMEOUT", True),
        (aiohttp.SocketTimeoutError(), "TIMEOUT", True),
        (aiohttp.ConnectionTimeoutError(), "TIMEOUT", False),
        (_connector_error(), "CONNECTION", False),
        (ConnectionRefusedError(), "CONNECTION", False),
        (aiohttp.ServerDisconnectedError(), "CONNECTION", True),
        (aiohttp.ClientPayloadError("truncated"), "CONNECTION", True),
        (ConnectionResetError(), "CONNECTION", True),
        (RuntimeError("odd"), "UNKNOWN", True),
    ],
)
def test_exceptions_are_retry(exc: BaseException, code: str, maybe_sent: bool) -> None:
    outcome = from_exception(exc)
    assert outcome.kind is Kind.RETRY
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
    assert from_sdk_exception(quota) == Outcome(Kind.RETRY, "QUOTA_EXCEEDED", "q", retry_after=4.0)
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
    assert from_sdk_exception(auth_exc.RefreshError("invalid_grant")).kind is Kind.CONFIG_ERROR
    assert from_sdk_exception(auth_exc.RefreshError("try later", retryable=True)).kind is Kind.RETRY
    wrapped = fb.UnknownError("batch failed", cause=auth_exc.RefreshError("invalid_grant"))
    assert from_sdk_exception(wrapped).kind is Kind.CONFIG_ERROR
    assert from_sdk_exception(auth_exc.TransportError("dns")).kind is Kind.RETRY
    assert from_sdk_exception(ValueError("Message.data must not contain non-string values.")).kind is (
        Kind.PAYLOAD_REJECTED
    )
    assert from_sdk_exception(fb.PermissionDeniedError("no")).kind is Kind.CONFIG_ERROR
    assert from_sdk_exception(fb.InternalError("boom")).kind is Kind.RETRY
