"""The operator command line: ``python -m shared.cli [--json] COMMAND ...``.

Configuration comes only from the environment (``shared.config`` / ``shared.instance``), exactly as
the functions read it. Output is human-readable, or one JSON document on stdout with ``--json``.
Exit codes: 0 success, 1 failure (a dependency unreachable, an unknown id, problems found),
2 usage errors (bad arguments, an invalid notification). Errors go to stderr as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pg8000.native
import redis

from shared import accept, bus, cancel, instance, jobs, logs, rules
from shared.config import ConfigError, settings
from shared.db import DatabaseUnavailable, migrate
from shared.errors import Unavailable
from shared.jobs import PLATFORMS
from shared.store import TokenStore

DEFAULT_EVENTS_TOPIC = "pushline-events"
STATS_COUNTERS = ("invalid_jobs", "events_ignored", "events_invalid", "events_rendered")
PULL_BATCH = 100
PUBSUB_TIMEOUT = 30.0
LOCAL_BUS_DRAIN_SECONDS = 30.0


class CliError(Exception):
    """A failure to report on stderr as one line, with its exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Result:
    """What a command produced: ``data`` for ``--json``, ``text`` for people, and the exit code."""

    data: Any
    text: str
    code: int = 0


# --- migrate, prune, rebuild-cache --------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> Result:
    from shared.db import SCHEMA_FILE

    migrate(instance.database())
    return Result({"migrated": True, "schema": str(SCHEMA_FILE)}, f"schema applied ({SCHEMA_FILE.name})")


def cmd_prune(args: argparse.Namespace) -> Result:
    count = instance.token_store().prune()
    return Result({"pruned": count}, f"pruned {count} expired token{'s' if count != 1 else ''}")


def _progress_printer() -> Callable[[int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int) -> None:
        sys.stderr.write(f"\rrebuilding token cache: {done} users")
        sys.stderr.flush()

    return show


def cmd_rebuild_cache(args: argparse.Namespace) -> Result:
    progress = _progress_printer()
    count = instance.token_store().rebuild_all(progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    else:
        print(f"rebuilding token cache: {count} users", file=sys.stderr)
    return Result({"users": count}, f"rebuilt the token cache of {count} user{'s' if count != 1 else ''}")


# --- tokens, forget -----------------------------------------------------------------------------


def _db_rows(store: TokenStore, user_id: str) -> list[dict[str, Any]]:
    """The user's PostgreSQL rows, newest first, and whether each is still inside the TTL window."""
    return [
        {"token": t, "platform": p, "updated_at": _iso(at), "live": live} for t, p, at, live in store.db_rows(user_id)
    ]


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def cmd_tokens(args: argparse.Namespace) -> Result:
    store = instance.token_store()
    cached = store.cached_tokens(args.user)
    rows = _db_rows(store, args.user)
    data = {"user": args.user, "redis": sorted(cached) if cached is not None else None, "postgres": rows}
    return Result(data, _tokens_text(args.user, cached, rows))


def _tokens_text(user_id: str, cached: set[str] | None, rows: list[dict[str, Any]]) -> str:
    redis_part = "absent" if cached is None else f"{len(cached)} token{'s' if len(cached) != 1 else ''}"
    lines = [f"user {user_id}: Redis set {redis_part}; PostgreSQL {len(rows)} row{'s' if len(rows) != 1 else ''}"]
    table = [("TOKEN", "PLATFORM", "UPDATED_AT", "REDIS")]
    for row in rows:
        when = row["updated_at"] + ("" if row["live"] else " (expired)")
        table.append((logs.short(row["token"]), row["platform"] or "-", when, _cached_mark(row["token"], cached)))
    in_db = {row["token"] for row in rows}
    for token in sorted((cached or set()) - in_db):
        table.append((logs.short(token), "-", "(not in PostgreSQL)", "yes"))
    if len(table) > 1:
        widths = [max(len(r[i]) for r in table) for i in range(3)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in table]
    return "\n".join(lines)


def _cached_mark(token: str, cached: set[str] | None) -> str:
    if cached is None:
        return "-"
    return "yes" if token in cached else "no"


def cmd_forget(args: argparse.Namespace) -> Result:
    tokens = instance.token_store().forget(args.user)
    preferences = instance.preference_store().forget(args.user)
    claims = instance.claims().forget_once(args.user)
    instance.daily_cap().forget(args.user)
    data = {
        "user": args.user,
        "tokens_removed": tokens,
        "preferences_removed": preferences,
        "once_claims_removed": claims,
    }
    text = (
        f"forgot {args.user}: {tokens} token(s), {'their' if preferences else 'no'} preferences and {claims} "
        "one-time claim(s) removed"
    )
    return Result(data, text)


# --- send, status, stats ------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _send_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"user_ids": args.users}
    notification = {k: v for k, v in (("title", args.title), ("body", args.body)) if v is not None}
    if notification:
        body["notification"] = notification
    if args.data:
        body["data"] = dict(args.data)
    if args.platform:
        body["platforms"] = list(dict.fromkeys(args.platform))
    if args.once is not None:
        body["once"] = args.once
    if args.category is not None:
        body["category"] = args.category
    if args.urgent:
        body["urgent"] = True
    return body


def cmd_send(args: argparse.Namespace) -> Result:
    result = accept.accept(_send_body(args), idempotency_key=args.idempotency_key)
    if isinstance(result, accept.InFlight | accept.KeyReused):
        raise CliError(result.reason)
    if isinstance(result, accept.Accepted):
        data: dict[str, Any] = {"id": result.id}
    else:
        data = {**result.body, "replayed": True}
    _hand_over()
    return Result(data, data["id"])


def _hand_over() -> None:
    """With a publisher that holds messages in memory (the local bus, plugged in by ``python -m
    local.cli``), wait until DELIVER_URL took them: this process is about to exit, and the local bus
    keeps nothing on disk. Pub/Sub has acknowledged each message already."""
    held = bus.drain(timeout=LOCAL_BUS_DRAIN_SECONDS)
    if held:
        raise CliError(f"{held} message(s) published but not yet taken by DELIVER_URL (lost on exit)")


def cmd_status(args: argparse.Namespace) -> Result:
    found = accept.status(args.id)
    if isinstance(found, accept.NotFound):
        raise CliError(f"{found.reason}: {args.id}")
    return Result(found, _status_text(found))


def cmd_cancel(args: argparse.Namespace) -> Result:
    match cancel.cancel(args.id):
        case cancel.Cancelled(status=status):
            return Result(status, _status_text(status))
        case cancel.InvalidId() as bad:
            raise CliError(f"{bad.reason}, got {args.id!r}", 2)
        case cancel.NotFound() | cancel.AlreadyDone() as refused:
            raise CliError(f"{refused.reason}: {args.id}")


def _status_text(body: dict[str, Any]) -> str:
    users = body["users"]
    lines = [
        f"{body['id']}: {body['state']}",
        f"  users     targeted {users['targeted']}, without tokens {users['without_tokens']}, "
        f"muted {users.get('muted', 0)}, skipped (once) {users['skipped_once']}, capped {users.get('capped', 0)}",
        f"  tokens    {body['tokens']}",
        "  outcomes  " + ", ".join(f"{k} {v}" for k, v in body["counts"].items()),
        "  receipts  " + ", ".join(f"{k} {v}" for k, v in body["receipts"].items()),
        f"  created   {body['created_at']}",
        f"  updated   {body['updated_at']}",
    ]
    if "send_at" in body:
        lines.append(f"  send at   {body['send_at']}")
    return "\n".join(lines)


def cmd_scheduled(args: argparse.Namespace) -> Result:
    """The scheduled sends not published yet (and the slots of local-time sends), the soonest first."""
    rows = [
        {"notification_id": d.notification_id, "slot": d.slot, "due_at": jobs.format_time(d.due_at)}
        for d in instance.schedule().pending(limit=args.max)
    ]
    text = "\n".join(f"{r['due_at']}  {r['notification_id']}" for r in rows) or "nothing scheduled"
    return Result(rows, text)


def cmd_tick(args: argparse.Namespace) -> Result:
    """What the tick function does once: publish the scheduled sends that are due."""
    from shared import tick

    done = tick.tick()
    return Result({"published": done.published, "cancelled": done.cancelled}, f"published {done.published}")


def cmd_stats(args: argparse.Namespace) -> Result:
    found = instance.claims().stats()
    counters = {name: found.get(name, 0) for name in STATS_COUNTERS} | found
    width = max(len(name) for name in counters)
    return Result(counters, "\n".join(f"{name.ljust(width)}  {value}" for name, value in counters.items()))


# --- events -------------------------------------------------------------------------------------


def cmd_check_rules(args: argparse.Namespace) -> Result:
    path = args.file or str(rules.rules_path(settings()))
    problems = rules.check_rules_file(path)
    data = {"file": path, "ok": not problems, "problems": problems}
    text = "\n".join(f"{path}: {p}" for p in problems) if problems else f"{path}: ok"
    return Result(data, text, 1 if problems else 0)


def events_topic() -> str:
    """The domain-events topic (EVENTS_TOPIC)."""
    return settings().events_topic


def cmd_publish_event(args: argparse.Namespace) -> Result:
    if not re.match(rules.TYPE_PATTERN, args.type):
        raise CliError(f"event type must match {rules.TYPE_PATTERN}, got {args.type!r}", 2)
    try:
        payload = json.loads(args.json_data)
    except ValueError as exc:
        raise CliError(f"the event is not valid JSON: {exc}", 2) from None
    if not isinstance(payload, dict):
        raise CliError("the event must be a JSON object", 2)
    attributes = {"type": args.type}
    if args.event_id:
        attributes["event_id"] = args.event_id
    topic = bus.topic_path(args.topic or events_topic())
    message_id = bus.publish(payload, attributes, topic=topic)
    _hand_over()
    data = {"message_id": message_id, "topic": topic, "attributes": attributes}
    return Result(data, f"published {args.type} to {topic} as message {message_id}")


# --- replay-dead-letters ------------------------------------------------------------------------


def _subscription_path(name: str) -> str:
    if name.startswith("projects/"):
        return name
    return f"projects/{settings().google_cloud_project}/subscriptions/{name}"


def cmd_replay(args: argparse.Namespace) -> Result:
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    subscription, topic = _subscription_path(args.subscription), bus.topic_path(args.topic)
    subscriber, publisher = pubsub_v1.SubscriberClient(), pubsub_v1.PublisherClient()
    replay = _Replay(subscriber, publisher, subscription, topic)
    try:
        moved = replay.run(args.max)
    except exceptions.GoogleAPICallError as exc:
        raise CliError(f"Pub/Sub: {exc.message} (after {replay.moved} replayed)") from None
    finally:
        subscriber.close()
        publisher.stop()
    return Result({"replayed": moved, "subscription": subscription, "topic": topic}, f"replayed {moved} message(s)")


class _Replay:
    """Pull from the dead-letter subscription, republish, and ack each message once republished."""

    def __init__(self, subscriber: Any, publisher: Any, subscription: str, topic: str) -> None:
        self.subscriber, self.publisher = subscriber, publisher
        self.subscription, self.topic = subscription, topic
        self.moved = 0

    def run(self, limit: int | None) -> int:
        while limit is None or self.moved < limit:
            want = PULL_BATCH if limit is None else min(PULL_BATCH, limit - self.moved)
            received = self._pull(want)
            if not received:
                break
            self._move(received)
        return self.moved

    def _pull(self, count: int) -> list[Any]:
        request = {"subscription": self.subscription, "max_messages": count, "return_immediately": True}
        with warnings.catch_warnings():  # deprecated, but exactly what "until empty" needs
            warnings.simplefilter("ignore", DeprecationWarning)
            return list(self.subscriber.pull(request=request, timeout=PUBSUB_TIMEOUT).received_messages)

    def _move(self, received: list[Any]) -> None:
        futures = [
            (m.ack_id, self.publisher.publish(self.topic, m.message.data, **dict(m.message.attributes)))
            for m in received
        ]
        done, failed, error = [], [], None
        for ack_id, future in futures:
            try:
                future.result(timeout=PUBSUB_TIMEOUT)
                done.append(ack_id)
            except Exception as exc:
                failed.append(ack_id)
                error = exc
        if done:
            self.subscriber.acknowledge(request={"subscription": self.subscription, "ack_ids": done})
            self.moved += len(done)
        if failed:
            self._nack(failed)
            raise CliError(
                f"{len(failed)} message(s) could not be republished to {self.topic} and were left on "
                f"{self.subscription} ({self.moved} replayed): {error!r}"
            )

    def _nack(self, ack_ids: list[str]) -> None:
        request = {"subscription": self.subscription, "ack_ids": ack_ids, "ack_deadline_seconds": 0}
        # On failure they come back anyway when their ack deadline passes.
        with contextlib.suppress(Exception):
            self.subscriber.modify_ack_deadline(request=request)


# --- the parser ---------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _json_flag() -> argparse.ArgumentParser:
    """``--json`` accepted after the command too (``tokens alice --json``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON on stdout")
    return parent


def _add_send(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("send", parents=[common], help="send a notification (as the send function does)")
    p.add_argument("users", nargs="+", metavar="USER")
    p.add_argument("--title")
    p.add_argument("--body")
    p.add_argument("--data", action="append", type=_key_value, default=[], metavar="KEY=VALUE")
    p.add_argument("--platform", action="append", choices=PLATFORMS, default=[])
    p.add_argument("--once", metavar="KEY", help="send each user this notification at most once per KEY")
    p.add_argument("--category", metavar="NAME", help="users who muted NAME are skipped")
    p.add_argument("--urgent", action="store_true", help="past the daily cap (never past a mute)")
    p.add_argument("--idempotency-key", metavar="KEY")
    p.set_defaults(run=cmd_send)


def _add_replay(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("replay-dead-letters", parents=[common], help="move dead-lettered jobs back to a topic")
    p.add_argument("--subscription", required=True, help="the dead-letter pull subscription")
    p.add_argument("--topic", required=True, help="where to republish (e.g. the jobs topic)")
    p.add_argument("--max", type=_positive, default=None, metavar="N", help="replay at most N messages")
    p.set_defaults(run=cmd_replay)


def _add_simple(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    simple: list[tuple[str, Callable[[argparse.Namespace], Result], str, tuple[str, ...]]] = [
        ("migrate", cmd_migrate, "apply infra/schema.sql (idempotent)", ()),
        ("prune", cmd_prune, "delete tokens past the TTL window from both stores", ()),
        ("tokens", cmd_tokens, "a user's tokens in Redis and PostgreSQL", ("user",)),
        ("status", cmd_status, "a notification's status", ("id",)),
        ("cancel", cmd_cancel, "cancel a notification that is not done (as DELETE /<id> on send)", ("id",)),
        ("rebuild-cache", cmd_rebuild_cache, "reload every user's Redis set from PostgreSQL", ()),
        ("forget", cmd_forget, "account deletion: a user's tokens, preferences and one-time claims", ("user",)),
        ("stats", cmd_stats, "invalid-job and domain-event counters", ()),
        ("tick", cmd_tick, "publish the scheduled sends that are due (as the tick function does)", ()),
    ]
    for name, run, text, positionals in simple:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        for positional in positionals:
            p.add_argument(positional, metavar=positional.upper())
        p.set_defaults(run=run)


def _add_schedule(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    text = "the scheduled sends not published yet, the soonest first"
    p = sub.add_parser("scheduled", parents=[common], help=text, description=text)
    p.add_argument("--max", type=int, default=100, metavar="N", help="at most N (default 100)")
    p.set_defaults(run=cmd_scheduled)


def _add_events(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check-rules", parents=[common], help="validate a domain-event rules file")
    p.add_argument("file", nargs="?", metavar="FILE", help="default: EVENT_RULES, else infra/rules.example.json")
    p.set_defaults(run=cmd_check_rules)
    p = sub.add_parser("publish-event", parents=[common], help="publish a domain event to the events topic")
    p.add_argument("type", metavar="TYPE")
    p.add_argument("json_data", metavar="JSON", help="the event, a JSON object")
    p.add_argument("--topic", help=f"default: the events topic ({DEFAULT_EVENTS_TOPIC})")
    p.add_argument("--event-id", metavar="ID")
    p.set_defaults(run=cmd_publish_event)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.cli", description="pushline operator commands")
    parser.add_argument("--json", action="store_true", default=False, help="print JSON on stdout")
    common = _json_flag()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simple(sub, common)
    _add_send(sub, common)
    _add_replay(sub, common)
    _add_events(sub, common)
    _add_schedule(sub, common)
    return parser


# --- main ---------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CliError):
        text = exc.message
    elif isinstance(exc, jobs.JobError):
        text = f"invalid notification: {exc.message}"
    elif isinstance(exc, Unavailable):
        text = f"{exc.what} is unavailable: {exc}"
    elif isinstance(exc, DatabaseUnavailable | pg8000.native.DatabaseError):
        text = f"PostgreSQL: {exc}"
    elif isinstance(exc, redis.RedisError):
        text = f"Redis: {type(exc).__name__}: {exc}"
    elif isinstance(exc, ConfigError | rules.RulesError):
        text = f"configuration: {exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, CliError):
        return exc.code
    return 2 if isinstance(exc, jobs.JobError) else 1


def _print(result: Result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.data, ensure_ascii=False, default=str))
    elif result.text:
        print(result.text)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        result = args.run(args)
    except Exception as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return _exit_code(exc)
    _print(result, args.json)
    return result.code


if __name__ == "__main__":
    sys.exit(main())
