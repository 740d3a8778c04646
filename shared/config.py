"""Every environment variable pushline reads, typed, with its default, in one place.

Nothing else in the code calls ``os.environ`` for configuration. ``settings()`` reads the
environment once per instance (cached); tests that change the environment call
``settings.cache_clear()``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

DAY = 86_400

# Variables that only make sense on a developer's machine: each one either disables a security
# check (unsigned ID tokens) or diverts notifications to somewhere that is not Google. In the cloud
# one *present* at all is refused, blank or not: firebase-admin and google-cloud-pubsub read the raw
# value, and to them " " is set (unsigned ID tokens would pass).
LOCAL_ONLY_VARIABLES = (
    "FIREBASE_AUTH_EMULATOR_HOST",
    "FCM_ENDPOINT",
    "DELIVER_URL",
    "PUBSUB_EMULATOR_HOST",
    "ON_EVENT_URL",
)


class ConfigError(RuntimeError):
    """The configuration cannot work; the message says which variable and why."""


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _str(env: dict[str, str], name: str, default: str | None = None) -> str | None:
    raw = env.get(name, "").strip()
    return raw or default


@dataclass(frozen=True)
class Settings:
    # Stores
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    cloud_sql_instance: str | None = None
    token_ttl_seconds: int = 60 * DAY
    max_tokens_per_user: int = 50
    register_rate_per_minute: int = 60
    reconcile_seconds: int = 400
    # Google Cloud / Firebase
    google_cloud_project: str = "demo-pushline"
    firebase_auth_emulator_host: str | None = None
    cors_allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    # Bus
    pubsub_topic: str = "pushline-jobs"
    pubsub_emulator_host: str | None = None
    deliver_url: str | None = None
    events_topic: str = "pushline-events"
    on_event_url: str | None = None
    # FCM
    fcm_credentials_secret: str | None = None
    fcm_endpoint: str | None = None
    fcm_client: str = "http"
    fcm_max_in_flight: int = 500
    fcm_rate_per_minute: int = 600_000
    fcm_timeout_seconds: int = 10
    max_attempts: int = 5
    # Claims
    ledger_ttl_seconds: int = 7 * DAY
    once_ttl_seconds: int = DAY
    idempotency_ttl_seconds: int = DAY
    # Fan-out: users per part of a job
    fanout_users_per_part: int = 500
    # Domain events
    event_rules: str | None = None
    # Runtime
    k_service: str | None = None
    log_level: str = "INFO"
    # For check_cloud_safety: the local-only variables present in the environment (blank ones too),
    # and whether GOOGLE_CLOUD_PROJECT was given (the default project is for local runs only).
    local_only_present: tuple[str, ...] = ()
    project_given: bool = False

    @property
    def in_cloud(self) -> bool:
        return self.k_service is not None

    @property
    def topic_path(self) -> str:
        return self.full_topic(self.pubsub_topic)

    @property
    def events_topic_path(self) -> str:
        return self.full_topic(self.events_topic)

    def full_topic(self, topic: str) -> str:
        if topic.startswith("projects/"):
            return topic
        return f"projects/{self.google_cloud_project}/topics/{topic}"


def load(env: dict[str, str] | None = None) -> Settings:
    """Build Settings from an environment mapping (default: ``os.environ``)."""
    env = dict(os.environ if env is None else env)
    origins = tuple(o.strip().rstrip("/") for o in env.get("CORS_ALLOWED_ORIGINS", "").split(",") if o.strip())
    fcm_client = (_str(env, "FCM_CLIENT", "http") or "http").lower()
    if fcm_client not in ("http", "sdk"):
        raise ConfigError(f"FCM_CLIENT must be 'http' or 'sdk', got {fcm_client!r}")
    given_project = _str(env, "GOOGLE_CLOUD_PROJECT")
    project = given_project or _str(env, "GCLOUD_PROJECT") or "demo-pushline"
    return Settings(
        redis_url=_str(env, "REDIS_URL", Settings.redis_url),
        database_url=_str(env, "DATABASE_URL", Settings.database_url),
        cloud_sql_instance=_str(env, "CLOUD_SQL_INSTANCE"),
        token_ttl_seconds=_int(env, "TOKEN_TTL_SECONDS", Settings.token_ttl_seconds, minimum=1),
        max_tokens_per_user=_int(env, "MAX_TOKENS_PER_USER", Settings.max_tokens_per_user, minimum=1),
        register_rate_per_minute=_int(env, "REGISTER_RATE_PER_MINUTE", Settings.register_rate_per_minute),
        reconcile_seconds=_int(env, "RECONCILE_SECONDS", Settings.reconcile_seconds),
        google_cloud_project=project,
        firebase_auth_emulator_host=_str(env, "FIREBASE_AUTH_EMULATOR_HOST"),
        cors_allowed_origins=origins,
        pubsub_topic=_str(env, "PUBSUB_TOPIC", Settings.pubsub_topic),
        pubsub_emulator_host=_str(env, "PUBSUB_EMULATOR_HOST"),
        deliver_url=_str(env, "DELIVER_URL"),
        events_topic=_str(env, "EVENTS_TOPIC", Settings.events_topic),
        on_event_url=_str(env, "ON_EVENT_URL"),
        fcm_credentials_secret=_str(env, "FCM_CREDENTIALS_SECRET"),
        fcm_endpoint=_str(env, "FCM_ENDPOINT"),
        fcm_client=fcm_client,
        fcm_max_in_flight=_int(env, "FCM_MAX_IN_FLIGHT", Settings.fcm_max_in_flight, minimum=1),
        fcm_rate_per_minute=_int(env, "FCM_RATE_PER_MINUTE", Settings.fcm_rate_per_minute),
        fcm_timeout_seconds=_int(env, "FCM_TIMEOUT_SECONDS", Settings.fcm_timeout_seconds, minimum=1),
        max_attempts=_int(env, "MAX_ATTEMPTS", Settings.max_attempts, minimum=1),
        ledger_ttl_seconds=_int(env, "LEDGER_TTL_SECONDS", Settings.ledger_ttl_seconds, minimum=60),
        once_ttl_seconds=_int(env, "ONCE_TTL_SECONDS", Settings.once_ttl_seconds, minimum=1),
        idempotency_ttl_seconds=_int(env, "IDEMPOTENCY_TTL_SECONDS", Settings.idempotency_ttl_seconds, minimum=1),
        fanout_users_per_part=_int(env, "FANOUT_USERS_PER_PART", Settings.fanout_users_per_part, minimum=1),
        event_rules=_str(env, "EVENT_RULES"),
        k_service=_str(env, "K_SERVICE"),
        log_level=(_str(env, "LOG_LEVEL", "INFO") or "INFO").upper(),
        local_only_present=tuple(name for name in LOCAL_ONLY_VARIABLES if name in env),
        project_given=given_project is not None,
    )


@functools.cache
def settings() -> Settings:
    """The instance's settings, read from the environment on first use."""
    return load()


def check_cloud_safety(s: Settings) -> None:
    """Refuse to run in the cloud with a switch that is only safe on a developer's machine (present
    at all, even blank), or without ``GOOGLE_CLOUD_PROJECT``; the error names every variable."""
    if not s.in_cloud:
        return
    problems = []
    if s.local_only_present:
        problems.append(
            f"{', '.join(s.local_only_present)} present (even blank counts) while running in the cloud: "
            "these are for local development only (unsigned ID tokens pass, or notifications are "
            "diverted); remove them from the deployment"
        )
    if not s.project_given:
        problems.append(
            "GOOGLE_CLOUD_PROJECT is unset or blank: in the cloud it must name the project "
            "(ID tokens, FCM and topics belong to it); the local default demo-pushline is never used there"
        )
    if problems:
        raise ConfigError(f"refusing to start (K_SERVICE={s.k_service}): " + "; ".join(problems))
