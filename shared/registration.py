"""The register use case: validate a device registration and apply it to the instance's token store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared import instance
from shared.jobs import PLATFORMS
from shared.store import MAX_TOKEN_CHARS, InvalidInput, Registration, check_token, check_user_id

MAX_TOKEN_LENGTH = MAX_TOKEN_CHARS


class InvalidRegistration(ValueError):
    """The request body is not a valid registration; the message says what is wrong."""


@dataclass(frozen=True)
class Device:
    token: str
    platform: str | None = None


def _check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
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


def parse_device(body: Any) -> Device:
    """A POST body: ``{"token": "...", "platform": "android"|"ios"|"web"}`` (platform optional)."""
    body = _check_fields(body, {"token", "platform"})
    token = _token(body)
    platform = body.get("platform")
    if platform is not None and platform not in PLATFORMS:
        raise InvalidRegistration(f"'platform' must be one of {', '.join(PLATFORMS)} (or left out)")
    return Device(token, platform)


def parse_removal(body: Any) -> str | None:
    """A DELETE body: exactly one of ``{"token": "..."}`` or ``{"all": true}``; None means all."""
    body = _check_fields(body, {"token", "all"})
    if ("token" in body) == ("all" in body):
        raise InvalidRegistration("give exactly one of 'token' or 'all': true")
    if "all" in body:
        if body["all"] is not True:
            raise InvalidRegistration("'all' must be true")
        return None
    return _token(body)


def register(user_id: str, device: Device) -> Registration:
    return instance.token_store().register(_user(user_id), device.token, device.platform)


def unregister(user_id: str, token: str | None) -> int:
    """Remove one device (or all, when token is None); returns how many were removed."""
    _user(user_id)
    store = instance.token_store()
    if token is None:
        return store.unregister_all(user_id)
    return int(store.unregister(user_id, token))
