"""The register use case: validate a device registration and apply it to the instance's token store.

A registration gives a token and, optionally, the device's attributes: ``platform``, ``locale``,
``time_zone`` and ``app_version`` (rules and canonical forms: ``shared/attributes.py``). An attribute
left out keeps its stored value (``KEEP``); ``null`` clears it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared import attributes, instance
from shared.jobs import PLATFORMS
from shared.store import (
    KEEP,
    MAX_TOKEN_CHARS,
    InvalidInput,
    Keep,
    Registration,
    check_token,
    check_user_id,
)

MAX_TOKEN_LENGTH = MAX_TOKEN_CHARS


class InvalidRegistration(ValueError):
    """The request body is not a valid registration; the message says what is wrong."""


@dataclass(frozen=True)
class Device:
    """A registration: the token, and each attribute as given (``KEEP`` when left out, None to clear)."""

    token: str
    platform: str | Keep | None = KEEP
    locale: str | Keep | None = KEEP
    time_zone: str | Keep | None = KEEP
    app_version: str | Keep | None = KEEP


def _platform(value: object) -> str:
    if value not in PLATFORMS:
        raise attributes.AttributeRuleError(f"must be one of {', '.join(PLATFORMS)} (or null, or left out)")
    return str(value)


# Each optional attribute and its check, which returns the value to store (canonical).
ATTRIBUTE_CHECKS: dict[str, Callable[[object], str]] = {
    "platform": _platform,
    "locale": attributes.canonical_locale,
    "time_zone": attributes.check_time_zone,
    "app_version": attributes.check_app_version,
}


def _check_fields(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRegistration("request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRegistration(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return body


def _token(body: dict[str, Any]) -> str:
    token = body.get("token")
    if token is None:
        raise InvalidRegistration("'token' is required")
    if not isinstance(token, str):
        raise InvalidRegistration("'token' must be a string")
    if not token:
        raise InvalidRegistration("'token' must not be empty")
    try:
        return check_token(token)
    except InvalidInput as exc:
        raise InvalidRegistration(str(exc)) from None


def _user(user_id: str) -> str:
    """The signed-in user (the ID token's subject) must be a user id the store holds."""
    try:
        return check_user_id(user_id)
    except InvalidInput as exc:
        raise InvalidRegistration(f"the signed-in user's id (the ID token's subject) is unusable: {exc}") from None


_DEVICE_FIELDS = frozenset({"token", *ATTRIBUTE_CHECKS})
_REMOVAL_FIELDS = frozenset({"token", "all"})


def parse_device(body: Any) -> Device:
    """A POST body: ``{"token": "...", "platform": ..., "locale": ..., "time_zone": ..., "app_version": ...}``
    (every attribute optional: left out keeps the stored value, null clears it)."""
    body = _check_fields(body, _DEVICE_FIELDS)
    token = _token(body)
    given: dict[str, str | None] = {}
    for name, check in ATTRIBUTE_CHECKS.items():
        if name not in body or body[name] is None:
            continue
        try:
            given[name] = check(body[name])
        except attributes.AttributeRuleError as exc:
            raise InvalidRegistration(f"'{name}' {exc}") from None
    values = {name: given.get(name) if name in body else KEEP for name in ATTRIBUTE_CHECKS}
    return Device(token, **values)


def parse_removal(body: Any) -> str | None:
    """A DELETE body: exactly one of ``{"token": "..."}`` or ``{"all": true}``; None means all."""
    body = _check_fields(body, _REMOVAL_FIELDS)
    if ("token" in body) == ("all" in body):
        raise InvalidRegistration("give exactly one of 'token' or 'all': true")
    if "all" in body:
        if body["all"] is not True:
            raise InvalidRegistration("'all' must be true")
        return None
    return _token(body)


def register(user_id: str, device: Device) -> Registration:
    return instance.token_store().register(
        _user(user_id),
        device.token,
        device.platform,
        locale=device.locale,
        time_zone=device.time_zone,
        app_version=device.app_version,
    )


def unregister(user_id: str, token: str | None) -> int:
    """Remove one device (or all, when token is None); returns how many were removed."""
    _user(user_id)
    store = instance.token_store()
    if token is None:
        return store.unregister_all(user_id)
    return int(store.unregister(user_id, token))
