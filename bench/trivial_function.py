"""The least an HTTP function can do under functions-framework: read the body, answer a small JSON.

``bench/register_floor.py`` serves it beside ``register`` (same server, same requests) to measure what
gunicorn, Flask/werkzeug and functions-framework cost a request before any of our code runs.
"""

from __future__ import annotations

import flask
import functions_framework


@functions_framework.http
def trivial_function(request: flask.Request) -> flask.Response:
    request.get_data()
    return flask.Response('{"ok":true}', status=200, mimetype="application/json")
