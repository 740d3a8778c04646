"""Who is calling: a Firebase ID token, verified with firebase-admin.

With ``FIREBASE_AUTH_EMULATOR_HOST`` set, firebase-admin accepts the Auth emulator's unsigned
tokens (``alg: none``) and still checks audience, issuer and subject: that is how local runs and
tests authenticate. ``config.check_cloud_safety`` refuses that switch in the cloud.

A token firebase-admin has verified is remembered by this instance until its ``exp`` (at most an
hour, Firebase's ID-token lifetime): a client that calls again with the same token is not verified
again. The cache holds a SHA-256 hash of the token (never the token), the uid and the expiry, for
at most ``MAX_CACHED_TOKENS`` tokens (least recently used dropped first). Like firebase-admin's own
default (``check_revoked=False``), a revoked token is accepted until it expires.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import firebase_admin
from firebase_admin import auth

from shared.config import settings
from shared.errors import Unavailable

APP_NAME = "pushline-auth"

# TEST ONLY: where firebase-admin fetches Google's ID-token certificates (None: Google's own URL).
# Tests point it at a local server to check real RS256 verification offline, through
# ``use_certificates_url``; it is deliberately never read from the environment or configuration.
_certificates_url: str | None = None


class CertificatesUnavailable(Unavailable):
    what = "Google's ID-token certificates"


class AuthError(Exception):
    """The ID token is missing, malformed, expired, revoked or not for this project."""


_app_lock = threading.Lock()


@functools.cache
def _app() -> firebase_admin.App:
    with _app_lock:  # the first requests of an instance arrive on several threads at once
        return _make_app()


def _make_app() -> firebase_admin.App:
    project = settings().google_cloud_project
    try:
        app = firebase_admin.get_app(APP_NAME)
    except ValueError:
        # No credential needed to verify ID tokens: only the project id and Google's public certs.
        app = firebase_admin.initialize_app(credential=_NoCredential(), options={"projectId": project}, name=APP_NAME)
    if _certificates_url is not None:  # tests only (see use_certificates_url)
        auth._get_client(app)._token_verifier.id_token_verifier.cert_url = _certificates_url
    return app


class _NoCredential(firebase_admin.credentials.Base):
    """Verifying ID tokens needs no credential; this keeps firebase-admin from looking for one."""

    def get_credential(self) -> Any:
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()


MAX_CACHED_TOKENS = 4096  # per instance; an entry is ~200 bytes
MAX_TOKEN_LIFETIME_SECONDS = 3600  # Firebase ID tokens live an hour: no entry is kept longer


class _Entry(NamedTuple):
    uid: str
    expires: float  # the token's exp (capped), seconds since the epoch
    context: tuple[str | None, bool]  # project and emulator switch it was verified under


class VerifiedTokens:
    """Verified ID tokens until their expiry, keyed by the token's SHA-256: a thread-safe LRU."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float, context: tuple[str | None, bool]) -> str | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires <= now or entry.context != context:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry.uid

    def put(self, key: bytes, entry: _Entry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)


@functools.cache
def _verified() -> VerifiedTokens:
    return VerifiedTokens(MAX_CACHED_TOKENS)


def _now() -> float:
    return time.time()


def _context() -> tuple[str | None, bool]:
    return settings().google_cloud_project, bool(os.environ.get("FIREBASE_AUTH_EMULATOR_HOST"))


def verify(id_token: str) -> str:
    """The Firebase uid the ID token names, or AuthError. Verified by firebase-admin the first time,
    then taken from this instance's cache until the token expires."""
    now, context = _now(), _context()
    key = hashlib.sha256(id_token.encode("utf-8", "surrogatepass")).digest()
    uid = _verified().get(key, now, context)
    if uid is not None:
        return uid
    claims = _verify_with_firebase(id_token)
    uid = claims.get("uid") or claims.get("sub")
    if not isinstance(uid, str) or not uid:
        raise AuthError("ID token has no subject")
    exp = claims.get("exp")
    # firebase-admin checks exp on signed tokens, not on the emulator's: check it here for both,
    # on the same clock the cache uses
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= now:
        raise AuthError("invalid ID token: ExpiredIdTokenError")
    _verified().put(key, _Entry(uid, min(float(exp), now + MAX_TOKEN_LIFETIME_SECONDS), context))
    return uid


def _verify_with_firebase(id_token: str) -> dict[str, Any]:
    try:
        claims = auth.verify_id_token(id_token, app=_app())
    except (ValueError, auth.InvalidIdTokenError, auth.ExpiredIdTokenError, auth.RevokedIdTokenError) as exc:
        raise AuthError(f"invalid ID token: {type(exc).__name__}") from None
    except auth.CertificateFetchError:
        # our dependency's outage, not the caller's fault: 503, so clients retry instead of signing out
        raise CertificatesUnavailable() from None
    if not isinstance(claims, dict):
        raise AuthError("invalid ID token: claims are not an object")
    return claims


def use_certificates_url(url: str | None) -> None:
    """TEST ONLY: verify ID tokens against the certificates at ``url`` (``{kid: PEM}``), or Google's
    again with None. Production code never calls this."""
    global _certificates_url
    _certificates_url = url
    reset()


def reset() -> None:
    """Drop the firebase-admin app and the verified tokens (tests change the project between cases)."""
    if _app.cache_info().currsize:
        firebase_admin.delete_app(_app())
    _app.cache_clear()
    _verified.cache_clear()
