"""Every environment variable pushline reads, declared once: name, type, default, meaning.

Each ``Settings`` field below is one declaration (``variable(...)``): its type is the field's
annotation, and the declaration drives loading (``load``), the cloud-safety check (``local_only``),
the README's configuration tables (tests/test_config.py compares them row by row) and the start-up
warning about variables nothing reads (``warn_unknown``). Adding a variable is adding one field.

Nothing else in the code calls ``os.environ`` for configuration. ``settings()`` reads the
environment once per instance (cached); tests that change the environment call
``settings.cache_clear()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import logs

DAY = 86_400
# The longest delivery window the bus can carry a part through: Pub/Sub redelivers a message at most
# 100 times (the dead-letter policy's maximum) with at most 600 s between tries, ~16.7 h (~15.7 h with
# the backoff's ramp from 10 s), so 14 h leaves over an hour and a half to spare (README: Delivery window).
MAX_DELIVERY_WINDOW_SECONDS = 50_400
KINDS = ("int", "str", "str | None", "tuple[str, ...]")  # the annotations a declared field may have
_DECLARATION = "pushline.variable"  # the dataclass field metadata key holding a Variable


class ConfigError(RuntimeError):
    """The configuration cannot work; the message says which variable and why."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: how it is read and checked, and what the README says about it."""

    name: str
    default: Any
    meaning: str  # the README's meaning column, one line
    # Only for a developer's machine (it disables a security check or diverts notifications): in the
    # cloud one *present* at all is refused, blank or not (firebase-admin and google-cloud-pubsub read
    # the raw value, and to them " " is set).
    local_only: bool = False
    minimum: int = 0  # whole numbers: below is a ConfigError naming the variable
    maximum: int | None = None  # whole numbers: above is a ConfigError naming the variable
    choices: tuple[str, ...] = ()  # text: anything else (after normalise) is a ConfigError
    normalise: Callable[[str], str] | None = None  # applied to a text value, or to each item of a list
    fallback: str | None = None  # another variable read when this one is unset or blank
    shown_default: str | None = None  # the README's default column, when it is not the default itself
    kind: str = "str"  # one of KINDS: the Settings field's annotation
    attr: str | None = None  # the Settings field; None: read by a library, declared for README and warning

    def read(self, env: Mapping[str, str]) -> Any:
        """This variable's value in ``env`` (blank is unset: the default)."""
        raw = env.get(self.name, "").strip()
        if not raw and self.fallback:
            raw = env.get(self.fallback, "").strip()
        if not raw:
            return self.default
        if self.kind == "int":
            return self._whole(raw)
        if self.kind == "tuple[str, ...]":
            return tuple(self._text(item.strip()) for item in raw.split(",") if item.strip())
        return self._text(raw)

    def _whole(self, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{self.name} must be a whole number, got {raw!r}") from None
        if value < self.minimum:
            raise ConfigError(f"{self.name} must be at least {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{self.name} must be at most {self.maximum}, got {value}")
        return value

    def _text(self, raw: str) -> str:
        value = self.normalise(raw) if self.normalise else raw
        if self.choices and value not in self.choices:
            allowed = " or ".join(repr(choice) for choice in self.choices)
            raise ConfigError(f"{self.name} must be {allowed}, got {value!r}")
        return value


def variable(name: str, default: Any, meaning: str, **options: Any) -> Any:
    """A ``Settings`` field read from the environment variable ``name``: its one declaration."""
    return field(default=default, metadata={_DECLARATION: Variable(name, default, meaning, **options)})


def _origin(origin: str) -> str:
    return origin.rstrip("/")


@dataclass(frozen=True)
class Settings:
    # Stores
    redis_url: str = variable(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Redis: token cache, ledger, claims, statuses (a secret in the cloud: it may carry a password)",
    )
    database_url: str = variable(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "PostgreSQL, `postgresql://user:pass@host:port/db`; also "
        "`postgresql://user:pass@/db?unix_sock=/cloudsql/PROJECT:REGION:INSTANCE/.s.PGSQL.5432`, "
        "`?host=/socket/dir` and `?sslmode=require` (a secret in the cloud)",
    )
    cloud_sql_instance: str | None = variable(
        "CLOUD_SQL_INSTANCE",
        None,
        "`PROJECT:REGION:INSTANCE`: connect through the Cloud SQL Python Connector instead "
        "(install `cloud-sql-python-connector`)",
    )
    token_ttl_seconds: int = variable(
        "TOKEN_TTL_SECONDS",
        60 * DAY,
        "sliding life of a device: a device expires this long after its last registration (apps "
        "re-register at start); every register or send also extends the user's cached set",
        minimum=1,
    )
    max_tokens_per_user: int = variable(
        "MAX_TOKENS_PER_USER",
        50,
        "registering more evicts the user's least recently refreshed device",
        minimum=1,
    )
    register_rate_per_minute: int = variable(
        "REGISTER_RATE_PER_MINUTE",
        60,
        "registrations per user per minute (429 beyond), and open receipts per user per minute (a counter of "
        "their own); `0` turns both off; registrations are not limited while Redis is down",
    )
    reconcile_seconds: int = variable(
        "RECONCILE_SECONDS",
        400,
        "each `prune` run's time budget for reconciling the token cache with PostgreSQL (a paged sweep that "
        "resumes where the last run stopped); `0` turns it off; keep it under `prune`'s 540 s timeout",
    )
    # Google Cloud / Firebase
    google_cloud_project: str = variable(
        "GOOGLE_CLOUD_PROJECT",
        "demo-pushline",
        "the Firebase / Google Cloud project: ID tokens must be issued for it, FCM sends in it, topics "
        "live in it. With `K_SERVICE` set, unset or blank stops the function from starting (the local "
        "default is never used there); locally, `GCLOUD_PROJECT` is read when it is unset",
        fallback="GCLOUD_PROJECT",
        shown_default="`demo-pushline` locally; **required** in the cloud",
    )
    firebase_auth_emulator_host: str | None = variable(
        "FIREBASE_AUTH_EMULATOR_HOST", None, "accept the Auth emulator's unsigned ID tokens", local_only=True
    )
    cors_allowed_origins: tuple[str, ...] = variable(
        "CORS_ALLOWED_ORIGINS",
        (),
        "comma-separated origins allowed to call `register` from a browser (`*` for any)",
        normalise=_origin,
    )
    # Bus
    pubsub_topic: str = variable(
        "PUBSUB_TOPIC",
        "pushline-jobs",
        "the jobs topic (a name in `GOOGLE_CLOUD_PROJECT`, or `projects/P/topics/T`)",
    )
    pubsub_emulator_host: str | None = variable(
        "PUBSUB_EMULATOR_HOST", None, "use the Pub/Sub emulator", local_only=True
    )
    deliver_url: str | None = variable(
        "DELIVER_URL", None, "the local bus: POST jobs to this URL as Eventarc would", local_only=True
    )
    events_topic: str = variable(
        "EVENTS_TOPIC", "pushline-events", "the domain-events topic (`publish-event`, the local bus)"
    )
    on_event_url: str | None = variable(
        "ON_EVENT_URL", None, "the local bus: POST domain events to this URL as Eventarc would", local_only=True
    )
    # FCM
    fcm_credentials_secret: str | None = variable(
        "FCM_CREDENTIALS_SECRET",
        None,
        "`projects/P/secrets/S/versions/latest`: the FCM service-account key, read once per instance from "
        "Secret Manager; unset: the function's own service account (Application Default Credentials)",
    )
    fcm_endpoint: str | None = variable(
        "FCM_ENDPOINT",
        None,
        "send FCM HTTP v1 calls to this base URL (the fake FCM) with a static access token",
        local_only=True,
    )
    fcm_client: str = variable(
        "FCM_CLIENT",
        "http",
        "`http`: our FCM HTTP v1 client (`shared/http1.py`, asyncio HTTP/1.1); `sdk`: firebase-admin's "
        "`send_each` in slices of 500",
        choices=("http", "sdk"),
        normalise=str.lower,
    )
    fcm_max_in_flight: int = variable(
        "FCM_MAX_IN_FLIGHT",
        500,
        "tokens between lease and confirmed answer per instance (= requests in flight; = the most that may "
        "be sent twice after an instance crash; see Guarantees for Redis losing writes)",
        minimum=1,
    )
    fcm_rate_per_minute: int = variable(
        "FCM_RATE_PER_MINUTE",
        600_000,
        "project-wide FCM budget shared by all instances through Redis (FCM's default quota); `0` turns it off",
    )
    fcm_timeout_seconds: int = variable("FCM_TIMEOUT_SECONDS", 10, "one FCM request's timeout", minimum=1)
    max_attempts: int = variable("MAX_ATTEMPTS", 5, "attempts per token in all, across instances", minimum=1)
    delivery_window_seconds: int = variable(
        "DELIVERY_WINDOW_SECONDS",
        43_200,
        "how long after `send` accepted a notification its tokens may still be sent (12 h); a token not "
        "delivered by then is final `expired`; a job's `android.ttl` / `apns-expiration` shortens it for "
        "its platform; above `50400` (14 h, what the bus can carry a part through) stops the function from starting",
        minimum=1,
        maximum=MAX_DELIVERY_WINDOW_SECONDS,
    )
    # Claims
    ledger_ttl_seconds: int = variable(
        "LEDGER_TTL_SECONDS",
        7 * DAY,
        "how long a notification's ledger and status are kept; below `DELIVERY_WINDOW_SECONDS` stops the function "
        "from starting",
        minimum=60,
    )
    once_ttl_seconds: int = variable("ONCE_TTL_SECONDS", DAY, "life of a one-time claim (`once`)", minimum=1)
    max_per_user_per_day: int = variable(
        "MAX_PER_USER_PER_DAY",
        0,
        "non-urgent notifications per user per rolling 24 h (copies of one notification count once); a user "
        "beyond it is skipped (`users.capped`); `0` turns it off",
    )
    idempotency_ttl_seconds: int = variable(
        "IDEMPOTENCY_TTL_SECONDS", DAY, "how long an `Idempotency-Key` is remembered", minimum=1
    )
    # Fan-out: users per part of a job
    fanout_users_per_part: int = variable("FANOUT_USERS_PER_PART", 500, "users per part when a job fans out", minimum=1)
    # Audiences: the expansion's pages and parts
    audience_page_rows: int = variable(
        "AUDIENCE_PAGE_ROWS",
        5000,
        "rows of `device_tokens` one page of an audience's expansion examines (one statement, one checkpoint)",
        minimum=1,
        maximum=50_000,
    )
    audience_part_tokens: int = variable(
        "AUDIENCE_PART_TOKENS", 500, "devices per part an audience's expansion publishes", minimum=1, maximum=500
    )
    # Domain events
    event_rules: str | None = variable(
        "EVENT_RULES",
        None,
        "the domain-event rules file",
        shown_default="`infra/rules.example.json` locally; **required** in the cloud",
    )
    # Runtime
    k_service: str | None = variable(
        "K_SERVICE",
        None,
        "set by Cloud Run, never by hand: a function with it is in the cloud, where a local-only variable "
        "or no `GOOGLE_CLOUD_PROJECT` stops it from starting",
    )
    log_level: str = variable(
        "LOG_LEVEL",
        "INFO",
        "the lowest severity logged (`DEBUG`, `INFO`, `WARNING`, `ERROR`); the lines the dashboard and alerts count "
        "(an `event` field) are logged at any level",
        normalise=str.upper,
    )
    # Not variables, for check_cloud_safety: the local-only variables present in the environment
    # (blank ones too), and whether GOOGLE_CLOUD_PROJECT was given (the default is for local runs only).
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


def _declared_settings() -> tuple[Variable, ...]:
    found = []
    for f in dataclasses.fields(Settings):
        if _DECLARATION in f.metadata:
            declared = dataclasses.replace(f.metadata[_DECLARATION], attr=f.name, kind=str(f.type))
            if declared.kind not in KINDS:
                raise TypeError(f"Settings.{f.name}: a declared variable's type must be one of {KINDS}")
            found.append(declared)
    return tuple(found)


# Every variable, in order of declaration: Settings' fields, then those only a library reads
# (declared for the README and so that setting them is no warning).
VARIABLES: tuple[Variable, ...] = (
    *_declared_settings(),
    Variable(
        "THREADS",
        None,
        "request threads per instance (set with `--concurrency` on `register` / `send`)",
        shown_default="functions-framework's",
    ),
)
LOCAL_ONLY_VARIABLES = tuple(v.name for v in VARIABLES if v.local_only)

# Known but not pushline's to document: set by the platform (PORT), read by firebase-admin (its other
# emulators), or by the test harness. Setting them is no warning.
READ_ELSEWHERE = (
    "PORT",
    "FIREBASE_DATABASE_EMULATOR_HOST",
    "FIREBASE_STORAGE_EMULATOR_HOST",
    "FIRESTORE_EMULATOR_HOST",
    "PUSHLINE_TEST_DB",
    "PUSHLINE_TEST_REDIS_DB",
)
KNOWN_NAMES = tuple(
    sorted({v.name for v in VARIABLES} | {v.fallback for v in VARIABLES if v.fallback} | set(READ_ELSEWHERE))
)
# A variable nothing reads is warned about when it starts like one of ours, or is close to a known name.
PREFIXES = (
    "FCM_",
    "REDIS_",
    "DATABASE_",
    "TOKEN_",
    "MAX_",
    "LEDGER_",
    "ONCE_",
    "IDEMPOTENCY_",
    "FANOUT_",
    "EVENT",
    "REGISTER_",
    "DELIVERY_",
)
CLOSE_MATCH = 0.85  # difflib's ratio: FCM_MAX_INFLIGHT is 0.97 from FCM_MAX_IN_FLIGHT


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from an environment mapping (default: ``os.environ``)."""
    env = dict(os.environ if env is None else env)
    values = {v.attr: v.read(env) for v in VARIABLES if v.attr is not None}
    if values["ledger_ttl_seconds"] < values["delivery_window_seconds"]:  # (both declared below)
        raise ConfigError(
            f"LEDGER_TTL_SECONDS ({values['ledger_ttl_seconds']}) must be at least DELIVERY_WINDOW_SECONDS "
            f"({values['delivery_window_seconds']}): a ledger forgotten inside the window would send its tokens again"
        )
    return Settings(
        **values,
        local_only_present=tuple(name for name in LOCAL_ONLY_VARIABLES if name in env),
        project_given=bool(env.get("GOOGLE_CLOUD_PROJECT", "").strip()),
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


@contextlib.contextmanager
def refusal_logged() -> Iterator[None]:
    """Around a function's start: a ``ConfigError`` (the function will not start) is first logged as one
    CRITICAL JSON line, ``event: config_error``, ``config: environment`` (the configuration-errors alert
    counts it), then raised."""
    try:
        yield
    except ConfigError as exc:
        logs.setup("INFO")
        logs.get("main").critical(
            f"configuration error: the function does not start: {exc}",
            extra={"event": "config_error", "config": "environment"},
        )
        raise


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The variables in ``env`` that nothing reads but look meant for pushline (one of its prefixes,
    or close to a known name), each with the known name closest to it (or None), by name."""
    found = []
    for name in sorted(env):
        if name in KNOWN_NAMES:
            continue
        close = difflib.get_close_matches(name, KNOWN_NAMES, n=1, cutoff=CLOSE_MATCH)
        if close or name.startswith(PREFIXES):
            found.append((name, close[0] if close else None))
    return found


def warn_unknown(env: Mapping[str, str] | None = None) -> None:
    """Log one warning per variable nothing reads that looks meant for pushline (a typo, a stale
    name), as Sygnal warns about configuration it does not understand: the name, never the value."""
    log = logs.get("config")
    for name, close in unknown_variables(os.environ if env is None else env):
        hint = f"; did you mean {close}?" if close else ""
        log.warning(
            f"{name} is set but pushline does not read it{hint}", extra={"variable": name, "did_you_mean": close}
        )
