"""FCM clients: each ``send(message)`` makes one attempt and returns an ``Outcome``, never raises.

``HttpFcmClient`` (FCM_CLIENT=http, the default) speaks FCM HTTP v1 over one aiohttp session
with at most ``max_connections`` requests in flight. ``SdkFcmClient`` (FCM_CLIENT=sdk) sends the
same messages through firebase-admin's ``send_each``, batched into slices of at most 500.
Retrying is the caller's business (``Kind.RETRY`` and ``retry_after``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import google.auth.credentials

from shared import outcomes
from shared.config import Settings
from shared.credentials import AccessTokenProvider, fcm_credentials
from shared.outcomes import Outcome

log = logging.getLogger(__name__)

FCM_DEFAULT_ENDPOINT = "https://fcm.googleapis.com"
MAX_MESSAGES_PER_BATCH = 500  # firebase-admin's send_each refuses more
BATCH_WINDOW_SECONDS = 0.002  # the SDK client waits this long to fill a slice
SDK_APP_NAME = "pushline-fcm"  # our own firebase_admin app: never collides with the auth one


def send_url(endpoint: str, project_id: str) -> str:
    return f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"


class HttpFcmClient:
    """Async FCM HTTP v1 client: one session, reused connections, one attempt per ``send``."""

    def __init__(
        self,
        project_id: str,
        endpoint: str = FCM_DEFAULT_ENDPOINT,
        *,
        tokens: AccessTokenProvider,
        max_connections: int = 500,
        timeout: float = 10.0,
    ) -> None:
        self._url = send_url(endpoint, project_id)
        self._tokens = tokens
        self._max_connections = max_connections
        # Sends beyond max_connections wait for a slot here (cheaper than queueing in the
        # connector, and that wait never counts towards the timeout). The clock runs from connecting
        # (sock_connect) and from the request being written (sock_read: FCM answers in one piece).
        self._slots = asyncio.Semaphore(max_connections)
        # One request, connect to answer, never outlives `timeout` (the ledger's lease is sized on it).
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout, sock_read=timeout)
        self._timeout_s = timeout
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}
        self._headers_token: str | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    def _headers_for(self, access_token: str) -> dict[str, str]:
        if access_token != self._headers_token:
            self._headers = {"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"}
            self._headers_token = access_token
        return self._headers

    async def send(self, message: dict[str, Any]) -> Outcome:
        """POST one FCM v1 ``message`` (it carries its ``token``); map whatever happens to an Outcome."""
        try:
            body = json.dumps({"message": message}).encode()
        except (TypeError, ValueError) as exc:  # not JSON: FCM could never accept it
            return outcomes.from_exception(exc)
        session = self._session or self._open()
        async with self._slots:
            try:
                access_token = self._tokens.cached() or await asyncio.wait_for(self._tokens.token(), self._timeout_s)
            except Exception as exc:  # the credential cannot produce a token
                return outcomes.from_sdk_exception(exc)
            try:
                async with session.post(self._url, data=body, headers=self._headers_for(access_token)) as resp:
                    status = resp.status
                    raw = await resp.read()  # read even on 200 so the connection goes back to the pool
                    if status == 200:
                        return outcomes.DELIVERED
                    headers = resp.headers
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return outcomes.from_exception(exc)
        if status == 401:
            self._tokens.invalidate(access_token)  # the next request refreshes; this one is answered as is
        return outcomes.from_response(status, raw, headers, token=message.get("token"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
    ) -> None:
        self._slice = max(1, min(MAX_MESSAGES_PER_BATCH, max_in_flight))
        self._batch_slots = asyncio.Semaphore(max(1, max_in_flight // self._slice))
        self._window = window
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Outcome]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # send_each calls made, and the largest one: for stats and tests
        self.largest_batch = 0
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
        from firebase_admin import messaging

        try:
            # dicts go straight through: see _sdk_app, which makes the service send them as they are
            batch = messaging.send_each(messages, app=self._app)  # type: ignore[arg-type]
        except Exception as exc:  # the whole call failed (e.g. the credential could not refresh)
            return [outcomes.from_sdk_exception(exc)] * len(messages)
        return [outcomes.DELIVERED if r.success else outcomes.from_sdk_exception(r.exception) for r in batch.responses]

    async def close(self) -> None:
        if self._pending:
            self._flush()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        import firebase_admin

        # delete_app closes the SDK's async client with asyncio.run: it must run outside our loop.
        await asyncio.to_thread(firebase_admin.delete_app, self._app)


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
      The one exception is google-auth's: on a 401 its session refreshes the credential and repeats
      the request; that is bounded to once (the SDK's counterpart of HttpFcmClient's invalidate()).
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
    session._max_refresh_attempts = 1

    def message_data(message: dict[str, Any], dry_run: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"message": message}
        if dry_run:
            data["validate_only"] = True
        return data

    service._message_data = message_data
    return app


def make_client(s: Settings) -> HttpFcmClient | SdkFcmClient:
    """The FCM client the settings ask for (FCM_CLIENT), pointed at FCM or FCM_ENDPOINT."""
    if s.fcm_client == "sdk":
        return SdkFcmClient(
            s.google_cloud_project,
            credentials=fcm_credentials(s),
            endpoint=s.fcm_endpoint,
            max_in_flight=s.fcm_max_in_flight,
            timeout=s.fcm_timeout_seconds,
        )
    return HttpFcmClient(
        s.google_cloud_project,
        s.fcm_endpoint or FCM_DEFAULT_ENDPOINT,
        tokens=AccessTokenProvider(fcm_credentials(s)),
        max_connections=s.fcm_max_in_flight,
        timeout=s.fcm_timeout_seconds,
    )
