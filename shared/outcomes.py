"""The closed set of FCM send outcomes, and the one table from FCM errors to them.

This is the only module that looks at FCM error codes. Everything else reads ``Outcome.kind`` and,
for a RETRY, ``Outcome.cause`` (why, and so who waits). The code is FCM's ``errorCode`` from the
``error.details[]`` entry of type ``type.googleapis.com/google.firebase.fcm.v1.FcmError`` (the HTTP
status alone is ambiguous: a 400 can be a bad token or a bad payload).

| answer from FCM                                               | kind               | cause        |
|---------------------------------------------------------------|--------------------|--------------|
| 2xx                                                           | DELIVERED          |              |
| UNREGISTERED (404)                                            | DEAD_TOKEN         |              |
| SENDER_ID_MISMATCH (403)                                      | DEAD_TOKEN, sender_mismatch=True | |
| INVALID_ARGUMENT whose message names the registration token   | DEAD_TOKEN         |              |
| INVALID_ARGUMENT, any other (payload, TTL, data key, size...) | PAYLOAD_REJECTED   |              |
| THIRD_PARTY_AUTH_ERROR (APNs / web push credentials)          | CONFIG_ERROR       |              |
| 401 without a token-level code (our OAuth access token)       | RETRY              | CREDENTIALS  |
| 403 without a token-level code (IAM: the send permission)     | RETRY              | CREDENTIALS  |
| credentials that cannot be refreshed (``from_credentials_error``, google-auth errors) | RETRY | CREDENTIALS |
| QUOTA_EXCEEDED (429) naming a device or topic quota           | RETRY (+Retry-After, else 60 s) | DEVICE_QUOTA |
| QUOTA_EXCEEDED (429), any other (the project's quota)         | RETRY (+Retry-After, else 60 s) | QUOTA |
| UNAVAILABLE (503), INTERNAL (500), any other 5xx, 429 or 408  | RETRY (+Retry-After) | TRANSIENT  |
| timeout, connection refused/reset (no HTTP answer)            | RETRY, code TIMEOUT / CONNECTION | TRANSIENT |
| message cannot be encoded (TypeError/ValueError, never sent)  | PAYLOAD_REJECTED, code INVALID_MESSAGE | |
| any other 4xx (unknown code)                                  | PAYLOAD_REJECTED   |              |
| anything else (1xx/3xx, unparseable)                          | RETRY              | TRANSIENT    |

``retry_after`` is taken from a ``Retry-After`` header (delta-seconds or an HTTP date) on every
RETRY answer that has one; QUOTA_EXCEEDED without one gets ``QUOTA_MIN_RETRY_AFTER`` (60 s, FCM's
minimum initial delay). ``maybe_sent`` is True when the request may have reached FCM although no
answer came back (read timeout, connection lost mid-answer): the caller may then deliver twice if it
retries. ``message`` is FCM's text with the token (when known) redacted, never the token.

Which quota: FCM's ErrorCode reference says a QUOTA_EXCEEDED answer carries a
``google.rpc.QuotaFailure`` whose violations (``subject``, ``description``) name the quota that was
exceeded — the project's message rate, one device's, or one topic's — without documenting their exact
words. A violation (or FCM's message, e.g. "Topic quota exceeded.") that mentions a device or a topic
is DEVICE_QUOTA: only that token waits. Anything else is QUOTA, the safe reading: the project is
over its quota and every send should slow down.

``Outcome.charged`` is False for CREDENTIALS (such answers are ours, not the token's, and never spend
one of its ``MAX_ATTEMPTS``); ``Outcome.counts_as_outage`` is True for TRANSIENT, QUOTA and
CREDENTIALS (the answers a breaker counts against FCM or our side of it).
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared import http1

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
QUOTA_FAILURE_TYPE = "type.googleapis.com/google.rpc.QuotaFailure"

# Codes that say the registration token itself is finished: delete it, never retry it.
TOKEN_FATAL_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
# Codes that say this message can never be delivered as it is (the token may be fine).
MESSAGE_FATAL_CODES = frozenset({"INVALID_ARGUMENT"})
# Codes that say our project's APNs / web push configuration is broken (not the token, not the message).
CONFIG_FATAL_CODES = frozenset({"THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR"})
# Codes worth another attempt later (QUOTA_EXCEEDED has rules of its own).
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "INTERNAL"})
QUOTA_CODE = "QUOTA_EXCEEDED"
# An INVALID_ARGUMENT whose message contains one of these is about the token, not the payload.
TOKEN_INVALID_MARKERS = ("registration token", "message.token")
# A QUOTA_EXCEEDED whose QuotaFailure (or message) contains one of these is a per-target quota.
TARGET_QUOTA_MARKERS = ("device", "topic")
# FCM: "use exponential backoff with a minimum initial delay of 1 minute" when there is no Retry-After.
QUOTA_MIN_RETRY_AFTER = 60.0

_MAX_MESSAGE = 300


class Kind(enum.Enum):
    DELIVERED = "delivered"
    DEAD_TOKEN = "dead_token"
    PAYLOAD_REJECTED = "payload_rejected"
    CONFIG_ERROR = "config_error"
    RETRY = "retry"


class Cause(enum.Enum):
    """Why a RETRY answer is worth another attempt, and so who waits."""

    TRANSIENT = "transient"  # FCM or the network had a moment: this token backs off
    QUOTA = "quota"  # the project's quota: every send slows down
    DEVICE_QUOTA = "device_quota"  # one device's (or topic's) rate: only that token waits
    CREDENTIALS = "credentials"  # our access token, IAM or a credentials refresh: not the token's fault


_CREDENTIALS = Cause.CREDENTIALS
_DEVICE_QUOTA = Cause.DEVICE_QUOTA


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    code: str = ""  # FCM errorCode (or the gRPC status when FCM gave none), or 'TIMEOUT'/'CONNECTION'/'CREDENTIALS'
    message: str = ""  # FCM's message text, never the token
    retry_after: float | None = None
    sender_mismatch: bool = False
    maybe_sent: bool = False  # True when the request may have reached FCM without an answer coming back
    cause: Cause | None = None  # set on every RETRY, None otherwise

    @property
    def charged(self) -> bool:
        """Whether this answer spends one of the token's MAX_ATTEMPTS (not when our credentials failed)."""
        return self.cause is not _CREDENTIALS

    @property
    def counts_as_outage(self) -> bool:
        """Whether this answer says FCM, the project's quota or our credentials are failing (not one token)."""
        cause = self.cause
        return cause is not None and cause is not _DEVICE_QUOTA


DELIVERED = Outcome(Kind.DELIVERED)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_dict(body: bytes | str | dict | None) -> dict[str, Any]:
    if isinstance(body, bytes | bytearray):
        try:
            body = body.decode("utf-8", "replace")
        except (AttributeError, ValueError):
            return {}
    if isinstance(body, str):
        try:
            body = json.loads(body) if body.strip() else None
        except ValueError:
            return {}
    if not isinstance(body, dict):
        return {}
    error = body.get("error")
    return error if isinstance(error, dict) else {}


def _fcm_code(error: Mapping[str, Any]) -> str:
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
            return str(detail.get("errorCode") or "")
    return ""


def _clean(message: str, token: str | None) -> str:
    if token:
        message = message.replace(token, "<token>")
    return message[:_MAX_MESSAGE]


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name.lower()), None)
    return value


def _quota_cause(error: Mapping[str, Any], message: str) -> Cause:
    """DEVICE_QUOTA when FCM names a device or topic quota (QuotaFailure violations, or its message)."""
    said = [message]
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type") == QUOTA_FAILURE_TYPE:
            for violation in detail.get("violations") or ():
                if isinstance(violation, dict):
                    said += (str(violation.get("subject") or ""), str(violation.get("description") or ""))
    text = " ".join(said).lower()
    return Cause.DEVICE_QUOTA if any(marker in text for marker in TARGET_QUOTA_MARKERS) else Cause.QUOTA


def from_response(
    status: int,
    body: bytes | str | dict | None,
    headers: Mapping[str, str] | None = None,
    *,
    token: str | None = None,
) -> Outcome:
    """The outcome of one FCM HTTP v1 answer. ``token`` (optional) is redacted from the message."""
    if 200 <= status < 300:
        return DELIVERED
    error = _error_dict(body)
    fcm_code = _fcm_code(error)
    code = fcm_code or str(error.get("status") or f"HTTP_{status}")
    message = _clean(str(error.get("message") or ""), token)

    if fcm_code in TOKEN_FATAL_CODES:
        return Outcome(Kind.DEAD_TOKEN, code, message, sender_mismatch=fcm_code == "SENDER_ID_MISMATCH")
    if fcm_code in MESSAGE_FATAL_CODES or (not fcm_code and code == "INVALID_ARGUMENT"):
        lowered = message.lower()
        if any(marker in lowered for marker in TOKEN_INVALID_MARKERS):
            return Outcome(Kind.DEAD_TOKEN, code, message)
        return Outcome(Kind.PAYLOAD_REJECTED, code, message)
    if fcm_code in CONFIG_FATAL_CODES:
        return Outcome(Kind.CONFIG_ERROR, code, message)
    retry_after = parse_retry_after(_header(headers, "Retry-After"))
    if fcm_code == QUOTA_CODE:
        retry_after = QUOTA_MIN_RETRY_AFTER if retry_after is None else retry_after
        return Outcome(Kind.RETRY, code, message, retry_after=retry_after, cause=_quota_cause(error, message))
    if fcm_code in RETRYABLE_CODES or status >= 500 or status in (408, 429):
        return Outcome(Kind.RETRY, code, message, retry_after=retry_after, cause=Cause.TRANSIENT)
    if status in (401, 403):  # no token-level code: our access token, or our service account's permission
        return Outcome(Kind.RETRY, code, message, cause=Cause.CREDENTIALS)
    if 400 <= status < 500:
        return Outcome(Kind.PAYLOAD_REJECTED, code, message)
    return Outcome(Kind.RETRY, code, message, retry_after=retry_after, cause=Cause.TRANSIENT)


def refuses_access_token(status: int, outcome: Outcome) -> bool:
    """True for FCM's answer to an access token it does not accept (HTTP 401, no token-level code):
    refresh the token and try once more. A THIRD_PARTY_AUTH_ERROR 401 is about APNs / web push, not it."""
    return status == 401 and outcome.cause is Cause.CREDENTIALS


def from_credentials_error(exc: BaseException) -> Outcome:
    """The outcome of a send that got no access token (the refresh failed or timed out): nothing was
    sent, and the fault is ours (Secret Manager, the key, the metadata server or the token endpoint)."""
    detail = str(exc)[:200]
    text = f"cannot get an FCM access token: {type(exc).__name__}" + (f": {detail}" if detail else "")
    return Outcome(Kind.RETRY, "CREDENTIALS", text[:_MAX_MESSAGE], cause=Cause.CREDENTIALS)


def from_exception(exc: BaseException) -> Outcome:
    """The outcome of a request that got no HTTP answer (``shared.http1`` / asyncio / OS errors)."""
    if isinstance(exc, TypeError | ValueError):  # raised while encoding, before anything was sent
        return Outcome(Kind.PAYLOAD_REJECTED, "INVALID_MESSAGE", f"message cannot be encoded: {exc}"[:_MAX_MESSAGE])
    if isinstance(exc, http1.ConnectTimeout):
        return Outcome(Kind.RETRY, "TIMEOUT", "timed out connecting to FCM", cause=Cause.TRANSIENT)
    if isinstance(exc, http1.AnswerTimeout | TimeoutError):  # asyncio.TimeoutError is TimeoutError on 3.11
        return Outcome(Kind.RETRY, "TIMEOUT", "no answer from FCM in time", maybe_sent=True, cause=Cause.TRANSIENT)
    if isinstance(exc, http1.ConnectError | ConnectionRefusedError):
        # DNS, refused, unreachable, TLS handshake: no connection, so nothing was sent.
        text = f"cannot connect to FCM: {type(exc).__name__}"
        return Outcome(Kind.RETRY, "CONNECTION", text, cause=Cause.TRANSIENT)
    if isinstance(exc, http1.HttpError | OSError):
        # Server disconnected, connection reset, truncated or garbled answer: the request may have arrived.
        text = f"connection to FCM lost: {type(exc).__name__}"
        return Outcome(Kind.RETRY, "CONNECTION", text, maybe_sent=True, cause=Cause.TRANSIENT)
    text = f"unexpected error: {type(exc).__name__}"
    return Outcome(Kind.RETRY, "UNKNOWN", text, maybe_sent=True, cause=Cause.TRANSIENT)


def _requests_maybe_sent(cause: BaseException | None) -> bool:
    """For a requests ConnectionError: False only when no connection was ever made."""
    with contextlib.suppress(ImportError):
        import urllib3.exceptions

        reason = getattr(cause.args[0], "reason", None) if cause is not None and cause.args else None
        if isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError):
            return False
        if isinstance(cause, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError):
            return False
    return True


# gRPC-style codes of firebase_admin.exceptions.FirebaseError when there is no HTTP answer to read.
_SDK_CODE_KINDS = {
    "INVALID_ARGUMENT": Kind.PAYLOAD_REJECTED,
    "FAILED_PRECONDITION": Kind.PAYLOAD_REJECTED,
    "OUT_OF_RANGE": Kind.PAYLOAD_REJECTED,
    "NOT_FOUND": Kind.PAYLOAD_REJECTED,
    "ALREADY_EXISTS": Kind.PAYLOAD_REJECTED,
    "CONFLICT": Kind.PAYLOAD_REJECTED,
}
_SDK_CREDENTIAL_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


def from_sdk_exception(exc: Exception) -> Outcome:
    """The outcome of a firebase-admin failure (``FirebaseError``, a refresh error, a ValueError)."""
    from firebase_admin import exceptions as fb  # imported here: only the SDK client needs it
    from google.auth import exceptions as auth_exc

    if isinstance(exc, auth_exc.GoogleAuthError):  # the credential could not be refreshed: nothing was sent
        return from_credentials_error(exc)
    if isinstance(exc, ValueError):  # the SDK refused the message before sending it
        return Outcome(Kind.PAYLOAD_REJECTED, "INVALID_MESSAGE", str(exc)[:_MAX_MESSAGE])
    if not isinstance(exc, fb.FirebaseError):
        text = f"unexpected error: {type(exc).__name__}"
        return Outcome(Kind.RETRY, "UNKNOWN", text, maybe_sent=True, cause=Cause.TRANSIENT)

    response = exc.http_response
    if response is not None:
        return from_response(response.status_code, response.content, response.headers)
    cause = exc.cause
    if isinstance(cause, auth_exc.GoogleAuthError):
        return from_credentials_error(cause)
    if isinstance(exc, fb.DeadlineExceededError):
        maybe_sent = _requests_maybe_sent(cause)
        return Outcome(
            Kind.RETRY, "TIMEOUT", "no answer from FCM in time", maybe_sent=maybe_sent, cause=Cause.TRANSIENT
        )
    if isinstance(exc, fb.UnavailableError):
        maybe_sent = _requests_maybe_sent(cause)
        text = "connection to FCM lost" if maybe_sent else "cannot connect to FCM"
        return Outcome(Kind.RETRY, "CONNECTION", text, maybe_sent=maybe_sent, cause=Cause.TRANSIENT)
    code = str(exc.code)
    if code in _SDK_CREDENTIAL_CODES:
        return Outcome(Kind.RETRY, code, str(exc)[:_MAX_MESSAGE], cause=Cause.CREDENTIALS)
    kind = _SDK_CODE_KINDS.get(code)
    if kind is not None:
        return Outcome(kind, code, str(exc)[:_MAX_MESSAGE])
    return Outcome(Kind.RETRY, code, str(exc)[:_MAX_MESSAGE], maybe_sent=True, cause=Cause.TRANSIENT)
