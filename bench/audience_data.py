"""The audience benchmark's devices: N rows of ``device_tokens``, five per user, loaded by one statement.

Users ``au0000000``.., platforms, locales, time zones and app versions mixed (some devices without a
locale or a version), every device live (registered within the last day) and first registered
before the run (``created_at`` up to 300 days back). Tokens are ~155 characters (FCM's are ~150),
starting ``ok-`` so that the fake FCM answers 200. Nothing goes to Redis: an audience's expansion
reads PostgreSQL only, and its parts carry what ``deliver`` needs per device.
"""

from __future__ import annotations

import time

import pg8000.native

from shared.attributes import version_key
from shared.db import connect_kwargs
from shared.jobs import part_count

DEVICES_PER_USER = 5
LOCALES = ["en-US", "de", "de-AT", "fr-FR", "fr-CA", "pt-BR", "zh-Hans-CN", "es", "ja", None]
TIME_ZONES = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "America/Sao_Paulo", None]
APP_VERSIONS = ["2.3", "2.10.1", "3.0", "4.1.2", "1.9", None]

# The text of the benchmark's notification, with variants its devices' locales select.
NOTIFICATION = {"title": "Benchmark", "body": "pushline audience throughput"}
LOCALIZED = {
    "de": {"title": "Benchmark", "body": "pushline Zielgruppen-Durchsatz"},
    "fr": {"title": "Banc d'essai", "body": "débit d'audience de pushline"},
    "pt-BR": {"title": "Benchmark", "body": "vazão de público do pushline"},
}

_INSERT = """
INSERT INTO device_tokens
    (user_id, token, platform, locale, time_zone, app_version, app_version_key, updated_at, created_at)
SELECT 'au' || lpad((i / :per_user)::text, 7, '0'),
       'ok-' || lpad(i::text, 9, '0') || '-' || repeat('x', 140),
       (ARRAY['android', 'ios', 'web'])[1 + i % 3],
       (CAST(:locales AS text[]))[1 + (i / 3) % :n_locales],
       (CAST(:zones AS text[]))[1 + (i / 7) % :n_zones],
       (CAST(:versions AS text[]))[1 + (i / 11) % :n_versions],
       (CAST(:keys AS numeric[]))[1 + (i / 11) % :n_versions],
       now() - make_interval(mins => i % 1440),
       now() - make_interval(days => 1 + i % 300, secs => i % 86400)
FROM generate_series(0, :devices - 1) AS i
"""


def seed(database_url: str, devices: int) -> float:
    """Empty ``device_tokens`` (the bench database is the benchmark's alone) and load ``devices`` rows;
    returns seconds (insert, index upkeep and ANALYZE). Its own connection without the pool's socket
    timeout: a million rows take longer than any request should."""
    conn = pg8000.native.Connection(**{**connect_kwargs(database_url), "timeout": None})
    try:
        t0 = time.perf_counter()
        conn.run("TRUNCATE device_tokens")
        conn.run(
            _INSERT,
            per_user=DEVICES_PER_USER,
            locales=LOCALES,
            n_locales=len(LOCALES),
            zones=TIME_ZONES,
            n_zones=len(TIME_ZONES),
            versions=APP_VERSIONS,
            keys=[None if v is None else str(version_key(v)) for v in APP_VERSIONS],
            n_versions=len(APP_VERSIONS),
            devices=devices,
        )
        conn.run("ANALYZE device_tokens")
        return time.perf_counter() - t0
    finally:
        conn.close()


def users(devices: int) -> int:
    return part_count(devices, DEVICES_PER_USER)  # (ceiling division)
