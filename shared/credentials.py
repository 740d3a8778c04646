"""Where the FCM access token comes from, and what happens when it cannot be had.

1. ``FCM_ENDPOINT`` set (local runs, tests): a static bearer token ``pushline-local``; no Google
   OAuth at all, so nothing local can mint a real token.
2. ``FCM_CREDENTIALS_SECRET`` (``projects/P/secrets/S/versions/latest``): a service-account JSON
   key read once per instance from Secret Manager, on the first refresh.
3. Otherwise Application Default Credentials (the function's runtime service account), also looked
   up on the first refresh.

Nothing is read when the client is made: a Secret Manager, key or metadata server that fails is a
refresh that fails (an outage the sender rides out, with ``CredentialsAlarm`` naming the fix),
never an instance that cannot start. ``AccessTokenProvider`` (the HTTP client, async) and
``RefreshGate`` (the SDK client, threads) refresh one at a time per instance: every request refused
while a refresh runs waits for that refresh's result instead of starting its own.

Neither the key nor the token is ever logged.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests

from shared import logs
from shared.config import Settings

log = logs.get("credentials")

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
LOCAL_TOKEN = "pushline-local"
# Refresh this long before the token's expiry, so no request goes out with a token about to lapse.
REFRESH_MARGIN_SECONDS = 300.0
# After a failed refresh, callers within this long get that failure instead of a new attempt, so an
# outage of Secret Manager or the metadata server is not hammered by every send.
REFRESH_FAILURE_HOLD_SECONDS = 1.0
SEND_PERMISSION = "cloudmessaging.messages.create"
ALARM_INTERVAL_SECONDS = 60.0

Clock = Callable[[], float]


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


class _OneAtATime:
    """A refresh run for the callers that saw generation ``seen``: callers that arrive while (or
    after) it runs share its result, a failure too, instead of refreshing again. Threads only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failure: Exception | None = None
        self.generation = 0  # refreshes run so far

    def run(self, seen: int, refresh: Callable[[], None]) -> None:
        with self._lock:
            if self.generation == seen:
                try:
                    refresh()
                    self._failure = None
                except Exception as exc:
                    self._failure = exc
                self.generation += 1
            failure = self._failure
        if failure is not None:
            text = str(failure) if isinstance(failure, google.auth.exceptions.GoogleAuthError) else repr(failure)
            raise google.auth.exceptions.RefreshError(text[:500]) from failure


class DeferredCredentials(google.auth.credentials.Credentials):
    """A credential made on its first refresh, then kept: reading the key from Secret Manager or
    finding Application Default Credentials happens there, so its failure is a refresh failure
    (``RefreshError``), tried again by a later refresh. Refreshes run one at a time: threads that
    need a token while one runs (the SDK's, whose requests each check the token) share its result."""

    def __init__(self, make: Callable[[], google.auth.credentials.Credentials], source: str) -> None:
        super().__init__()
        self._make = make
        self._made: google.auth.credentials.Credentials | None = None
        self._refreshes = _OneAtATime()
        self.source = source  # where the key comes from, for logs: never the key

    def resolve(self) -> google.auth.credentials.Credentials:
        """The underlying credential, made now if it is not yet."""
        if self._made is None:
            try:
                self._made = self._make()
            except google.auth.exceptions.GoogleAuthError:
                raise
            except Exception as exc:  # Secret Manager's errors, a malformed key
                text = f"cannot load the FCM credentials from {self.source}: {type(exc).__name__}: {exc}"
                raise google.auth.exceptions.RefreshError(text[:500]) from exc
            log.info("FCM credentials: %s", self.source)
        return self._made

    def refresh(self, request: Any) -> None:
        def now() -> None:
            made = self.resolve()
            made.refresh(request)
            self.token, self.expiry = made.token, made.expiry

        self._refreshes.run(self._refreshes.generation, now)


@functools.cache
def _secret_credentials(
    secret: str, api_endpoint: str | None, client_credentials: google.auth.credentials.Credentials | None
) -> DeferredCredentials:
    """One credential per instance for the secret; the key is read on its first refresh, then kept."""

    def make() -> google.auth.credentials.Credentials:
        from google.oauth2 import service_account

        info = json.loads(load_secret(secret, api_endpoint=api_endpoint, credentials=client_credentials))
        return service_account.Credentials.from_service_account_info(info, scopes=[FCM_SCOPE])

    return DeferredCredentials(make, f"Secret Manager secret {secret}")


def _default_credentials() -> google.auth.credentials.Credentials:
    creds, _project = google.auth.default(scopes=[FCM_SCOPE])  # the runtime's own service account
    return creds


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
        return _secret_credentials(s.fcm_credentials_secret, secret_api_endpoint, secret_client_credentials)
    return DeferredCredentials(_default_credentials, "Application Default Credentials (the function's service account)")


def _fresh_until(expiry: datetime.datetime | None, now: float) -> float:
    """The monotonic time until which a token expiring at ``expiry`` (naive UTC) is handed out."""
    if expiry is None:  # a token that never expires
        return float("inf")
    left = (expiry - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)).total_seconds()
    return now + max(0.0, left - min(REFRESH_MARGIN_SECONDS, left / 2))


class AccessTokenProvider:
    """Hands out a valid access token to the async HTTP client; refreshes in a thread, one at a time.

    ``token()`` refreshes a token close to its expiry; ``renew(rejected)`` after FCM refused one.
    Either way there is one refresh per instance at a time: every caller that needs a token while
    it runs waits for that refresh's result (its token, or its failure) instead of starting its own,
    and a failure is handed to callers for ``REFRESH_FAILURE_HOLD_SECONDS`` before the next attempt.
    """

    def __init__(self, credentials: google.auth.credentials.Credentials, *, clock: Clock = time.monotonic) -> None:
        self._credentials = credentials
        self._clock = clock
        self._token: str | None = None
        self._fresh_until = 0.0  # clock() deadline; 0 forces a refresh
        self._refreshing: asyncio.Task[str] | None = None
        self._failure: BaseException | None = None
        self._failed_at = 0.0
        self.refreshes = 0

    def cached(self) -> str | None:
        """The current token while it is fresh (no await: the hot path of every send), else None."""
        token = self._token
        if token is not None and self._clock() < self._fresh_until:
            return token
        return None

    async def token(self) -> str:
        return self.cached() or await self._shared_refresh()

    async def renew(self, rejected: str) -> str:
        """A new token after FCM refused ``rejected`` (HTTP 401 without a token-level code).

        The refused token is never handed out again. A request refused with a token that was
        already replaced gets the replacement without another refresh."""
        if rejected == self._token:
            self._fresh_until = 0.0
        elif self._refreshing is None:
            token = self.cached()
            if token is not None:
                return token
        return await self._shared_refresh()

    async def _shared_refresh(self) -> str:
        task = self._refreshing
        if task is None:
            failure = self._failure
            if failure is not None and self._clock() - self._failed_at < REFRESH_FAILURE_HOLD_SECONDS:
                raise google.auth.exceptions.RefreshError(f"the last refresh failed: {failure}") from failure
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._refresh))
            task.add_done_callback(self._refreshed)
            self._refreshing = task
        return await asyncio.shield(task)  # a caller that gives up leaves the refresh to the others

    def _refresh(self) -> str:  # in a worker thread
        self._credentials.refresh(google.auth.transport.requests.Request())
        token = self._credentials.token
        if not token:
            raise google.auth.exceptions.RefreshError("the credential gave no access token")
        return token

    def _refreshed(self, task: asyncio.Task[str]) -> None:  # on the loop, before any waiter resumes
        self._refreshing = None
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:
            self._failure, self._failed_at = failure, self._clock()
            return
        self._failure = None
        self.refreshes += 1
        self._token = task.result()
        self._fresh_until = _fresh_until(self._credentials.expiry, self._clock())


class RefreshGate:
    """The SDK client's refresh after FCM refused its access token, from worker threads: one at a
    time, and a thread whose requests went out before the last renewal shares that renewal's result
    (its token, or its failure) instead of refreshing again."""

    def __init__(self, credentials: google.auth.credentials.Credentials, *, timeout: float) -> None:
        self._credentials = credentials
        self._request = functools.partial(google.auth.transport.requests.Request(), timeout=timeout)
        self._renewals = _OneAtATime()

    @property
    def generation(self) -> int:
        """Renewals done so far: read it before sending, pass it to ``renew`` after a refusal."""
        return self._renewals.generation

    def renew(self, seen: int) -> None:
        """Refresh after a refusal of requests sent at generation ``seen``; raise if that failed."""
        self._renewals.run(seen, lambda: self._credentials.refresh(self._request))


# What CredentialsAlarm says, by reason: the likely fix, never a key or a token.
_FIXES = {
    "forbidden": (
        "FCM refuses to send for our service account (403 without an FCM error code): grant the service account "
        "of {source} the permission {permission} (infra/deploy.sh's custom role) in GOOGLE_CLOUD_PROJECT={project}; "
        "a new grant can take minutes to apply"
    ),
    "refused": (
        "FCM refuses our OAuth access token even after a refresh (401 without an FCM error code): check that "
        "{source} is a live key of a service account in GOOGLE_CLOUD_PROJECT={project} with {permission}"
    ),
    "refresh": (
        "cannot get an FCM access token from {source}: check FCM_CREDENTIALS_SECRET (the secret and its version "
        "exist, are enabled, and the function's service account may access them) or, without it, the metadata "
        "server; GOOGLE_CLOUD_PROJECT={project}"
    ),
}


class CredentialsAlarm:
    """One CRITICAL log line per instance per minute while FCM refuses our credentials or they cannot
    be refreshed, naming the likely fix; the answers in between are counted in the next line."""

    REFUSED, FORBIDDEN, REFRESH_FAILED = "refused", "forbidden", "refresh"

    def __init__(
        self,
        project: str,
        secret: str | None = None,
        *,
        clock: Clock = time.monotonic,
        interval: float = ALARM_INTERVAL_SECONDS,
    ) -> None:
        self._project = project
        self._secret = secret
        self._source = (
            f"FCM_CREDENTIALS_SECRET={secret}" if secret else "Application Default Credentials (the function's own)"
        )
        self._clock = clock
        self._interval = interval
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._similar = 0

    def notice(self, reason: str, detail: str) -> None:
        """One more answer or refresh failure of this kind (``REFUSED``, ``FORBIDDEN``, ``REFRESH_FAILED``)."""
        with self._lock:
            self._similar += 1
            now = self._clock()
            if now < self._next:
                return
            self._next = now + self._interval
            similar, self._similar = self._similar, 0
        fix = _FIXES[reason].format(permission=SEND_PERMISSION, project=self._project, source=self._source)
        log.critical(
            fix,
            extra={
                "event": "config_error",
                "config": "fcm_credentials",
                "reason": reason,
                "detail": detail,
                "similar_answers": similar,
                "google_cloud_project": self._project,
                "fcm_credentials_secret": self._secret,
            },
        )
