"""Who is calling: a Firebase ID token, verified with firebase-admin.

With ``FIREBASE_AUTH_EMULATOR_HOST`` set, firebase-admin accepts the Auth emulator's unsigned
tokens (``alg: none``) and still checks audience, issuer and subject: that is how local runs and
tests authenticate. ``config.check_cloud_safety`` refuses that switch in the cloud.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

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


def verify(id_token: str) -> str:
    """The Firebase uid the ID token names, or AuthError."""
    try:
        claims = auth.verify_id_token(id_token, app=_app())
    except (ValueError, auth.InvalidIdTokenError, auth.ExpiredIdTokenError, auth.RevokedIdTokenError) as exc:
        raise AuthError(f"invalid ID token: {type(exc).__name__}") from None
    except auth.CertificateFetchError:
        # our dependency's outage, not the caller's fault: 503, so clients retry instead of signing out
        raise CertificatesUnavailable() from None
    uid = claims.get("uid") or claims.get("sub")
    if not isinstance(uid, str) or not uid:
        raise AuthError("ID token has no subject")
    return uid


def use_certificates_url(url: str | None) -> None:
    """TEST ONLY: verify ID tokens against the certificates at ``url`` (``{kid: PEM}``), or Google's
    again with None. Production code never calls this."""
    global _certificates_url
    _certificates_url = url
    reset()


def reset() -> None:
    """Drop the firebase-admin app (tests change the project between cases)."""
    if _app.cache_info().currsize:
        firebase_admin.delete_app(_app())
    _app.cache_clear()
