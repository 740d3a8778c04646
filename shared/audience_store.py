"""``AudienceStore``: the SQL that finds an audience's devices in ``device_tokens``, a page at a time.

A page is one statement: a keyset scan of at most ``rows`` rows in the order of the index
``device_tokens_expansion_idx`` (``created_at, user_id, token``), after the cursor, among the rows
first registered for their current user before the expansion's start; the rows of the page that
match the audience are returned with the last row examined (the next cursor). So a page examines a
bounded number of rows however few match, runs under a ``statement_timeout``, and a device
registered after the start (``created_at`` later) never moves the pages. Liveness
(``TOKEN_TTL_SECONDS``) and ``active_within_days`` count back from the start too, so a redone page
finds the same devices unless one was removed meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pg8000.native

from shared.attributes import version_key
from shared.db import Database, DatabaseUnavailable
from shared.store import StoreUnavailable

STATEMENT_TIMEOUT_MS = 10_000  # one page; PostgreSQL cancels it beyond this (then the bus redelivers)
FIRST_CURSOR = ["-infinity", "", ""]

# One statement for every audience: a filter left out is bound as NULL and passes every row. The
# filters only ever look at the page's rows (the keyset scan bounds them), so they need no index.
_SQL_PAGE = """
WITH scanned AS (
    SELECT user_id, token, platform, locale, time_zone, app_version_key, created_at, updated_at
    FROM device_tokens
    WHERE (created_at, user_id, token) > (CAST(:at AS timestamptz), :user_id, :token)
      AND created_at < CAST(:start AS timestamptz)
    ORDER BY created_at, user_id, token
    LIMIT :rows
), last AS (
    SELECT created_at, user_id, token FROM scanned ORDER BY created_at DESC, user_id DESC, token DESC LIMIT 1
)
SELECT 'row', token, user_id, platform, locale FROM scanned
WHERE updated_at > CAST(:start AS timestamptz) - make_interval(secs => :ttl)
  AND (CAST(:platforms AS json) IS NULL
       OR platform IN (SELECT json_array_elements_text(CAST(:platforms AS json))))
  AND (CAST(:locales AS json) IS NULL OR EXISTS (
       SELECT 1 FROM json_array_elements_text(CAST(:locales AS json)) AS f(tag)
       WHERE locale = f.tag OR starts_with(locale, f.tag || '-')))
  AND (CAST(:time_zones AS json) IS NULL
       OR time_zone IN (SELECT json_array_elements_text(CAST(:time_zones AS json))))
  AND (CAST(:app_version_min AS numeric) IS NULL OR app_version_key >= CAST(:app_version_min AS numeric))
  AND (CAST(:app_version_below AS numeric) IS NULL OR app_version_key < CAST(:app_version_below AS numeric))
  AND (CAST(:active_within_days AS integer) IS NULL
       OR updated_at > CAST(:start AS timestamptz) - make_interval(days => CAST(:active_within_days AS integer)))
UNION ALL SELECT 'last', created_at::text, user_id, token, NULL FROM last
UNION ALL SELECT 'scanned', count(*)::text, NULL, NULL, NULL FROM scanned
"""
_FILTER_PARAMS = ("platforms", "locales", "time_zones", "app_version_min", "app_version_below", "active_within_days")


@dataclass(frozen=True)
class Device:
    token: str
    user_id: str
    platform: str | None
    locale: str | None


@dataclass(frozen=True)
class Page:
    """The matching devices of one page, the cursor after it, and whether it was the last page."""

    devices: list[Device]
    cursor: list[str]
    last: bool


def filter_params(audience: Mapping[str, Any]) -> dict[str, Any]:
    """The bound parameters of an audience's filters (``{"all": true}``: none)."""
    params: dict[str, Any] = dict.fromkeys(_FILTER_PARAMS)
    for name in ("platforms", "locales", "time_zones"):
        if name in audience:
            params[name] = json.dumps(audience[name])
    params["active_within_days"] = audience.get("active_within_days")
    versions = audience.get("app_version") or {}
    for bound in ("min", "below"):
        if bound in versions:
            params[f"app_version_{bound}"] = str(version_key(versions[bound]))
    return params


class AudienceStore:
    """Pages of an audience's devices, read from PostgreSQL."""

    def __init__(self, database: Database, *, ttl_seconds: int) -> None:
        self.db = database
        self.ttl = ttl_seconds

    def now(self) -> str:
        """PostgreSQL's clock, as text that casts back to the same timestamptz (an expansion's start)."""
        return str(self._run("SELECT clock_timestamp()::text")[0][0])

    def page(self, audience: Mapping[str, Any], start: str, cursor: list[str] | None, rows: int) -> Page:
        """The devices matching ``audience`` among at most ``rows`` rows after ``cursor``."""
        at, user_id, token = cursor or FIRST_CURSOR
        found = self._run(
            _SQL_PAGE,
            start=start,
            at=at,
            user_id=user_id,
            token=token,
            rows=rows,
            ttl=self.ttl,
            **filter_params(audience),
        )
        devices: list[Device] = []
        scanned, after = 0, list(cursor or FIRST_CURSOR)
        for kind, a, b, c, d in found:
            if kind == "row":
                devices.append(Device(a, b, c, d))
            elif kind == "last":
                after = [a, b, c]
            else:
                scanned = int(a)
        return Page(devices, after, scanned < rows)

    def _run(self, sql: str, **params: Any) -> list[list[Any]]:
        try:
            return self.db.run_limited(sql, STATEMENT_TIMEOUT_MS, **params)
        except DatabaseUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except pg8000.native.DatabaseError as exc:
            code = exc.args[0].get("C", "") if exc.args and isinstance(exc.args[0], dict) else ""
            if code[:2] in ("08", "57", "53"):  # connection, shutdown or cancelled (statement_timeout), resources
                raise StoreUnavailable(f"PostgreSQL unavailable ({code})") from exc
            raise
