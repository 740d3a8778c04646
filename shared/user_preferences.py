"""The preferences use case of ``register``: the signed-in user reads and replaces their own."""

from __future__ import annotations

from typing import Any

from shared import instance, preferences
from shared.preferences import InvalidPreferences
from shared.store import InvalidInput, check_user_id

__all__ = ["InvalidPreferences", "read", "replace"]


def _user(user_id: str) -> str:
    try:
        return check_user_id(user_id)
    except InvalidInput as exc:
        raise InvalidPreferences("", f"the signed-in user's id (the ID token's subject) is unusable: {exc}") from None


def read(user_id: str) -> dict[str, Any]:
    """The user's document (``{"muted_categories": [], "quiet_hours": null}`` when none is stored)."""
    return instance.preference_store().get(_user(user_id)).to_json()


def replace(user_id: str, body: Any) -> dict[str, Any]:
    """Validate ``body`` (InvalidPreferences naming the field: nothing stored), store it whole, and
    return it as stored."""
    user = _user(user_id)
    prefs = preferences.parse(body)
    instance.preference_store().replace(user, prefs)
    return prefs.to_json()
