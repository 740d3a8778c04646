"""HTTP plumbing for the HTTP functions: JSON errors, JSON bodies, body limits, methods, CORS, bearer auth.

``serve(request, routes, ...)`` runs one of the routes and turns every failure into a JSON
answer ``{"error": "..."}`` with the right status: an ``HttpError`` as it says, a store outage
as 503 with ``Retry-After``, anything unexpected as a logged 500 that reveals nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import flask

from shared import logs
from shared.errors import Unavailable
from shared.store import RateLimited

log = logs.get("web")

Handler = Callable[[flask.Request], tuple[int, Any] | tuple[int, Any, Mapping[str, str]]]
Routes = Mapping[str, Handler]  # HTTP method -> handler
CORS_METHODS = "GET, PUT, POST, DELETE, OPTIONS"


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


_to_json = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps with separators builds an encoder per call


def respond(status: int, body: Any, headers: Mapping[str, str] | None = None) -> flask.Response:
    return flask.Response(_to_json(body), status=status, headers=headers or None, content_type="application/json")


JSON_TYPES = "application/json (or application/*+json)"


def read_json(request: flask.Request, max_bytes: int) -> Any:
    """The request's JSON body, or an HttpError: 415 unless it is typed as JSON, 413 above
    ``max_bytes``, 400 when malformed.

    A body typed ``text/plain`` (or a form) is refused even when it holds valid JSON: browsers send
    those cross-origin without a preflight, so any web page could otherwise post to a function a
    developer runs locally (CSRF). ``application/json`` needs a preflight that we never grant to
    a foreign origin."""
    if not request.is_json:  # application/json or application/*+json, any parameters
        got = (request.headers.get("Content-Type") or "none")[:100]
        raise HttpError(415, f"Content-Type must be {JSON_TYPES}, got {got!r}")
    length = request.content_length
    if length is not None and length > max_bytes:
        raise HttpError(413, f"request body is {length} bytes; the limit is {max_bytes}")
    raw = request.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise HttpError(413, f"request body exceeds the limit of {max_bytes} bytes")
    if not raw.strip():
        raise HttpError(400, "request body must be a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 16,000 nested "[": the decoder gives up (it would otherwise be a 500)
        raise HttpError(400, "request body is nested too deeply") from None


def bearer_token(request: flask.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise HttpError(401, "missing Authorization: Bearer <Firebase ID token>", {"WWW-Authenticate": "Bearer"})
    return value.strip()


def cors_headers(request: flask.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    origin = (request.headers.get("Origin") or "").rstrip("/")
    if not origin or not (origin in allowed or "*" in allowed):
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Max-Age": "3600",
        "Vary": "Origin",
    }


def _routes_of_path(request: flask.Request, root: Routes, paths: Mapping[str, Routes]) -> Routes | None:
    path = "/" + request.path.strip("/")
    if path in paths:
        return paths[path]
    return root if path == "/" else None


def serve(
    request: flask.Request,
    routes: Routes,
    *,
    paths: Mapping[str, Routes] | None = None,
    cors_origins: tuple[str, ...] | None = None,
) -> flask.Response:
    """Dispatch on the HTTP method; every answer is JSON, every failure a clear status.

    With ``paths`` (path -> routes, e.g. ``{"/preferences": {...}}``), a request to one of those
    paths takes its routes, any other path ``routes``; without, every path takes ``routes``."""
    cors = cors_headers(request, cors_origins) if cors_origins is not None else {}
    if request.method == "OPTIONS" and cors_origins is not None:
        if not cors:
            return respond(403, {"error": "origin not allowed"})
        return flask.Response(status=204, headers=cors)
    if paths is not None:
        routes = _routes_of_path(request, routes, paths) or {}
        if not routes:
            known = ", ".join(sorted({"/", *paths}))
            return respond(404, {"error": f"no such path {request.path[:100]!r}; use {known}"}, cors)
    handler = routes.get(request.method)
    if handler is None:
        allow = ", ".join(sorted(routes))
        return respond(405, {"error": f"method {request.method} not allowed; use {allow}"}, {"Allow": allow, **cors})
    try:
        result = handler(request)
    except HttpError as exc:
        return respond(exc.status, {"error": exc.message}, {**exc.headers, **cors})
    except RateLimited as exc:
        return respond(429, {"error": str(exc)}, {"Retry-After": str(exc.retry_after), **cors})
    except Unavailable as exc:
        log.warning(
            "dependency unavailable: answered 503", extra={"event": "http_5xx", "status": 503, "unavailable": exc.what}
        )
        return respond(503, {"error": f"{exc.what} is unavailable; retry later"}, {"Retry-After": "5", **cors})
    except Exception:
        log.exception("unexpected error", extra={"event": "http_5xx", "status": 500})
        return respond(500, {"error": "internal error"}, cors)
    status, body, *rest = result
    return respond(status, body, {**rest[0], **cors} if rest else cors)
