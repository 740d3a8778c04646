"""Failures that every layer shares: a dependency that cannot be reached right now."""


class Unavailable(RuntimeError):
    """A dependency (PostgreSQL, Redis, the bus) cannot be reached: retry later (HTTP 503)."""

    what = "a dependency"
