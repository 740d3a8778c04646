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
mutate them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from shared.attributes import select_variant
from shared.jobs import Job

__all__ = ["MessageTemplate", "build_message"]


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
        self._by_locale: dict[str | None, dict[str, Any]] = {None: base}  # device locale -> its base

    def base_for(self, locale: str | None) -> dict[str, Any]:
        """The token-independent message for a device of ``locale`` (canonical, or None)."""
        try:
            return self._by_locale[locale]
        except KeyError:
            pass
        chosen = select_variant(locale, self._localized)
        base = self.base if chosen is None else {**self.base, "notification": dict(self._localized[chosen])}
        self._by_locale[locale] = base
        return base

    def for_token(self, token: str, locale: str | None = None) -> dict[str, Any]:
        """The FCM v1 ``message`` for one device token (shares nested dicts with the template)."""
        message = {"token": token}
        message.update(self.base if locale is None else self.base_for(locale))
        return message

    def message_for(self, locales: Mapping[str, str]) -> Callable[[str], dict[str, Any]]:
        """``token -> message`` for a part whose devices have ``locales`` (token -> canonical locale;
        a token without one gets the job's notification). Without localized text, ``for_token``."""
        if not self._localized:
            return self.for_token
        base, by_locale, get = self.base, self._by_locale, locales.get

        def for_token(token: str) -> dict[str, Any]:
            locale = get(token)
            message = {"token": token}
            if locale is None:
                message.update(base)
            else:
                message.update(by_locale.get(locale) or self.base_for(locale))
            return message

        return for_token


def build_message(job: Job, token: str, locale: str | None = None) -> dict[str, Any]:
    """The FCM v1 ``message`` object for one token. For many tokens, use ``MessageTemplate(job)``."""
    return MessageTemplate(job).for_token(token, locale)
