"""pushline's entry points. Each one parses its input, calls one use case in ``shared``, and answers.

  register  (HTTP)        clients register / unregister their FCM device tokens; POST /receipts: a
                          device opened or dismissed a notification; GET / PUT /preferences: the
                          signed-in user's muted categories and quiet hours
  send      (HTTP)        backends ask for a notification: 202 {"id"}, delivered asynchronously;
                          GET /<id> answers its status, DELETE /<id> cancels it
  deliver   (CloudEvent)  Pub/Sub-triggered (the jobs topic): sends a job through FCM
  on_event  (CloudEvent)  Pub/Sub-triggered (the domain-events topic): turns an event into a job by its rule
  prune     (HTTP)        Cloud Scheduler, daily: deletes devices past their TTL (deployed private)
  tick      (HTTP)        Cloud Scheduler, every minute: publishes the scheduled sends that are due (private)

Use cases are imported inside the entry point that runs them (``from shared import delivery``), so a
function instance loads only what it serves: register never loads the bus or the FCM client, deliver
never loads firebase-admin's auth. This module alone turns their results and errors into HTTP
statuses and redeliveries.

Run locally from the repo root, e.g.:
  functions-framework --source functions/main.py --target register --port 8081
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

try:  # Deployed, shared/ sits beside this file; in the repo, one level up.
    import shared  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flask
import functions_framework
import werkzeug.exceptions
import werkzeug.routing
from cloudevents.http import CloudEvent

from shared import config, instance, logs, web

with config.refusal_logged():  # a function that cannot start says why first (a configuration error)
    SETTINGS = config.settings()
    logs.setup(SETTINGS.log_level)
    config.warn_unknown()  # once per instance: each variable nothing reads that looks like ours (a typo?)
    config.check_cloud_safety(SETTINGS)  # in the cloud: no local-only switch (even blank), GOOGLE_CLOUD_PROJECT set
if SETTINGS.deliver_url:  # development only (refused in the cloud just above): local/ is not deployed
    from local.bus import plug_in

    plug_in()  # jobs and events go to the in-memory local bus unless PUBSUB_EMULATOR_HOST is set
log = logs.get("main")

REGISTER_MAX_BODY = 16 * 1024


@functions_framework.errorhandler(werkzeug.exceptions.HTTPException)
def _http_error(exc: werkzeug.exceptions.HTTPException) -> flask.Response | werkzeug.exceptions.HTTPException:
    """Errors raised outside our handlers (routing, 503 for redelivery) are JSON too."""
    if isinstance(exc, werkzeug.routing.RequestRedirect):
        return exc
    return web.respond(exc.code or 500, {"error": exc.description or exc.name})


def _caller(request: flask.Request) -> str:
    from shared import auth

    try:
        return auth.verify(web.bearer_token(request))
    except auth.AuthError as exc:
        raise web.HttpError(401, str(exc), {"WWW-Authenticate": "Bearer"}) from None


class _InvalidRegistrationIs400:
    """``with _InvalidRegistrationIs400():`` an InvalidRegistration raised inside is a 400 (a class, not a
    generator-based context manager: it runs on every registration)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        from shared import registration

        if isinstance(exc, registration.InvalidRegistration):
            raise web.HttpError(400, str(exc)) from None


def _register_device(request: flask.Request) -> tuple[int, dict]:
    from shared import registration

    user_id = _caller(request)
    with _InvalidRegistrationIs400():
        device = registration.parse_device(web.read_json(request, REGISTER_MAX_BODY))
        result = registration.register(user_id, device)
    return 200, {
        "registered": True,
        "platform": result.platform,
        "locale": result.locale,
        "time_zone": result.time_zone,
        "app_version": result.app_version,
        "moved_from_other_user": bool(result.moved_from),
    }


def _unregister_device(request: flask.Request) -> tuple[int, dict]:
    from shared import registration

    user_id = _caller(request)
    with _InvalidRegistrationIs400():
        removed = registration.unregister(
            user_id, registration.parse_removal(web.read_json(request, REGISTER_MAX_BODY))
        )
    return 200, {"removed": removed}


@contextlib.contextmanager
def _invalid_preferences_are_400() -> Iterator[None]:
    from shared import user_preferences

    try:
        yield
    except user_preferences.InvalidPreferences as exc:
        raise web.HttpError(400, exc.message) from None


def _read_preferences(request: flask.Request) -> tuple[int, dict]:
    from shared import user_preferences

    user_id = _caller(request)
    with _invalid_preferences_are_400():
        return 200, user_preferences.read(user_id)


def _replace_preferences(request: flask.Request) -> tuple[int, dict]:
    from shared import user_preferences

    user_id = _caller(request)
    with _invalid_preferences_are_400():
        return 200, user_preferences.replace(user_id, web.read_json(request, REGISTER_MAX_BODY))


def _receipt(request: flask.Request) -> tuple[int, dict]:
    from shared import receipts

    user_id = _caller(request)
    try:
        result = receipts.record(user_id, receipts.parse(web.read_json(request, REGISTER_MAX_BODY)))
    except receipts.InvalidReceipt as exc:
        raise web.HttpError(400, str(exc)) from None
    if isinstance(result, receipts.NotFound):
        return 404, {"error": result.reason}
    return 200, {"counted": result.counted}


@functions_framework.http
def register(request: flask.Request) -> flask.Response:
    return web.serve(
        request,
        {"POST": _register_device, "DELETE": _unregister_device},
        paths={
            "/receipts": {"POST": _receipt},
            "/preferences": {"GET": _read_preferences, "PUT": _replace_preferences},
        },  # any other path is a 404
        cors_origins=SETTINGS.cors_allowed_origins,
    )


SEND_MAX_BODY = 1024 * 1024


def _accept(request: flask.Request) -> tuple[int, dict, dict]:
    from shared import accept, jobs

    body = web.read_json(request, SEND_MAX_BODY)
    try:
        result = accept.accept(body, idempotency_key=request.headers.get("Idempotency-Key"))
    except jobs.JobError as exc:
        raise web.HttpError(400, exc.message) from None
    match result:
        case accept.Accepted(id=nid):
            return 202, {"id": nid}, {}
        case accept.Replayed(status=status, body=first):
            return status, first, {"Idempotent-Replayed": "true"}
        case accept.InFlight():
            return 409, {"error": result.reason}, {"Retry-After": "1"}
        case accept.KeyReused():
            return 422, {"error": result.reason}, {}


def _status(request: flask.Request) -> tuple[int, dict, dict]:
    from shared import accept

    found = accept.status(request.path.strip("/"))
    if isinstance(found, accept.NotFound):
        return 404, {"error": found.reason}, {}
    return 200, found, {}


def _cancel(request: flask.Request) -> tuple[int, dict]:
    from shared import cancel

    match cancel.cancel(request.path.strip("/")):
        case cancel.Cancelled(status=status):
            return 200, status
        case cancel.InvalidId() as bad:
            raise web.HttpError(400, bad.reason)
        case cancel.NotFound() as missing:
            return 404, {"error": missing.reason}
        case cancel.AlreadyDone() as done:
            return 409, {"error": done.reason}


@functions_framework.http
def send(request: flask.Request) -> flask.Response:
    return web.serve(request, {"POST": _accept, "GET": _status, "DELETE": _cancel})


@functions_framework.cloud_event
def deliver(cloud_event: CloudEvent) -> None:
    from shared import delivery, inbound

    try:
        delivery.handle(cloud_event.data)
    except inbound.RetryLater as exc:  # not finished: tokens held or not due, users unreadable, Redis or bus down
        _redeliver(str(exc))


@functions_framework.cloud_event
def on_event(cloud_event: CloudEvent) -> None:
    from shared import domain, inbound

    try:
        domain.handle(cloud_event.data)
    except inbound.RetryLater as exc:  # rules unusable, bus or Redis down
        _redeliver(str(exc))


def _redeliver(reason: str) -> NoReturn:
    """Answer 503 so the bus redelivers the message later (one JSON log line, no traceback)."""
    log.warning("not finished: the bus will redeliver this message", extra={"reason": reason})
    raise werkzeug.exceptions.ServiceUnavailable(description=reason)


def _prune(request: flask.Request) -> tuple[int, dict]:
    store = instance.token_store()
    answer: dict = {"pruned": store.prune(), "reconciled": None}
    if SETTINGS.reconcile_seconds:  # 0 turns the reconciliation off
        answer["reconciled"] = dataclasses.asdict(store.reconcile(budget_seconds=SETTINGS.reconcile_seconds))
    return 200, answer


@functions_framework.http
def prune(request: flask.Request) -> flask.Response:
    """Deletes tokens past the TTL window, then reconciles a page of the token cache with
    PostgreSQL for at most RECONCILE_SECONDS (Cloud Scheduler calls it hourly; deployed private)."""
    return web.serve(request, {"POST": _prune})


def _tick(request: flask.Request) -> tuple[int, dict]:
    from shared import tick as due_work

    return 200, {"published": due_work.tick().published}


@functions_framework.http
def tick(request: flask.Request) -> flask.Response:
    """Publishes the scheduled sends that are due (POST / with any or no body; Cloud Scheduler calls it
    every minute; deployed private)."""
    return web.serve(request, {"POST": _tick})
