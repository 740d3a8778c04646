"""Structured logs: one JSON object per line, in Cloud Logging's format.

``severity`` and ``message`` are the fields Cloud Logging indexes; anything passed as ``extra``
fields (``log.info("sent", extra={"notification_id": ..., "counts": ...})``) is added to the
object. Device tokens are never logged whole: pass them through ``short()``.

A line with an ``event`` field is one a log-based metric counts (infra/monitoring): it is written
whatever ``LOG_LEVEL`` says, so quieter logs never silence a dashboard panel or an alert.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_configured = False


def short(token: str | None) -> str:
    """A device token shortened so it identifies a device in logs without revealing it."""
    if not token:
        return ""
    if len(token) <= 12:
        return token[:2] + "…"
    return f"{token[:6]}…{token[-4:]}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname if record.levelname != "WARN" else "WARNING",
            "message": record.getMessage(),
            "logger": record.name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _LevelOrCounted(logging.Filter):
    """Lines at ``level`` or above, and the counted ones (an ``event`` field) at any level."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or "event" in record.__dict__


def setup(level: str = "INFO") -> None:
    """Send every ``pushline.*`` log line at ``level`` or above, and every counted line, to stderr as JSON
    (idempotent)."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("pushline")
    root.setLevel(level)  # (an unknown level name is refused here)
    threshold = root.level
    handler.addFilter(_LevelOrCounted(threshold))
    root.handlers[:] = [handler]
    root.setLevel(min(threshold, logging.INFO))  # INFO lines reach the handler, which keeps the counted ones
    root.propagate = False
    _configured = True


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"pushline.{name}")
