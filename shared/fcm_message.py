"""Turn a Job into FCM HTTP v1 ``message`` objects, one per device token.

Every message carries the job's **collapse identity**, so a retried or duplicated delivery
replaces the notification on the device instead of showing it twice:

* ``apns.headers["apns-collapse-id"] = job.id``
* ``webpush.headers["Topic"] = job.id`` (ids are at most 32 URL-safe characters, as Web Push requires)
* ``android.notification.tag = job.id``, only when the job has a notification: a data-only
  message gets no ``android.notification`` at all (Android would display it).

**Analytics label** (``job.analytics_label``): every message carries ``fcm_options.analytics_label``,
so FCM's delivery reports and BigQuery export group by it; a job without one sends no ``fcm_options``.

A data-only message is sent as a silent push on Apple devices: ``apns-priority`` "5" and
``aps["content-available"] = 1``, unless the job sets them.

**Localized text** (``job.localized``): a device takes the variant of its own locale, else of its
locale shortened subtag by subtag (``zh-Hans-CN`` -> ``zh-Hans`` -> ``zh``), else the job's
``notification`` (``shared.attributes.select_variant``). The variant replaces the whole
``notification`` (what it leaves out is absent); everything else is the job's.

The token-independent part is built once per job (:class:`MessageTemplate`), and once per device
locale met in it (cached: a part with 500 devices in three locales chooses three times); each
message is a shallow copy plus the token, so the nested dicts are shared between messages: do not
mutate them. Each message is a :class:`Message`, a dict that also knows its HTTP v1 request body:
the template's JSON is encoded once (per locale), and a message's body is that plus its token (the
HTTP client sends it; firebase-admin's path sends the dict).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from shared.attributes import select_variant
from shared.jobs import Job

__all__ = ["Message", "MessageTemplate", "build_message"]

_BODY_HEAD = b'{"message": {"token": '  # a request body up to its message's token, which comes first


class Message(dict[str, Any]):
    """One token's FCM v1 ``message`` (``{"token": ..., **template}``), and its request body
    ``{"message": ...}`` without encoding the whole message again: the template's part is encoded
    once. Do not mutate it (the body would no longer say what the dict says)."""

    __slots__ = ("_tail",)
    _tail: bytes

    def request_body(self) -> bytes:
        return _BODY_HEAD + json.dumps(self["token"]).encode() + self._tail


def _tail(base: dict[str, Any]) -> bytes:
    """The encoded request body after the token, for messages made of ``base``."""
    whole = json.dumps({"message": {"token": "", **base}}).encode()
    assert whole.startswith(_BODY_HEAD + b'""')
    return whole[len(_BODY_HEAD) + 2 :]


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


class MessageTemplate:
    """The part of a job's FCM messages that does not depend on the token, built once (and once per
    device locale, for a localized job)."""

    __slots__ = ("_by_locale", "_localized", "base", "job_id")

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
        if job.analytics_label is not None:  # in the template: no per-message cost
            base["fcm_options"] = {"analytics_label": job.analytics_label}
        self.base = base
        self._localized: Mapping[str, dict] = job.localized or {}
        # device locale -> its base and the base's encoded tail (see Message)
        self._by_locale: dict[str | None, tuple[dict[str, Any], bytes]] = {None: (base, _tail(base))}

    def base_for(self, locale: str | None) -> dict[str, Any]:
        """The token-independent message for a device of ``locale`` (canonical, or None)."""
        return self._entry(locale)[0]

    def _entry(self, locale: str | None) -> tuple[dict[str, Any], bytes]:
        try:
            return self._by_locale[locale]
        except KeyError:
            pass
        chosen = select_variant(locale, self._localized)
        base = self.base if chosen is None else {**self.base, "notification": dict(self._localized[chosen])}
        entry = self._by_locale[locale] = (base, _tail(base))
        return entry

    def for_token(self, token: str, locale: str | None = None) -> Message:
        """The FCM v1 ``message`` for one device token (shares nested dicts with the template)."""
        base, tail = self._by_locale[None] if locale is None else self._entry(locale)
        message = Message()
        message["token"] = token
        message.update(base)
        message._tail = tail
        return message

    def message_for(self, locales: Mapping[str, str]) -> Callable[[str], Message]:
        """``token -> message`` for a part whose devices have ``locales`` (token -> canonical locale;
        a token without one gets the job's notification). Without localized text, ``for_token``."""
        if not self._localized:
            return self.for_token
        get, for_token = locales.get, self.for_token
        return lambda token: for_token(token, get(token))


def build_message(job: Job, token: str, locale: str | None = None) -> dict[str, Any]:
    """The FCM v1 ``message`` object for one token. For many tokens, use ``MessageTemplate(job)``."""
    return MessageTemplate(job).for_token(token, locale)
