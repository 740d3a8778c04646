"""A client for end-to-end tests: what a test does to a running stack over HTTP, and how it looks
into the stores, the fake FCM and the logs."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import redis
import requests

from local.idtoken import emulator_id_token
from local.servers import wait_until
from shared.db import Database
from shared.store import TokenStore


class Client:
    """What a test does to a running stack, over HTTP, and how it looks into Redis and the logs."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.http = requests.Session()
        self.redis = redis.Redis.from_url(stack.env["REDIS_URL"])
        self.db = Database(stack.env["DATABASE_URL"])
        self.store = TokenStore(self.redis, self.db, ttl_seconds=60 * 86400)

    def close(self) -> None:
        self.db.close()
        self.redis.close()
        self.http.close()

    def register(self, uid: str, token: str, platform: str | None = None) -> None:
        body: dict[str, Any] = {"token": token}
        if platform:
            body["platform"] = platform
        headers = {"Authorization": f"Bearer {emulator_id_token(uid, self.stack.config.project)}"}
        r = self.http.post(self.stack.url("register") + "/", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text

    def send(self, body: dict, headers: dict | None = None) -> str:
        r = self.http.post(self.stack.url("send") + "/", json=body, headers=headers or {}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()["id"]

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
        wanted = set(tokens)
        return Counter(
            m["message"]["token"] for m in self.fcm() if m["message"]["token"] in wanted and m.get("status") == 200
        )

    def script(self, token: str, responses: list[str]) -> None:
        r = self.http.post(self.stack.url("fcm") + "/_fake/script", json={"token": token, "responses": responses})
        assert r.ok

    def attempts(self, tokens: list[str]) -> Counter:
        wanted = set(tokens)
        return Counter(m["message"]["token"] for m in self.fcm() if m["message"]["token"] in wanted)

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

    def parts_processed(self, nid: str) -> int:
        """How many times ``deliver`` finished a copy of the job (a barrier for duplicates)."""
        return sum(
            1
            for e in self.log_lines("deliver")
            if e.get("message") == "part processed" and e.get("notification_id") == nid
        )

    def wait_parts_processed(self, nid: str, at_least: int) -> None:
        wait_until(
            lambda: self.parts_processed(nid) >= at_least,
            timeout=60,
            interval=0.1,
            what=f"deliver to process {at_least} copies of {nid}",
        )


def unique(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"
