"""Turn a Job into FCM HTTP v1 ``message`` objects, one per device token.

Every message carries the job's **collapse identity**, so a retried or duplicated delivery
replaces the notification on the device instead of showing it twice:

* ``apns.headers["apns-collapse-id"] = job.id``
* ``webpush.headers["Topic"] = job.id`` (ids are at most 32 URL-safe characters, as Web Push requires)
* ``android.notification.tag = job.id``, only when the job has a notification: a data-only
  message gets no ``android.notification`` at all (Android would display it).

A data-only message is sent as a silent push on Apple devices: ``apns-priority`` "5" and
``aps["content-available"] = 1``, unless the job sets them.

The token-independent part is built once per job (:class:`MessageTemplate`); each message is a
shallow copy plus the token, so the nested dicts are shared between messages: do not mutate them.
"""

from __future__ import annotations

from typing import Any

from shared.jobs import Job

__all__ = ["MessageTemplate", "build_message"]


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


class MessageTemplate:
    """The part of a job's FCM messages that does not depend on the token, built once."""

    __slots__ = ("base", "job_id")

    def __init__(self, job: Job) -> None:
        self.job_id = job.id
        base: dict[str, Any] = {}
        if job.notification is not None:
            base["notification"] = dict(job.notification)
        if job.data is not None:
            base["data"] = dict(job.data)

        android: dict[str, Any] = _copy(job.android) if job.android else {}
        apns: dict[str, Any] = _copy(job.apns) if job.apns else {}
        webpush: dict[str, Any] = _copy(job.webpush) if job.webpush else {}

        apns_headers = apns.setdefault("headers", {})
        apns_headers["apns-collapse-id"] = job.id
        webpush.setdefault("headers", {})["Topic"] = job.id
        if job.notification is not None:
            android.setdefault("notification", {})["tag"] = job.id
        else:
            # Validation already refuses android.notification on a data-only job; stay safe anyway.
            android.pop("notification", None)
            apns_headers.setdefault("apns-priority", "5")
            aps = apns.setdefault("payload", {}).setdefault("aps", {})
            aps.setdefault("content-available", 1)

        if android:
            base["android"] = android
        base["apns"] = apns
        base["webpush"] = webpush
        self.base = base

    def for_token(self, token: str) -> dict[str, Any]:
        """The FCM v1 ``message`` for one device token (shares nested dicts with the template)."""
        message = {"token": token}
        message.update(self.base)
        return message


def build_message(job: Job, token: str) -> dict[str, Any]:
    """The FCM v1 ``message`` object for one token. For many tokens, use ``MessageTemplate(job)``."""
    return MessageTemplate(job).for_token(token)
