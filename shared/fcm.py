"""FCM clients: each ``send(message)`` returns an ``Outcome`` and never raises.

``HttpFcmClient`` (FCM_CLIENT=http, the default) speaks FCM HTTP v1 through ``shared.http1`` (our
small HTTP/1.1 client on asyncio: keep-alive connections, a request head encoded once per access
token) with at most ``max_connections`` requests in flight. ``SdkFcmClient`` (FCM_CLIENT=sdk) sends the
same messages through firebase-admin's ``send_each``, batched into slices of at most 500.
Retrying is the caller's business (``Kind.RETRY``, ``cause`` and ``retry_after``).

One ``send`` is one attempt, with one exception: FCM refusing our OAuth access token (HTTP 401
without a token-level code). Both clients then refresh the token — one refresh per instance at a
time, every request refused meanwhile waiting for that refresh's result — and send the message once
more, within the same time budget (twice ``timeout``: the ledger's lease is sized on it). If FCM
refuses again, or the refresh fails, the outcome is RETRY with cause CREDENTIALS (not charged to the
token). A 401 THIRD_PARTY_AUTH_ERROR (APNs / web push credentials) is about the device's platform,
not our token: no refresh, no second request. Every CREDENTIALS outcome (403 without a token-level
code, a failed refresh, a token refused twice) goes to ``CredentialsAlarm``: one CRITICAL line per
instance per minute naming the likely fix.

The SDK path, exactly: firebase-admin sends through google-auth's ``AuthorizedSession``, which on
any 401 refreshes the credential and repeats the request — a THIRD_PARTY_AUTH_ERROR included, and
one refresh per refused request. We switch that off (its ``_refresh_status_codes``, pinned
google-auth) and do it ourselves after ``send_each``: the 401s without a token-level code are
resent once, in one ``send_each``, after one ``RefreshGate`` refresh. The refresh before a request
(a token missing or near expiry) stays google-auth's, from each of the SDK's request threads; our
production credentials (``DeferredCredentials``) run those one at a time and share the result. A
refresh that fails there fails the whole ``send_each`` call (firebase-admin turns it into one
``UnknownError``), which maps to CREDENTIALS for every message of the slice. The SDK's
UNAUTHENTICATED / PERMISSION_DENIED errors without an FCM code map to CREDENTIALS too. What the SDK
does not allow: renewing as soon as one request is refused (``send_each`` returns when its whole
slice is answered, so the refused requests wait for the slowest answer of their slice).
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
import time
from typing import Any

import google.auth.credentials

from shared import http1, outcomes
from shared.config import Settings
from shared.credentials import AccessTokenProvider, CredentialsAlarm, RefreshGate, fcm_credentials
from shared.fcm_message import Message
from shared.outcomes import Cause, Outcome

FCM_DEFAULT_ENDPOINT = "https://fcm.googleapis.com"
MAX_MESSAGES_PER_BATCH = 500  # firebase-admin's send_each refuses more
BATCH_WINDOW_SECONDS = 0.002  # the SDK client waits this long to fill a slice
SDK_APP_NAME = "pushline-fcm"  # our own firebase_admin app: never collides with the auth one
_CREDENTIALS = Cause.CREDENTIALS


def send_url(endpoint: str, project_id: str) -> str:
    return f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"


def _alarm_reason(status: int) -> str:
    """What a CREDENTIALS outcome says, by the HTTP status it came with (0: no answer, a failed refresh)."""
    if status == 403:
        return CredentialsAlarm.FORBIDDEN
    return CredentialsAlarm.REFUSED if status == 401 else CredentialsAlarm.REFRESH_FAILED


class HttpFcmClient:
    """Async FCM HTTP v1 client: one connection pool, reused connections, one attempt per ``send``."""

    def __init__(
        self,
        project_id: str,
        endpoint: str = FCM_DEFAULT_ENDPOINT,
        *,
        tokens: AccessTokenProvider,
        max_connections: int = 500,
        timeout: float = 10.0,
        alarm: CredentialsAlarm | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self._url = send_url(endpoint, project_id)
        self._tokens = tokens
        self._alarm = alarm or CredentialsAlarm(project_id)
        self._ssl = ssl
        # Sends beyond max_connections wait for a slot here, and that wait never counts towards the
        # timeout: the clock runs from taking a connection (connecting included) to the whole answer.
        self._slots = asyncio.Semaphore(max_connections)
        # One request, connect to answer, never outlives `timeout` (the ledger's lease is sized on it).
        self._timeout_s = timeout
        self._pool: http1.Http1Pool | None = None
        self._open()  # now: an endpoint that is no http(s) URL fails here, not on every send
        self._head = b""
        self._head_token: str | None = None

    def _open(self) -> http1.Http1Pool:
        self._pool = http1.Http1Pool(self._url, ssl=self._ssl, connect_timeout=self._timeout_s)
        return self._pool

    def _head_for(self, pool: http1.Http1Pool, access_token: str) -> bytes:
        """The request head, encoded again only when the access token changes."""
        if access_token != self._head_token:
            headers = {"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"}
            self._head = pool.request_head(headers)
            self._head_token = access_token
        return self._head

    async def send(self, message: dict[str, Any]) -> Outcome:
        """POST one FCM v1 ``message`` (it carries its ``token``); map whatever happens to an Outcome."""
        try:  # a Message (shared.fcm_message) encodes only its token; any other dict, all of it
            body = message.request_body() if type(message) is Message else json.dumps({"message": message}).encode()
        except (TypeError, ValueError) as exc:  # not JSON: FCM could never accept it
            return outcomes.from_exception(exc)
        async with self._slots:
            started = time.monotonic()
            access_token = self._tokens.cached()
            if access_token is None:
                try:
                    access_token = await asyncio.wait_for(self._tokens.token(), self._timeout_s)
                except Exception as exc:  # the credential cannot produce a token: nothing sent
                    return self._credentials_failed(0, outcomes.from_credentials_error(exc))
            status, outcome = await self._post(body, access_token, message, self._timeout_s)
            if outcome.cause is _CREDENTIALS:
                status, outcome = await self._refused(status, outcome, body, access_token, message, started)
                if outcome.cause is _CREDENTIALS:
                    return self._credentials_failed(status, outcome)
        return outcome

    async def _post(
        self, body: bytes, access_token: str, message: dict[str, Any], timeout: float
    ) -> tuple[int, Outcome]:
        pool = self._pool or self._open()
        try:
            head = self._head_for(pool, access_token)
        except ValueError as exc:  # a token that cannot be a header value (CR/LF): never sent, our fault
            return 0, outcomes.from_credentials_error(exc)
        try:
            response = await pool.post(head, body, timeout)
        except (http1.HttpError, OSError) as exc:
            return 0, outcomes.from_exception(exc)
        status = response.status
        if status == 200:
            return 200, outcomes.DELIVERED
        return status, outcomes.from_response(status, response.body, response.headers, token=message.get("token"))

    async def _refused(
        self, status: int, outcome: Outcome, body: bytes, access_token: str, message: dict[str, Any], started: float
    ) -> tuple[int, Outcome]:
        """After a CREDENTIALS answer: if FCM refused our access token, renew it (shared with every
        request refused meanwhile) and send once more, within the send's budget of twice the timeout."""
        if not outcomes.refuses_access_token(status, outcome):
            return status, outcome
        budget = started + 2 * self._timeout_s - time.monotonic()
        if budget <= 0:
            return status, outcome
        try:
            fresh = await asyncio.wait_for(self._tokens.renew(access_token), min(budget, self._timeout_s))
        except Exception as exc:
            return 0, outcomes.from_credentials_error(exc)
        budget = min(started + 2 * self._timeout_s - time.monotonic(), self._timeout_s)
        if budget <= 0:
            return status, outcome
        return await self._post(body, fresh, message, budget)

    def _credentials_failed(self, status: int, outcome: Outcome) -> Outcome:
        self._alarm.notice(_alarm_reason(status), outcome.message)
        return outcome

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class SdkFcmClient:
    """The same ``send`` over firebase-admin: messages arriving within ~2 ms go out as one
    ``send_each`` call (at most 500) in a worker thread; each caller gets its own Outcome."""

    def __init__(
        self,
        project_id: str,
        *,
        credentials: google.auth.credentials.Credentials,
        endpoint: str | None = None,
        max_in_flight: int = 500,
        timeout: float = 10.0,
        window: float = BATCH_WINDOW_SECONDS,
        app_name: str = SDK_APP_NAME,
        alarm: CredentialsAlarm | None = None,
    ) -> None:
        self._slice = max(1, min(MAX_MESSAGES_PER_BATCH, max_in_flight))
        self._batch_slots = asyncio.Semaphore(max(1, max_in_flight // self._slice))
        self._window = window
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Outcome]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # send_each calls made, and the largest one: for stats and tests
        self.largest_batch = 0
        self._timeout = timeout
        self._alarm = alarm or CredentialsAlarm(project_id)
        self._renewals = RefreshGate(credentials, timeout=timeout)
        self._app = _sdk_app(project_id, credentials, endpoint, timeout, self._slice, app_name)

    async def send(self, message: dict[str, Any]) -> Outcome:
        try:  # one message that cannot be encoded would otherwise fail its whole send_each batch
            json.dumps(message)
        except (TypeError, ValueError) as exc:
            return outcomes.from_exception(exc)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append((message, future))
        if len(self._pending) >= self._slice:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[: self._slice], self._pending[self._slice :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future[Outcome]]]) -> None:
        async with self._batch_slots:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = await asyncio.to_thread(self._send_batch, [message for message, _ in batch])
            except Exception as exc:  # e.g. the executor is shutting down
                results = [outcomes.from_sdk_exception(exc)] * len(batch)
        for (_, future), outcome in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(outcome)

    def _send_batch(self, messages: list[dict[str, Any]]) -> list[Outcome]:
        """One slice, in a worker thread: ``send_each``, then once more for the requests whose access
        token FCM refused, after one shared refresh (see the module docstring)."""
        started = time.monotonic()
        seen = self._renewals.generation
        answers = self._send_each(messages)
        refused = [i for i, (status, outcome) in enumerate(answers) if outcomes.refuses_access_token(status, outcome)]
        if refused:
            try:
                self._renewals.renew(seen)
            except Exception as exc:  # the refresh failed: nothing more is sent
                failed = (0, outcomes.from_credentials_error(exc))
                for i in refused:
                    answers[i] = failed
            else:
                if time.monotonic() - started < self._timeout:  # the resend ends within twice the timeout
                    for i, answer in zip(refused, self._send_each([messages[i] for i in refused]), strict=True):
                        answers[i] = answer
        for status, outcome in answers:
            if outcome.cause is _CREDENTIALS:
                self._alarm.notice(_alarm_reason(status), outcome.message)
        return [outcome for _, outcome in answers]

    def _send_each(self, messages: list[dict[str, Any]]) -> list[tuple[int, Outcome]]:
        """Each message's (HTTP status, Outcome); status 0 when there was no HTTP answer."""
        from firebase_admin import messaging

        try:
            # dicts go straight through: see _sdk_app, which makes the service send them as they are
            batch = messaging.send_each(messages, app=self._app)
        except Exception as exc:  # the whole call failed (e.g. the credential could not refresh)
            return [(0, outcomes.from_sdk_exception(exc))] * len(messages)
        return [(200, outcomes.DELIVERED) if r.success else _sdk_answer(r.exception) for r in batch.responses]

    async def close(self) -> None:
        if self._pending:
            self._flush()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        import firebase_admin

        # delete_app closes the SDK's async client with asyncio.run: it must run outside our loop.
        await asyncio.to_thread(firebase_admin.delete_app, self._app)


def _sdk_answer(exc: Exception) -> tuple[int, Outcome]:
    response = getattr(exc, "http_response", None)
    return (response.status_code if response is not None else 0), outcomes.from_sdk_exception(exc)


def _sdk_app(
    project_id: str,
    credentials: google.auth.credentials.Credentials,
    endpoint: str | None,
    timeout: float,
    pool_size: int,
    app_name: str,
) -> Any:
    """A dedicated firebase_admin app whose messaging service is set up for us.

    The only place that reaches into firebase-admin 7.x internals (pinned version), each on our own
    app's service only:
    - FCM URL: the class attribute ``_MessagingService.FCM_URL`` is read when an app's messaging
      service is created, so it is set around that creation (here, eagerly) and then restored.
    - Retries: the SDK mounts urllib3 adapters that retry 500/503 up to 4 times and connection errors
      once; ours retry nothing, so one ``send`` is one attempt and the caller's MAX_ATTEMPTS holds.
      google-auth's session refreshes the credential and repeats the request on any 401; that is
      switched off (``_refresh_status_codes``): SdkFcmClient decides which 401s refuse our token.
    - Messages: ``_message_data`` is replaced so our FCM v1 ``message`` dicts are sent as they are,
      byte for byte what HttpFcmClient sends.
    """
    import firebase_admin
    import requests.adapters
    from firebase_admin import messaging

    name, n = app_name, 1
    while name in firebase_admin._apps:  # another client in this process still holds the name
        n += 1
        name = f"{app_name}-{n}"
    app = firebase_admin.initialize_app(credentials, {"projectId": project_id, "httpTimeout": timeout}, name=name)

    original_url = messaging._MessagingService.FCM_URL
    if endpoint:  # FCM_ENDPOINT (local fake FCM): the one place the SDK's FCM URL is changed
        messaging._MessagingService.FCM_URL = send_url(endpoint, "{0}")
    try:
        service = messaging._get_messaging_service(app)
    finally:
        messaging._MessagingService.FCM_URL = original_url

    session = service._client.session
    for prefix in list(session.adapters):
        session.mount(prefix, requests.adapters.HTTPAdapter(pool_maxsize=pool_size, max_retries=0))
    session._refresh_status_codes = ()  # no refresh-and-repeat on a 401: SdkFcmClient._send_batch decides

    def message_data(message: dict[str, Any], dry_run: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"message": message}
        if dry_run:
            data["validate_only"] = True
        return data

    service._message_data = message_data
    return app


def make_client(s: Settings) -> HttpFcmClient | SdkFcmClient:
    """The FCM client the settings ask for (FCM_CLIENT), pointed at FCM or FCM_ENDPOINT."""
    alarm = CredentialsAlarm(s.google_cloud_project, s.fcm_credentials_secret)
    if s.fcm_client == "sdk":
        return SdkFcmClient(
            s.google_cloud_project,
            credentials=fcm_credentials(s),
            endpoint=s.fcm_endpoint,
            max_in_flight=s.fcm_max_in_flight,
            timeout=s.fcm_timeout_seconds,
            alarm=alarm,
        )
    return HttpFcmClient(
        s.google_cloud_project,
        s.fcm_endpoint or FCM_DEFAULT_ENDPOINT,
        tokens=AccessTokenProvider(fcm_credentials(s)),
        max_connections=s.fcm_max_in_flight,
        timeout=s.fcm_timeout_seconds,
        alarm=alarm,
    )
