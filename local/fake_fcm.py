"""A fake FCM HTTP v1 server for tests, local runs and benchmarks (aiohttp.web).

``POST /v1/projects/{project}/messages:send`` answers as FCM does, in FCM's JSON error shape.
Behaviour per token, by prefix:

| prefix       | answer                                                              |
|--------------|---------------------------------------------------------------------|
| ``dead-``      | 404 UNREGISTERED                                                  |
| ``malformed-`` | 400 INVALID_ARGUMENT "The registration token is not a valid ..." |
| ``mismatch-``  | 403 SENDER_ID_MISMATCH                                            |
| ``flaky-``     | 503 UNAVAILABLE, Retry-After: 1, on its first 2 attempts; then OK |
| ``quota-``     | 429 QUOTA_EXCEEDED, Retry-After: 1, on its first attempt; then OK |
| ``payload-``   | 400 INVALID_ARGUMENT about the payload                            |
| anything else  | 200 ``{"name": "projects/P/messages/<id>"}``                      |

Each record: ``{"message", "attempt", "received_at", "answer", "status", "in_outage"}`` (status 0:
connection dropped). Script entries are the names in ``ERRORS`` plus ``OK``, ``HANG`` (no answer for 30 s)
and ``DROP`` (close the connection); an error name may end in ``:SECONDS`` to set its
``Retry-After`` (``"UNAVAILABLE:30"``: a 503 with ``Retry-After: 30``).

Control API:
- ``POST /_fake/script {"token": ..., "responses": ["UNAVAILABLE", "OK", ...]}``: used in order,
  before the prefix rule, then the token is healthy again.
- ``POST /_fake/config {"delay_ms", "fail_rate", "seed", "fail_codes", "record", "refused_bearers"}``:
  injected failures are decided by a hash of (seed, token, attempt number), so runs repeat;
  ``refused_bearers`` lists OAuth access tokens answered 401 UNAUTHENTICATED without an FCM code
  (``"*"``: every one), as FCM answers a revoked or expired access token.
- ``POST /_fake/outage {"answer": "UNAVAILABLE", "after_ok": N, "seconds": S}``: an outage of the
  whole service (or of our access to it): after N more OK answers, every request is answered
  ``answer`` (a name in ``ERRORS``) for S seconds, whatever its token or script says. Its answers carry
  no Retry-After unless the answer names one (``"UNAVAILABLE:5"``). Each record then says whether it
  fell in the outage (``"in_outage"``); ``{"answer": null}`` cancels it.
- ``GET /_fake/messages[?token=]``; ``DELETE /_fake/messages`` resets records, attempt counters,
  scripts and the outage; ``GET /_fake/stats`` (counts per answer, max requests in flight, the
  outage); ``GET /healthz``.

Run: ``python -m local.fake_fcm --host 127.0.0.1 --port 9090 --delay-ms 40 [--no-record]``.
In tests: ``FakeFcm().start()`` runs it on a free port in a background thread.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import threading
import time
from collections import Counter
from typing import Any

from aiohttp import web

FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"

# name -> (HTTP status, gRPC status, message, FCM errorCode or None, Retry-After or None)
ERRORS: dict[str, tuple[int, str, str, str | None, str | None]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED", None),
    "INVALID_TOKEN": (
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        "INVALID_ARGUMENT",
        None,
    ),
    "INVALID_ARGUMENT": (
        400,
        "INVALID_ARGUMENT",
        "Invalid JSON payload received. Unknown name \"bogus\" at 'message': Cannot find field.",
        None,
        None,
    ),
    "INVALID_PAYLOAD": (400, "INVALID_ARGUMENT", "Request contains an invalid argument.", "INVALID_ARGUMENT", None),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH", None),
    "QUOTA_EXCEEDED": (
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute'.",
        "QUOTA_EXCEEDED",
        "1",
    ),
    # QUOTA_EXCEEDED without Retry-After, with a google.rpc.QuotaFailure naming the quota (QUOTA_VIOLATIONS)
    "PROJECT_QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED", None),
    "DEVICE_QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Device message rate exceeded.", "QUOTA_EXCEEDED", None),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE", "1"),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered.", "INTERNAL", None),
    "THIRD_PARTY_AUTH_ERROR": (
        401,
        "UNAUTHENTICATED",
        "Auth error from APNS or Web Push Service",
        "THIRD_PARTY_AUTH_ERROR",
        None,
    ),
    "UNAUTHENTICATED": (
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access "
        "token, login cookie or other valid authentication credential.",
        None,
        None,
    ),
    "PERMISSION_DENIED": (
        403,
        "PERMISSION_DENIED",
        "Permission 'cloudmessaging.messages.create' denied on resource.",
        None,
        None,
    ),
}
QUOTA_VIOLATIONS = {
    "PROJECT_QUOTA_EXCEEDED": {"subject": "project", "description": "Send requests per minute exceeded"},
    "DEVICE_QUOTA_EXCEEDED": {"subject": "device", "description": "Device message rate exceeded"},
}
# A client opening its FCM_MAX_IN_FLIGHT (500) connections at once overflows aiohttp's default listen
# backlog of 128: the dropped SYNs come back after a 1 s retransmission, which a benchmark reads as slowness.
LISTEN_BACKLOG = 1024

# Script-only answers: hold the request this long, or drop the connection without an answer.
HANG_SECONDS = 30.0


def prefix_answer(token: str, attempt: int) -> str:
    """What FCM says to this token on its n-th attempt (1-based), by token prefix."""
    if token.startswith("dead-"):
        return "UNREGISTERED"
    if token.startswith("malformed-"):
        return "INVALID_TOKEN"
    if token.startswith("mismatch-"):
        return "SENDER_ID_MISMATCH"
    if token.startswith("payload-"):
        return "INVALID_PAYLOAD"
    if token.startswith("flaky-") and attempt <= 2:
        return "UNAVAILABLE"
    if token.startswith("quota-") and attempt <= 1:
        return "QUOTA_EXCEEDED"
    return "OK"


def split_answer(answer: str) -> tuple[str, str | None]:
    """``"UNAVAILABLE:30"`` -> ``("UNAVAILABLE", "30")``: a scripted error with its own Retry-After."""
    name, sep, seconds = answer.partition(":")
    if sep and name in ERRORS and seconds.isdigit():
        return name, seconds
    return answer, None


def error_body(name: str, *, retry_after_default: bool = True) -> tuple[int, dict[str, Any], dict[str, str]]:
    name, retry_after_override = split_answer(name)
    status, grpc_status, message, fcm_code, retry_after = ERRORS[name]
    retry_after = retry_after_override or (retry_after if retry_after_default else None)
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if fcm_code:
        error["details"] = [{"@type": FCM_ERROR, "errorCode": fcm_code}]
    elif name == "INVALID_ARGUMENT":
        error["details"] = [{"@type": BAD_REQUEST, "fieldViolations": [{"field": "message", "description": message}]}]
    if name in QUOTA_VIOLATIONS:
        error["details"].append({"@type": QUOTA_FAILURE, "violations": [QUOTA_VIOLATIONS[name]]})
    headers = {"Retry-After": retry_after} if retry_after else {}
    return status, {"error": error}, headers


class Outage:
    """The whole service failing: after ``after_ok`` more OK answers, every request is answered
    ``answer`` for ``seconds``."""

    def __init__(self, answer: str, after_ok: int, seconds: float) -> None:
        if split_answer(answer)[0] not in ERRORS:
            raise ValueError(f"unknown outage answer: {answer}")
        if after_ok < 0 or seconds <= 0:
            raise ValueError("an outage needs after_ok >= 0 and seconds > 0")
        self.answer, self.after_ok, self.seconds = answer, after_ok, seconds
        self.started_at: float | None = time.time() if after_ok == 0 else None
        self.requests = 0  # answered during the outage

    def now_in(self) -> bool:
        """Whether a request answered now falls in the outage."""
        started = self.started_at
        return started is not None and time.time() < started + self.seconds

    def ok_answered(self) -> None:
        """One more OK answer before the outage: the last one it waits for starts it."""
        if self.started_at is None:
            self.after_ok -= 1
            if self.after_ok <= 0:
                self.started_at = time.time()

    def describe(self) -> dict[str, Any]:
        started = self.started_at
        return {
            "answer": self.answer,
            "seconds": self.seconds,
            "started_at": started,
            "ends_at": None if started is None else started + self.seconds,
            "requests": self.requests,
        }


class FakeState:
    """Everything the fake remembers; touched only from the server's event loop."""

    def __init__(self, delay_ms: float = 0.0, record: bool = True) -> None:
        self.delay_ms = delay_ms
        self.fail_rate = 0.0
        self.seed = 0
        self.fail_codes = ["UNAVAILABLE"]
        self.refused_bearers: list[str] = []
        self.record = record
        self.in_flight = 0  # a live gauge: requests still being answered survive a reset
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.attempts: Counter[str] = Counter()
        self.scripts: dict[str, list[str]] = {}
        self.outage: Outage | None = None
        self.answers: Counter[str] = Counter()
        self.received = 0
        self.max_in_flight = self.in_flight
        self.ids = itertools.count(1)

    def configure(self, cfg: dict[str, Any]) -> None:
        for key in ("delay_ms", "fail_rate", "seed", "fail_codes", "record", "refused_bearers"):
            if key in cfg:
                setattr(self, key, cfg[key])
        unknown = [c for c in self.fail_codes if c not in ERRORS]
        if unknown:
            raise ValueError(f"unknown fail_codes: {unknown}")

    def injected(self, token: str, attempt: int) -> str | None:
        if self.fail_rate <= 0:
            return None
        digest = hashlib.sha256(f"{self.seed}:{token}:{attempt}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.fail_rate:
            return None
        return self.fail_codes[digest[8] % len(self.fail_codes)]

    def answer_for(self, token: str, attempt: int) -> str:
        script = self.scripts.get(token)
        if script:
            return script.pop(0)
        answer = prefix_answer(token, attempt)
        if answer == "OK":
            answer = self.injected(token, attempt) or "OK"
        return answer

    def set_outage(self, answer: str | None, after_ok: int = 0, seconds: float = 0.0) -> None:
        self.outage = None if answer is None else Outage(answer, after_ok, seconds)

    def stats(self) -> dict[str, Any]:
        return {
            "outage": None if self.outage is None else self.outage.describe(),
            "received": self.received,
            "answers": dict(self.answers),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "tokens": len(self.attempts),
            "recorded": len(self.messages),
        }


STATE = web.AppKey("state", FakeState)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers=headers, content_type="application/json", charset="UTF-8"
    )


async def _send(request: web.Request) -> web.StreamResponse:
    state: FakeState = request.app[STATE]
    state.received += 1
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        bearer = request.headers.get("Authorization", "")
        if not bearer.startswith("Bearer ") or bearer[7:] in state.refused_bearers or "*" in state.refused_bearers:
            state.answers["UNAUTHENTICATED"] += 1
            status, body, headers = error_body("UNAUTHENTICATED")
            return _json(body, status, headers)
        try:
            payload = json.loads(await request.read())
            message = payload["message"]
            token = str(message.get("token", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            state.answers["INVALID_ARGUMENT"] += 1
            status, body, headers = error_body("INVALID_ARGUMENT")
            return _json(body, status, headers)
        state.attempts[token] += 1
        attempt = state.attempts[token]
        record: dict[str, Any] = {"message": message, "attempt": attempt, "received_at": time.time()}
        if state.record:
            state.messages.append(record)
        if state.delay_ms:
            await asyncio.sleep(state.delay_ms / 1000)
        outage = state.outage
        in_outage = outage is not None and outage.now_in()
        answer = outage.answer if outage is not None and in_outage else state.answer_for(token, attempt)
        state.answers[answer] += 1
        record["answer"], record["in_outage"] = answer, in_outage
        if in_outage:
            assert outage is not None
            outage.requests += 1
            status, body, headers = error_body(answer, retry_after_default=False)
            record["status"] = status
            return _json(body, status, headers)
        if answer == "OK" and outage is not None:
            outage.ok_answered()
        if answer == "HANG":
            await asyncio.sleep(HANG_SECONDS)
            answer = "OK"
        if answer == "DROP":
            record["status"] = 0  # no HTTP answer at all
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if answer == "OK":
            record["status"] = 200
            project = request.match_info["project"]
            return _json({"name": f"projects/{project}/messages/{next(state.ids)}"})
        status, body, headers = error_body(answer)
        record["status"] = status
        return _json(body, status, headers)
    finally:
        state.in_flight -= 1


async def _script(request: web.Request) -> web.Response:
    data = await request.json()
    responses = [str(r) for r in data["responses"]]
    unknown = [r for r in responses if split_answer(r)[0] not in ERRORS and r not in ("OK", "HANG", "DROP")]
    if unknown:
        return _json({"error": f"unknown responses: {unknown}"}, 400)
    request.app[STATE].scripts[str(data["token"])] = responses
    return _json({"ok": True})


async def _config(request: web.Request) -> web.Response:
    state: FakeState = request.app[STATE]
    try:
        state.configure(await request.json())
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    return _json(
        {
            "delay_ms": state.delay_ms,
            "fail_rate": state.fail_rate,
            "seed": state.seed,
            "fail_codes": state.fail_codes,
            "record": state.record,
            "refused_bearers": state.refused_bearers,
        }
    )


async def _outage(request: web.Request) -> web.Response:
    data = await request.json()
    try:
        request.app[STATE].set_outage(data.get("answer"), int(data.get("after_ok", 0)), float(data.get("seconds", 0)))
    except (ValueError, TypeError) as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"ok": True})


async def _messages(request: web.Request) -> web.Response:
    state: FakeState = request.app[STATE]
    token = request.query.get("token")
    found = [m for m in state.messages if token is None or m["message"].get("token") == token]
    return _json({"messages": found})


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json({"ok": True})


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[STATE].stats())


async def _healthz(_request: web.Request) -> web.Response:
    return _json({"ok": True})


def make_app(delay_ms: float = 0.0, record: bool = True) -> web.Application:
    app = web.Application()
    app[STATE] = FakeState(delay_ms, record)
    app.router.add_post("/v1/projects/{project}/messages:send", _send)
    app.router.add_post("/_fake/script", _script)
    app.router.add_post("/_fake/config", _config)
    app.router.add_post("/_fake/outage", _outage)
    app.router.add_get("/_fake/messages", _messages)
    app.router.add_delete("/_fake/messages", _reset)
    app.router.add_get("/_fake/stats", _stats)
    app.router.add_get("/healthz", _healthz)
    return app


class FakeFcm:
    """The fake in a background thread with its own event loop, for tests."""

    def __init__(self, delay_ms: float = 0.0, record: bool = True, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = make_app(delay_ms, record)
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def state(self) -> FakeState:
        return self._app[STATE]

    def start(self) -> str:
        """Start serving; returns the base URL (e.g. ``http://127.0.0.1:40123``)."""
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-fcm", daemon=True)
        self._thread.start()
        self._call(self._start())
        return self.url

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, backlog=LISTEN_BACKLOG)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}"

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._runner is not None:
            self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._thread = None

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def _in_loop(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return self._call(run())

    def messages(self, token: str | None = None) -> list[dict[str, Any]]:
        return self._in_loop(
            lambda: [dict(m) for m in self.state.messages if token is None or m["message"].get("token") == token]
        )

    def script(self, token: str, responses: list[str]) -> None:
        self._in_loop(self.state.scripts.__setitem__, token, list(responses))

    def configure(self, **cfg: Any) -> None:
        self._in_loop(self.state.configure, cfg)

    def outage(self, answer: str | None, *, after_ok: int = 0, seconds: float = 0.0) -> None:
        """Fail every request with ``answer`` for ``seconds``, after ``after_ok`` more OK answers."""
        self._in_loop(self.state.set_outage, answer, after_ok, seconds)

    def reset(self) -> None:
        self._in_loop(self.state.reset)

    def stats(self) -> dict[str, Any]:
        return self._in_loop(self.state.stats)

    def __enter__(self) -> FakeFcm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake FCM HTTP v1 server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="answer delay per request")
    parser.add_argument("--no-record", action="store_true", help="keep counts only (benchmarks)")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    app = make_app(args.delay_ms, record=not args.no_record)
    app[STATE].configure({"fail_rate": args.fail_rate, "seed": args.seed})
    print(f"fake FCM on http://{args.host}:{args.port} (delay {args.delay_ms} ms)", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=LISTEN_BACKLOG)


if __name__ == "__main__":
    main()
