"""A client for end-to-end tests: what a test does to a running stack over HTTP, and how it looks
into the stores, the fake FCM and the logs."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import urllib.error
import urllib.request
import uuid
import weakref
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
import requests

from local.idtoken import emulator_id_token
from local.servers import wait_until
from shared.db import Database
from shared.delivery import derived_id
from shared.store import TokenStore

DELIVER_SUBSCRIPTION = "pushline-deliver"  # local/stack.py's push subscription of the jobs topic


class PushRecorder:
    """Sits between the Pub/Sub emulator and ``deliver``: forwards each push unchanged and records
    deliver's answer per message, by notification id. A message is acknowledged when its last push
    was answered 2xx (the emulator pushes it again after anything else), so a test can wait until
    every copy of a job was acknowledged, not only until one of them made the notification done."""

    _installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, stack) -> PushRecorder:
        """The stack's recorder, put in front of its ``deliver`` on first use."""
        if stack not in cls._installed:
            cls._installed[stack] = cls(stack)
        return cls._installed[stack]

    def __init__(self, stack) -> None:
        self.target = stack.url("deliver") + "/"
        self._answers: dict[str, dict[str, int]] = {}  # notification id -> message id -> last status
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = recorder._forward(body, self.headers.get("Content-Type", "application/json"))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="push-recorder", daemon=True).start()
        stack.emulator.set_push_endpoint(DELIVER_SUBSCRIPTION, f"http://127.0.0.1:{self.server.server_address[1]}/")

    def _forward(self, body: bytes, content_type: str) -> int:
        request = urllib.request.Request(self.target, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=600) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 503  # deliver unreachable: the emulator pushes it again
        message_id, nid = _push_identity(body)
        with self._lock:
            self._answers.setdefault(nid, {})[message_id] = status
        return status

    def answers(self, nid: str) -> dict[str, int]:
        """Message id -> the status of its last push, for the messages of this notification."""
        with self._lock:
            return dict(self._answers.get(nid, {}))


def _push_identity(body: bytes) -> tuple[str, str]:
    """(message id, notification id) of a pushed job or part; ("", "") when it cannot be read."""
    try:
        message = json.loads(body)["message"]
        payload = json.loads(base64.b64decode(message.get("data") or ""))
        job = payload.get("job") if payload.get("kind") in ("part", "deferred") else payload
        message_id = str(message.get("messageId") or message.get("message_id") or "")
        nid = job.get("id") or derived_id(message.get("attributes") or {}, message_id)
        return message_id, str(nid)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        return "", ""


class Client:
    """What a test does to a running stack, over HTTP, and how it looks into Redis and the logs."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.http = requests.Session()
        self.redis = redis.Redis.from_url(stack.env["REDIS_URL"])
        self.db = Database(stack.env["DATABASE_URL"])
        self.store = TokenStore(self.redis, self.db, ttl_seconds=60 * 86400)
        if stack.using_emulator:
            PushRecorder.of(stack)  # in front of deliver before this test publishes anything

    def close(self) -> None:
        self.db.close()
        self.redis.close()
        self.http.close()

    def register(self, uid: str, token: str, platform: str | None = None, **attributes: str | None) -> None:
        body: dict[str, Any] = {"token": token, **attributes}
        if platform:
            body["platform"] = platform
        headers = {"Authorization": f"Bearer {emulator_id_token(uid, self.stack.config.project)}"}
        r = self.http.post(self.stack.url("register") + "/", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text

    def send(self, body: dict, headers: dict | None = None) -> str:
        r = self.http.post(self.stack.url("send") + "/", json=body, headers=headers or {}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def tick(self) -> int:
        """Call tick as Cloud Scheduler does (POST, no body); how many due jobs it published."""
        r = self.http.post(self.stack.url("tick") + "/", timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["published"]

    def status(self, nid: str) -> dict:
        r = self.http.get(f"{self.stack.url('send')}/{nid}", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_done(self, nid: str, timeout: float = 60) -> dict:
        found: dict = {}

        def done() -> bool:
            found.update(self.status(nid))
            return found["state"] == "done"

        wait_until(done, timeout=timeout, interval=0.1, what=f"notification {nid} to be done (last: {found})")
        return found

    def fcm(self, token: str | None = None) -> list[dict]:
        params = {"token": token} if token else {}
        return self.http.get(self.stack.url("fcm") + "/_fake/messages", params=params, timeout=30).json()["messages"]

    def received(self, tokens: list[str]) -> Counter:
        """Every request FCM received for these tokens, answered or not (the fake records a request
        before answering it, so one whose answer never went out counts too), per token."""
        wanted = set(tokens)
        return Counter(m["message"]["token"] for m in self.fcm() if m["message"]["token"] in wanted)

    def script(self, token: str, responses: list[str]) -> None:
        r = self.http.post(self.stack.url("fcm") + "/_fake/script", json={"token": token, "responses": responses})
        assert r.ok

    def messages(self, tokens: list[str]) -> list[dict]:
        wanted = set(tokens)
        return [m["message"] for m in self.fcm() if m["message"]["token"] in wanted]

    def counter(self, name: str) -> int:
        return int(self.redis.hget("notif:stats", name) or 0)

    def wait_counter(self, name: str, at_least: int) -> None:
        wait_until(lambda: self.counter(name) >= at_least, timeout=60, interval=0.1, what=f"{name} >= {at_least}")

    def log_lines(self, function: str) -> list[dict]:
        lines = []
        for line in self.stack.logs[function].read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def wait_acknowledged(self, nid: str, messages: int) -> None:
        """Wait until ``deliver`` acknowledged ``messages`` distinct messages of the notification (copies
        of its job, or its job and parts) and holds none for redelivery: after this, no copy is left
        that could still send (the barrier before counting what FCM received)."""
        recorder = PushRecorder.of(self.stack)
        seen: dict[str, int] = {}

        def acknowledged() -> bool:
            seen.clear()
            seen.update(recorder.answers(nid))
            return len(seen) >= messages and all(200 <= status < 300 for status in seen.values())

        wait_until(acknowledged, timeout=60, interval=0.1, what=f"{messages} messages of {nid} acknowledged ({seen})")


def unique(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"
