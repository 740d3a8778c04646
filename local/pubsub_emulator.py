"""The real Pub/Sub emulator for tests: start, wait until it answers, stop, and talk REST to it.

The emulator speaks gRPC and REST on the same port. Push subscriptions deliver plain JSON
(``{"message": ..., "subscription": ...}``, no ``ce-`` headers); functions-framework turns that into
a CloudEvent for a CloudEvent function.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Self

import requests


class EmulatorUnavailable(RuntimeError):
    """gcloud (with the Pub/Sub emulator component) is not installed, or the emulator did not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class PubSubEmulator:
    """One emulator process (group) on 127.0.0.1:<free port>, for project ``project``."""

    def __init__(self, project: str = "demo-pushline", port: int | None = None, start_timeout: float = 60.0) -> None:
        self.project = project
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.host = f"127.0.0.1:{self.port}"
        self.base_url = f"http://{self.host}/v1"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._session = requests.Session()
        self._exit_code: int | None = None

    # -- lifecycle

    def start(self) -> Self:
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise EmulatorUnavailable(
                "gcloud is not on PATH: install the Google Cloud SDK with the pubsub-emulator component "
                "(Java 11+) to run the Pub/Sub emulator tests"
            )
        self._log = tempfile.TemporaryFile()  # closed in stop()
        self._process = subprocess.Popen(
            [
                gcloud,
                "beta",
                "emulators",
                "pubsub",
                "start",
                f"--host-port={self.host}",
                f"--project={self.project}",
                "--quiet",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills gcloud and the Java child
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                output = self.output()
                self.stop()
                raise EmulatorUnavailable(f"the Pub/Sub emulator exited ({self._exit_code}):\n{output}")
            with contextlib.suppress(requests.RequestException):
                if self._session.get(f"http://{self.host}/", timeout=1).ok:
                    return self
            time.sleep(0.2)  # bounded polling of readiness
        output = self.output()
        self.stop()
        raise EmulatorUnavailable(f"the Pub/Sub emulator did not answer within {self.start_timeout}s:\n{output}")

    def output(self) -> str:
        """What the emulator printed so far (for failure messages)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the whole process group (gcloud and Java) and wait until the port is closed."""
        process, self._process = self._process, None
        if process is not None:
            self._exit_code = process.poll()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    continue
                # gcloud may exit before its Java child: make sure the group is empty.
                if not _group_alive(process.pid):
                    break
            deadline = time.monotonic() + timeout
            while _group_alive(process.pid) or port_is_open("127.0.0.1", self.port):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)  # bounded polling until the port is released
        if self._log is not None:
            self._log.close()
            self._log = None
        self._session.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a client library (and pushline) at this emulator."""
        return {
            "PUBSUB_EMULATOR_HOST": self.host,
            "PUBSUB_PROJECT_ID": self.project,
            "GOOGLE_CLOUD_PROJECT": self.project,
        }

    # -- REST helpers

    def topic_path(self, topic: str) -> str:
        return topic if topic.startswith("projects/") else f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, subscription: str) -> str:
        if subscription.startswith("projects/"):
            return subscription
        return f"projects/{self.project}/subscriptions/{subscription}"

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        response = self._session.request(method, f"{self.base_url}/{path}", json=body, timeout=30)
        if not response.ok:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else {}

    def create_topic(self, topic: str) -> str:
        path = self.topic_path(topic)
        self._call("PUT", path)
        return path

    def create_push_subscription(
        self,
        subscription: str,
        topic: str,
        push_endpoint: str,
        *,
        ack_deadline: int = 600,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> str:
        path = self.subscription_path(subscription)
        self._call(
            "PUT",
            path,
            {
                "topic": self.topic_path(topic),
                "pushConfig": {"pushEndpoint": push_endpoint},
                "ackDeadlineSeconds": ack_deadline,
                "retryPolicy": {"minimumBackoff": f"{min_backoff}s", "maximumBackoff": f"{max_backoff}s"},
            },
        )
        return path

    def set_push_endpoint(self, subscription: str, push_endpoint: str) -> None:
        """Push the subscription's messages to another URL from now on (its retry policy stays)."""
        path = self.subscription_path(subscription)
        self._call("POST", f"{path}:modifyPushConfig", {"pushConfig": {"pushEndpoint": push_endpoint}})

    def create_pull_subscription(self, subscription: str, topic: str, *, ack_deadline: int = 60) -> str:
        path = self.subscription_path(subscription)
        self._call("PUT", path, {"topic": self.topic_path(topic), "ackDeadlineSeconds": ack_deadline})
        return path

    def pull(self, subscription: str, max_messages: int = 10, *, ack: bool = True) -> list[dict[str, Any]]:
        """Pull (and by default acknowledge) up to ``max_messages``; ``data`` comes back decoded to bytes."""
        path = self.subscription_path(subscription)
        received = self._call("POST", f"{path}:pull", {"maxMessages": max_messages, "returnImmediately": True})
        messages = received.get("receivedMessages", [])
        if ack and messages:
            self._call("POST", f"{path}:acknowledge", {"ackIds": [m["ackId"] for m in messages]})
        out = []
        for m in messages:
            message = dict(m["message"])
            message["data"] = base64.b64decode(message.get("data", ""))
            out.append(message)
        return out

    def pull_until(self, subscription: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Pull until ``count`` messages arrived or ``timeout`` passed (bounded polling)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            got.extend(self.pull(subscription, count - len(got)))
            if len(got) < count:
                time.sleep(0.05)
        return got

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        """Publish over REST; returns the message id."""
        message: dict[str, Any] = {"data": base64.b64encode(data).decode("ascii")}
        if attributes:
            message["attributes"] = dict(attributes)
        result = self._call("POST", f"{self.topic_path(topic)}:publish", {"messages": [message]})
        return result["messageIds"][0]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
