"""Where the FCM access token comes from: one place, three sources.

1. ``FCM_ENDPOINT`` set (local runs, tests): a static bearer token ``pushline-local``; no Google
   OAuth at all, so nothing local can mint a real token.
2. ``FCM_CREDENTIALS_SECRET`` (``projects/P/secrets/S/versions/latest``): a service-account JSON
   key read once per instance from Secret Manager.
3. Otherwise Application Default Credentials (the function's runtime service account).

Neither the key nor the token is ever logged.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import time
from typing import Any

import google.auth
import google.auth.credentials
import google.auth.transport.requests

from shared.config import Settings

log = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
LOCAL_TOKEN = "pushline-local"
# Refresh this long before the token's expiry, so no request goes out with a token about to lapse.
REFRESH_MARGIN_SECONDS = 300.0


class StaticTokenCredentials(google.auth.credentials.Credentials):
    """A credential whose token is a fixed string and whose refresh needs no network."""

    def __init__(self, token: str = LOCAL_TOKEN) -> None:
        super().__init__()
        self._static = token
        self.token = token

    def refresh(self, request: Any) -> None:
        self.token = self._static


def load_secret(
    name: str,
    *,
    api_endpoint: str | None = None,
    credentials: google.auth.credentials.Credentials | None = None,
) -> bytes:
    """The payload of a Secret Manager secret version (``projects/P/secrets/S/versions/V``).

    ``api_endpoint`` (e.g. ``http://127.0.0.1:8099``) and ``credentials`` (e.g. anonymous ones)
    let a test point the real client at a local server speaking Secret Manager's REST API.
    """
    from google.cloud import secretmanager  # imported here: only this path needs it

    options = {"api_endpoint": api_endpoint} if api_endpoint else None
    client = secretmanager.SecretManagerServiceClient(credentials=credentials, transport="rest", client_options=options)
    response = client.access_secret_version(request={"name": name})
    data = response.payload.data
    if response.payload.data_crc32c:
        import google_crc32c

        if int(google_crc32c.value(data)) != int(response.payload.data_crc32c):
            raise ValueError(f"secret {name}: payload checksum mismatch")
    return data


@functools.cache
def _service_account_credentials(
    secret: str, api_endpoint: str | None, client_credentials: google.auth.credentials.Credentials | None
) -> google.auth.credentials.Credentials:
    """Read the key once per instance (cached), keep only the Credentials object."""
    from google.oauth2 import service_account

    info = json.loads(load_secret(secret, api_endpoint=api_endpoint, credentials=client_credentials))
    log.info("FCM credentials: service account from Secret Manager secret %s", secret)
    return service_account.Credentials.from_service_account_info(info, scopes=[FCM_SCOPE])


def fcm_credentials(
    s: Settings,
    *,
    secret_api_endpoint: str | None = None,
    secret_client_credentials: google.auth.credentials.Credentials | None = None,
) -> google.auth.credentials.Credentials:
    """The credential FCM requests are signed with — the one place that chooses it."""
    if s.fcm_endpoint:  # local / test: static token, never a real Google token
        return StaticTokenCredentials()
    if s.fcm_credentials_secret:  # a service-account key kept in Secret Manager
        return _service_account_credentials(s.fcm_credentials_secret, secret_api_endpoint, secret_client_credentials)
    creds, _project = google.auth.default(scopes=[FCM_SCOPE])  # the runtime's own service account
    return creds


class AccessTokenProvider:
    """Hands out a valid access token; refreshes in a thread, one refresh at a time."""

    def __init__(self, credentials: google.auth.credentials.Credentials) -> None:
        self._credentials = credentials
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._fresh_until = 0.0  # time.monotonic() deadline; 0 forces a refresh
        self.refreshes = 0

    def cached(self) -> str | None:
        """The current token while it is fresh (no await: the hot path of every send), else None."""
        token = self._token
        if token is not None and time.monotonic() < self._fresh_until:
            return token
        return None

    async def token(self) -> str:
        token = self._token
        if token is not None and time.monotonic() < self._fresh_until:
            return token
        async with self._lock:
            if self._token is None or time.monotonic() >= self._fresh_until:
                await asyncio.to_thread(self._refresh)
            assert self._token is not None
            return self._token

    def invalidate(self, token: str | None = None) -> None:
        """Force a refresh before the next request (after a 401).

        Pass the token that was rejected: a 401 for a token already replaced changes nothing,
        so a burst of 401s from one expired token causes one refresh, not hundreds.
        """
        if token is None or token == self._token:
            self._fresh_until = 0.0

    def _refresh(self) -> None:
        creds = self._credentials
        creds.refresh(google.auth.transport.requests.Request())
        self.refreshes += 1
        self._token = creds.token
        expiry = creds.expiry  # naive UTC datetime, or None for a token that never expires
        if expiry is None:
            self._fresh_until = float("inf")
        else:
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            left = (expiry - now).total_seconds()
            self._fresh_until = time.monotonic() + max(0.0, left - min(REFRESH_MARGIN_SECONDS, left / 2))


def token_provider(s: Settings) -> AccessTokenProvider:
    return AccessTokenProvider(fcm_credentials(s))
