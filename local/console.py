"""A local console for the running stack: devices, test users, preferences, compose, stores. Never deployed.

``python -m local.console --port 8090`` (``./emulator.sh`` starts it). One server-rendered page on
127.0.0.1 only; every form works without JavaScript (POST, then redirect), and a few lines of
``console_static/console.js`` poll the page's fragments for live updates. It adds no second way
to send or register: users' devices and preferences go through the real ``register`` endpoint with a
local ID token, notifications through the real ``send`` endpoint; the stores are only read.

Environment: CONSOLE_REGISTER_URL, CONSOLE_SEND_URL, CONSOLE_FCM_URL (the stack sets them), and
REDIS_URL, DATABASE_URL, GOOGLE_CLOUD_PROJECT as the functions read them.

Redis keys of its own (all ``notif:console:``):
  notif:console:users    Set of the test users made here
  notif:console:devices  Hash token -> JSON {user, platform, behaviour, at}: devices registered here
  notif:console:sent     List of the notification ids sent from here, newest first (20 kept)

A received notification can be opened or dismissed on its device card: an open receipt sent through
the real ``register`` endpoint (``POST /receipts``) as the device's user.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from aiohttp import web

from local.idtoken import emulator_id_token
from shared import instance
from shared.config import settings
from shared.db import DatabaseUnavailable
from shared.errors import Unavailable
from shared.jobs import PLATFORMS
from shared.store import REDIS_ERRORS, TokenStore, text

STATIC = Path(__file__).resolve().parent / "console_static"
# The page's markup; every ${field} is filled with HTML made and escaped by render_page.
PAGE = Template((Path(__file__).resolve().parent / "console_templates" / "page.html").read_text(encoding="utf-8"))
USERS_KEY = "notif:console:users"
DEVICES_KEY = "notif:console:devices"
SENT_KEY = "notif:console:sent"
SENT_KEPT = 20
MAX_CARDS = 200
MAX_MESSAGES_PER_CARD = 20
USER_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

# behaviour -> (token prefix the fake FCM reacts to, label, what happens to it)
BEHAVIOURS: dict[str, tuple[str, str, str]] = {
    "healthy": ("healthy-", "Healthy", "accepts every message"),
    "uninstalled": ("dead-", "Uninstalled", "FCM answers UNREGISTERED: the token is removed"),
    "malformed": ("malformed-", "Malformed token", "FCM answers INVALID_ARGUMENT: the token is removed"),
    "flaky": ("flaky-", "Flaky", "FCM answers UNAVAILABLE twice, then accepts"),
    "quota": ("quota-", "Quota-limited", "FCM answers QUOTA_EXCEEDED once, then accepts"),
}
# fake FCM answers after which a token is gone for good
DEAD_ANSWERS = {
    "UNREGISTERED": "UNREGISTERED",
    "INVALID_TOKEN": "INVALID_ARGUMENT (bad token)",
    "SENDER_ID_MISMATCH": "SENDER_ID_MISMATCH",
}
COUNT_LABELS = {
    "delivered": "delivered",
    "dead_removed": "dead removed",
    "payload_rejected": "payload rejected",
    "config_error": "configuration error",
    "failed": "failed",
    "expired": "expired",
    "cancelled": "cancelled",
    "retrying": "retrying",
}
CANCELLABLE = frozenset({"accepted", "delivering"})


@dataclass(frozen=True)
class Endpoints:
    register: str
    send: str
    fcm: str
    project: str


CONFIG = web.AppKey("config", Endpoints)
HTTP = web.AppKey("http", aiohttp.ClientSession)


class ConsoleError(Exception):
    """Something the user should read on the page (a refused form, an unreachable service)."""


# --- reading the system ----------------------------------------------------------------------------


def _store() -> TokenStore:
    return instance.token_store()


def _users() -> list[str]:
    return sorted(text(m) for m in instance.redis_client().smembers(USERS_KEY))


def _known_devices() -> dict[str, dict[str, Any]]:
    raw = instance.redis_client().hgetall(DEVICES_KEY)
    return {text(k): json.loads(v) for k, v in raw.items()}


def _sent() -> list[str]:
    return [text(v) for v in instance.redis_client().lrange(SENT_KEY, 0, SENT_KEPT - 1)]


def _live_tokens(users: list[str]) -> dict[str, dict[str, str]]:
    """user -> token -> where it is ("Redis and PostgreSQL", "PostgreSQL only", "Redis only")."""
    store = _store()
    result: dict[str, dict[str, str]] = {}
    for user in users:
        db = set(store.db_tokens(user))
        cached = store.cached_tokens(user) or set()
        result[user] = {t: _where(t in cached, t in db) for t in db | cached}
    return result


def _owners(tokens: list[str]) -> dict[str, tuple[str, str | None]]:
    """token -> (user, platform) for tokens PostgreSQL holds (the fake FCM saw them, we did not register them)."""
    return _store().owners(tokens)


def _where(in_redis: bool, in_db: bool) -> str:
    if in_redis and in_db:
        return "Redis and PostgreSQL"
    return "PostgreSQL only" if in_db else "Redis only"


async def _blocking(fn: Any, *args: Any) -> Any:
    """Redis and PostgreSQL clients are synchronous: keep them off the event loop."""
    try:
        return await asyncio.to_thread(fn, *args)
    except (*REDIS_ERRORS, Unavailable, DatabaseUnavailable) as exc:
        raise ConsoleError(f"a store is unreachable: {exc}") from exc


async def _fake_messages(app: web.Application) -> list[dict[str, Any]]:
    try:
        async with app[HTTP].get(f"{app[CONFIG].fcm}/_fake/messages") as response:
            return (await response.json())["messages"]
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
        raise ConsoleError(f"the fake FCM at {app[CONFIG].fcm} did not answer: {exc}") from exc


@dataclass
class Device:
    token: str
    user: str | None
    platform: str | None = None
    behaviour: str | None = None
    registered_at: float = 0.0
    where: str | None = None  # None: in neither store
    received: list[dict[str, Any]] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    last_answer: str | None = None
    last_seen: float = 0.0

    @property
    def live(self) -> bool:
        return self.where is not None

    @property
    def removal(self) -> str:
        if self.last_answer in DEAD_ANSWERS:
            return f"FCM answered {DEAD_ANSWERS[self.last_answer]}; gone from Redis and PostgreSQL"
        if self.user is None:
            return "not registered to any user"
        return "no longer registered (unregistered, moved to another user, or evicted)"


async def devices(app: web.Application) -> list[Device]:
    messages = await _fake_messages(app)
    users, known = await asyncio.gather(_blocking(_users), _blocking(_known_devices))
    live = await _blocking(_live_tokens, users)
    found: dict[str, Device] = {}
    for token, info in known.items():
        found[token] = Device(token, info.get("user"), info.get("platform"), info.get("behaviour"), info.get("at", 0))
    for user, tokens in live.items():
        for token in tokens:
            found.setdefault(token, Device(token, user)).user = user  # its holder now, if it moved
    strangers = sorted({str(m["message"].get("token", "")) for m in messages} - found.keys())
    owners = await _blocking(_owners, strangers)
    for token in strangers:
        user, platform = owners.get(token, (None, None))
        found[token] = Device(token, user, platform, where="PostgreSQL" if user else None)
    for device in found.values():
        if device.user in live:
            device.where = live[device.user].get(device.token)
    for m in messages:
        device = found[str(m["message"].get("token", ""))]
        device.last_seen = max(device.last_seen, m.get("received_at", 0))
        answer = m.get("answer")
        if answer is None:  # still being answered
            continue
        device.answers[answer] += 1
        device.last_answer = answer
        if answer == "OK":
            device.received.append(m)
    for device in found.values():
        device.received.sort(key=lambda m: m.get("received_at", 0), reverse=True)
    ordered = sorted(found.values(), key=lambda d: max(d.registered_at, d.last_seen), reverse=True)
    return ordered[:MAX_CARDS]


async def notification_status(app: web.Application, nid: str) -> dict[str, Any] | None:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", nid):
        return None
    try:
        async with app[HTTP].get(f"{app[CONFIG].send}/{nid}") as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise ConsoleError(f"send answered {response.status} for the status of {nid}")
            return await response.json()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise ConsoleError(f"send at {app[CONFIG].send} did not answer: {exc}") from exc


def _stores_of(user: str) -> tuple[set[str] | None, dict[str, str | None]]:
    store = _store()
    return store.cached_tokens(user), store.db_tokens(user)


# --- HTML ------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else ""


def _link(**query: str) -> str:
    return "/?" + urlencode({k: v for k, v in query.items() if v})


def render_devices(items: list[Device]) -> str:
    if not items:
        return '<p class="empty">No devices yet: create a user and register a device below.</p>'
    cards = [_device_card(d) for d in items]
    return f'<div class="cards">{"".join(cards)}</div>'


def _device_card(d: Device) -> str:
    state = (
        f'<p class="state live"><strong>Live</strong> — in {_e(d.where)}</p>'
        if d.live
        else f'<p class="state removed"><strong>Removed</strong> — {_e(d.removal)}</p>'
    )
    behaviour = BEHAVIOURS[d.behaviour][1] if d.behaviour in BEHAVIOURS else "—"
    answers = ", ".join(f"{_e(a)} &times;{n}" for a, n in sorted(d.answers.items())) or "none yet"
    shown = d.received[:MAX_MESSAGES_PER_CARD]
    items = "".join(_received(m, d.user) for m in shown)
    more = len(d.received) - len(shown)
    received = (
        f'<ol class="received" reversed>{items}</ol>' + (f"<p>and {more} older</p>" if more > 0 else "")
        if shown
        else '<p class="empty">No notification received yet.</p>'
    )
    return (
        f'<article class="card device {"is-live" if d.live else "is-removed"}" data-token="{_e(d.token)}" '
        f'data-user="{_e(d.user or "")}" data-behaviour="{_e(d.behaviour or "")}" '
        f'data-state="{"live" if d.live else "removed"}">'
        f'<h3 class="token">{_e(d.token)}</h3>{state}'
        f"<dl><dt>User</dt><dd>{_e(d.user or 'unknown')}</dd>"
        f"<dt>Platform</dt><dd>{_e(d.platform or '—')}</dd>"
        f"<dt>Behaviour</dt><dd>{_e(behaviour)}</dd>"
        f"<dt>FCM answers</dt><dd>{answers}</dd></dl>"
        f"<h4>Received</h4>{received}</article>"
    )


def _receipt_form(nid: str, token: str, user: str) -> str:
    """The device opens (or dismisses) the notification: a receipt through the real register endpoint."""
    hidden = "".join(
        f'<input type="hidden" name="{k}" value="{_e(v)}">' for k, v in (("n", nid), ("token", token), ("user", user))
    )
    return (
        f'<form class="receipt" method="post" action="/receipts">{hidden}'
        '<button name="event" value="opened">Open</button> '
        '<button name="event" value="dismissed">Dismiss</button></form>'
    )


def _received(m: dict[str, Any], user: str | None = None) -> str:
    message = m["message"]
    note = message.get("notification") or {}
    data = message.get("data") or {}
    nid = ((message.get("apns") or {}).get("headers") or {}).get("apns-collapse-id", "")
    title = _e(note.get("title", "")) or "<em>(data only)</em>"
    body = f'<p class="body">{_e(note["body"])}</p>' if note.get("body") else ""
    pairs = "".join(f"<li><code>{_e(k)}={_e(v)}</code></li>" for k, v in data.items())
    data_html = f'<ul class="data" aria-label="data">{pairs}</ul>' if pairs else ""
    link = f' · <a href="{_e(_link(n=nid))}#status">status</a>' if nid else ""
    receipt = _receipt_form(nid, str(message.get("token", "")), user) if nid and user else ""
    return (
        f'<li><p class="title">{title}</p>{body}{data_html}'
        f'<p class="meta"><time>{_time(m.get("received_at", 0))}</time>{link}</p>{receipt}</li>'
    )


def settled(status: dict[str, Any] | None) -> bool:
    """Nothing will change any more: done, or cancelled with every token final (no need to follow it)."""
    if status is None or status["state"] not in ("done", "cancelled"):
        return False
    counts = status["counts"]
    return status["state"] == "done" or sum(v for k, v in counts.items() if k != "retrying") >= status["tokens"]


def _cancel_form(nid: str) -> str:
    return (
        '<form method="post" action="/cancel" class="cancel">'
        f'<input type="hidden" name="n" value="{_e(nid)}">'
        '<button type="submit">Cancel this notification</button></form>'
    )


def _reach(status: dict[str, Any], users: dict[str, Any]) -> str:
    """Whom the notification reached: an audience's devices matched and parts, or its users."""
    progress = status.get("progress") or {}
    total = progress.get("parts_total")
    parts = f"{int(progress.get('parts_done', 0))} of {'?' if total is None else int(total)} part(s) done"
    if "devices_matched" in status:
        return (
            f"<p data-audience>{int(status['devices_matched'])} device(s) matched the audience; "
            f"{int(status.get('tokens', 0))} targeted; {parts}.</p>"
        )
    return (
        f"<p>{int(status.get('tokens', 0))} device(s) targeted for {int(users.get('targeted', 0))} user(s); "
        f"{int(users.get('without_tokens', 0))} without devices, {int(users.get('muted', 0))} muted the category, "
        f"{int(users.get('skipped_once', 0))} skipped (already sent with this <code>once</code> key), "
        f"{int(users.get('capped', 0))} over the daily cap; {parts}.</p>"
    )


def render_status(nid: str | None, status: dict[str, Any] | None, error: str | None = None) -> str:
    if error:
        return f'<p class="error" data-state="error">{_e(error)}</p>'
    if not nid:
        return '<p class="empty" data-state="none">Nothing sent yet.</p>'
    if status is None:
        return f'<p class="error" data-state="unknown">No such notification: {_e(nid)}.</p>'
    state = status["state"]
    counts = "".join(
        f'<li data-count="{k}"><span class="n">{int(status["counts"].get(k, 0))}</span> {label}</li>'
        for k, label in COUNT_LABELS.items()
    )
    users = status.get("users", {})
    done = settled(status)
    receipts = status.get("receipts", {})
    opened = ", ".join(
        f'<span data-receipt="{k}">{int(receipts.get(k, 0))} {k}</span>' for k in ("opened", "dismissed")
    )
    return (
        f'<div data-state="{_e(state)}"{" data-settled" if done else ""}>'
        f'<p>Notification <code>{_e(nid)}</code>: <strong class="status-state state-{_e(state)}">{_e(state)}</strong>'
        f"{'' if done else ' (updating…)'}</p>"
        f'<ul class="counts">{counts}</ul>'
        f"{_reach(status, users)}"
        f'<p class="receipts">Open receipts: {opened}.</p>'
        f'<p class="meta">Accepted {_e(status.get("created_at", ""))}, last change {_e(status.get("updated_at", ""))}'
        f' · <a href="{_e(_link(n=nid))}#status">refresh</a></p>'
        f"{_cancel_form(nid) if state in CANCELLABLE else ''}</div>"
    )


def render_stores(user: str, cached: set[str] | None, db: dict[str, str | None]) -> str:
    if not user:
        return '<p class="empty">Choose a user to compare its tokens in Redis and PostgreSQL.</p>'
    tokens = sorted((cached or set()) | set(db))
    note = (
        "<p>Redis has <strong>no cached set</strong> for this user (absent: the next read rebuilds it "
        "from PostgreSQL).</p>"
        if cached is None
        else ""
    )
    if not tokens:
        return f"<p>No tokens for <code>{_e(user)}</code> in either store.</p>{note}"
    rows = "".join(
        f'<tr><th scope="row"><code>{_e(t)}</code></th>'
        f"<td>{'yes' if cached and t in cached else 'no'}</td>"
        f"<td>{('yes (' + _e(db[t] or 'no platform') + ')') if t in db else 'no'}</td></tr>"
        for t in tokens
    )
    return (
        f"{note}<table><caption>Tokens of <code>{_e(user)}</code></caption>"
        f'<thead><tr><th scope="col">Token</th><th scope="col">Redis (<code>cached_tokens</code>)</th>'
        f'<th scope="col">PostgreSQL (<code>db_tokens</code>)</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def preference_fields(user: str, prefs: dict[str, Any] | None) -> dict[str, str]:
    """The preferences panel's stored summary and its fields, filled with what ``user`` has stored."""
    if not user or prefs is None:
        return {"preferences": "", "muted": "", "quiet_start": "", "quiet_end": "", "time_zone": ""}
    quiet = prefs.get("quiet_hours") or {}
    muted = ", ".join(prefs.get("muted_categories") or [])
    hours = f"{quiet['start']} to {quiet['end']} ({quiet['time_zone']})" if quiet else "none"
    summary = (
        f'<p class="help" data-preferences="{_e(user)}">Stored for <code>{_e(user)}</code>: muted '
        f"{('<code>' + _e(muted) + '</code>') if muted else 'nothing'}; quiet hours {_e(hours)}.</p>"
    )
    return {
        "preferences": summary,
        "muted": _e(muted),
        "quiet_start": _e(quiet.get("start", "")),
        "quiet_end": _e(quiet.get("end", "")),
        "time_zone": _e(quiet.get("time_zone", "")),
    }


def _options(values: list[str], selected: str, labels: dict[str, str] | None = None) -> str:
    return "".join(
        f'<option value="{_e(v)}"{" selected" if v == selected else ""}>{_e((labels or {}).get(v, v))}</option>'
        for v in values
    )


def _checkboxes(name: str, values: list[str], checked: set[str]) -> str:
    return "".join(
        f'<label class="check"><input type="checkbox" name="{name}" value="{_e(v)}"'
        f"{' checked' if v in checked else ''}> {_e(v)}</label>"
        for v in values
    )


@dataclass
class PageState:
    user: str = ""
    nid: str = ""
    message: str = ""
    error: str = ""
    compose: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Seen:
    """What the page shows, read from the stores, the fake FCM and ``send``."""

    users: list[str]
    sent: list[str]
    nid: str
    devices: list[Device]
    status: dict[str, Any] | None
    status_error: str | None
    cached: set[str] | None
    db: dict[str, str | None]
    problems: list[str]  # what could not be read
    preferences: dict[str, Any] | None = None  # the current user's, as GET /preferences answers them


async def _look(app: web.Application, page: PageState) -> _Seen:
    problems: list[str] = []

    async def attempt(coro: Any, default: Any) -> Any:
        try:
            return await coro
        except ConsoleError as exc:
            problems.append(str(exc))
            return default

    users = await attempt(_blocking(_users), [])
    sent = await attempt(_blocking(_sent), [])
    nid = page.nid or (sent[0] if sent else "")
    device_list = await attempt(devices(app), [])
    status_error = None
    status = None
    if nid:
        try:
            status = await notification_status(app, nid)
        except ConsoleError as exc:
            status_error = str(exc)
    cached, db = (await attempt(_blocking(_stores_of, page.user), (None, {}))) if page.user else (None, {})
    current = _current(page, users)
    prefs = await attempt(user_preferences(app, current), None) if current else None
    return _Seen(users, sent, nid, device_list, status, status_error, cached, db, problems, prefs)


def _current(page: PageState, users: list[str]) -> str:
    """The user the forms start with: the page's, else the newest test user."""
    return page.user if page.user in users else (users[-1] if users else "")


def _flash(page: PageState, problems: list[str]) -> str:
    flash = "".join(f'<p class="error" role="alert">{_e(p)}</p>' for p in ([page.error] if page.error else []))
    flash += "".join(f'<p class="error" role="alert">{_e(p)}</p>' for p in problems)
    if page.message:
        flash += f'<p class="notice" role="status">{_e(page.message)}</p>'
    return flash


def _controls(page: PageState, users: list[str]) -> dict[str, str]:
    """The users and compose panels' fields of ``page.html``."""
    current = _current(page, users)
    compose = page.compose
    chosen = set(compose.get("users", [current] if current else []))
    behaviour_labels = {k: f"{v[1]} — {v[2]}" for k, v in BEHAVIOURS.items()}
    user_list = (
        "<ul>" + "".join(f'<li><a href="{_e(_link(user=u))}#stores">{_e(u)}</a></li>' for u in users) + "</ul>"
        if users
        else '<p class="empty">No test users yet.</p>'
    )
    device_select = (
        f'<select id="device-user" name="user" required>{_options(users, current)}</select>'
        if users
        else '<select id="device-user" name="user" required disabled><option value="">create a user first</option>'
        "</select>"
    )
    return {
        "device_select": device_select,
        "behaviour_options": _options(list(BEHAVIOURS), "healthy", behaviour_labels),
        "platform_options": _options(list(PLATFORMS), "android"),
        "device_button_disabled": "" if users else " disabled",
        "user_list": user_list,
        "current": _e(current),
        "title": _e(compose.get("title", "")),
        "body": _e(compose.get("body", "")),
        "data": _e(compose.get("data", "")),
        "user_checkboxes": _checkboxes("users", users, chosen) or '<p class="empty">No test users yet.</p>',
        "other_users": _e(compose.get("other_users", "")),
        "platform_checkboxes": _checkboxes("platforms", list(PLATFORMS), set(compose.get("platforms", []))),
        "once": _e(compose.get("once", "")),
        "category": _e(compose.get("category", "")),
        "urgent_checked": " checked" if compose.get("urgent") else "",
        "audience_all_checked": " checked" if compose.get("audience_all") else "",
        "audience_locales": _e(compose.get("audience_locales", "")),
        "min_app_version": _e(compose.get("min_app_version", "")),
        "preferences_select": f'<select id="p-user" name="user" required>{_options(users, current)}</select>'
        if users
        else '<select id="p-user" name="user" required disabled><option value="">create a user first</option></select>',
        "preferences_button_disabled": "" if users else " disabled",
    }


def _views(page: PageState, seen: _Seen) -> dict[str, str]:
    """The status, devices and stores sections' fields of ``page.html``."""
    nid, status, sent = seen.nid, seen.status, seen.sent
    recent = (
        "<details><summary>Recent notifications</summary><ul>"
        + "".join(f'<li><a href="{_e(_link(n=n, user=page.user))}#status"><code>{_e(n)}</code></a></li>' for n in sent)
        + "</ul></details>"
        if sent
        else ""
    )
    status_url = "/fragments/status?" + urlencode({"n": nid}) if nid and not settled(status) else ""
    stores_url = "/fragments/stores?" + urlencode({"user": page.user}) if page.user else ""
    return {
        "refresh_without_js": (
            '<noscript><meta http-equiv="refresh" content="2"></noscript>'
            if status is not None and not settled(status)
            else ""
        ),
        "status_url": _e(status_url),
        "status": render_status(nid, status, seen.status_error),
        "recent": recent,
        "devices": render_devices(seen.devices),
        "stores_user": _e(page.user),
        "user_options": _options(seen.users, ""),
        "stores_url": _e(stores_url),
        "stores": render_stores(page.user, seen.cached, seen.db),
        **preference_fields(_current(page, seen.users), seen.preferences),
    }


async def render_page(app: web.Application, page: PageState) -> str:
    """The whole page: ``console_templates/page.html`` filled with HTML made (and escaped) here."""
    seen = await _look(app, page)
    fields = {"flash": _flash(page, seen.problems), **_controls(page, seen.users), **_views(page, seen)}
    return PAGE.substitute(fields)


# --- handlers --------------------------------------------------------------------------------------


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _redirect(anchor: str, **query: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(_link(**query) + f"#{anchor}")


async def index(request: web.Request) -> web.Response:
    q = request.query
    page = PageState(user=q.get("user", ""), nid=q.get("n", ""), message=q.get("msg", ""), error=q.get("err", ""))
    return _html(await render_page(request.app, page))


async def create_user(request: web.Request) -> web.Response:
    form = await request.post()
    user = str(form.get("user", "")).strip() or f"user-{secrets.token_hex(3)}"
    if not USER_RE.fullmatch(user):
        raise _redirect("users", err=f"invalid user id {user!r}: use 1-64 of A-Z a-z 0-9 _ . @ -")
    try:
        await _blocking(instance.redis_client().sadd, USERS_KEY, user)
    except ConsoleError as exc:
        raise _redirect("users", err=str(exc)) from None
    raise _redirect("users", user=user, msg=f"Created user {user}.")


async def _register_call(app: web.Application, method: str, user: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call the real ``register`` endpoint as ``user`` (a local ID token): (status, JSON answer)."""
    cfg = app[CONFIG]
    headers = {"Authorization": f"Bearer {emulator_id_token(user, cfg.project)}"}
    try:
        async with app[HTTP].request(method, f"{cfg.register}{path}", json=body, headers=headers) as response:
            status, answer = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise ConsoleError(f"register at {cfg.register} did not answer: {exc}") from None
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, {"error": answer[:300]}


async def user_preferences(app: web.Application, user: str) -> dict[str, Any]:
    status, answer = await _register_call(app, "GET", user, "/preferences")
    if status != 200:
        raise ConsoleError(f"GET /preferences of {user} answered {status}: {answer.get('error', answer)}")
    return dict(answer)


async def register_device(request: web.Request) -> web.Response:
    form = await request.post()
    user, behaviour, platform = (str(form.get(k, "")) for k in ("user", "behaviour", "platform"))
    if not USER_RE.fullmatch(user) or behaviour not in BEHAVIOURS or platform not in PLATFORMS:
        raise _redirect("users", user=user, err="choose a user, a behaviour and a platform")
    token = f"{BEHAVIOURS[behaviour][0]}{user}-{secrets.token_hex(4)}"
    try:
        status, answer = await _register_call(request.app, "POST", user, "/", {"token": token, "platform": platform})
    except ConsoleError as exc:
        raise _redirect("users", user=user, err=str(exc)) from None
    if status != 200:
        raise _redirect("users", user=user, err=f"register answered {status}: {json.dumps(answer)[:300]}")
    record = json.dumps({"user": user, "platform": platform, "behaviour": behaviour, "at": time.time()})
    try:
        await _blocking(_remember_device, user, token, record)
    except ConsoleError as exc:
        raise _redirect("users", user=user, err=str(exc)) from None
    label = BEHAVIOURS[behaviour][1].lower()
    raise _redirect("users", user=user, msg=f"Registered device {token} ({label}, {platform}) for {user}.")


def _preferences_body(form: Any) -> dict[str, Any]:
    """The PUT /preferences body the form asks for: quiet hours only when one of their fields is filled."""
    body: dict[str, Any] = {"muted_categories": [c for c in re.split(r"[\s,]+", str(form.get("muted", ""))) if c]}
    quiet = {k: str(form.get(f, "")).strip() for k, f in (("start", "quiet_start"), ("end", "quiet_end"))}
    quiet["time_zone"] = str(form.get("time_zone", "")).strip()
    if any(quiet.values()):
        body["quiet_hours"] = quiet
    return body


async def save_preferences(request: web.Request) -> web.Response:
    form = await request.post()
    user = str(form.get("user", ""))
    if not USER_RE.fullmatch(user):
        raise _redirect("preferences", err="choose a user")
    try:
        status, answer = await _register_call(request.app, "PUT", user, "/preferences", _preferences_body(form))
    except ConsoleError as exc:
        raise _redirect("preferences", user=user, err=str(exc)) from None
    if status != 200:
        raise _redirect("preferences", user=user, err=f"register refused them ({status}): {answer.get('error')}")
    raise _redirect("preferences", user=user, msg=f"Saved the preferences of {user}.")


def _remember_device(user: str, token: str, record: str) -> None:
    pipe = instance.redis_client().pipeline()
    pipe.sadd(USERS_KEY, user)
    pipe.hset(DEVICES_KEY, token, record)
    pipe.execute()


def _compose_values(form: Any) -> dict[str, Any]:
    return {
        "title": str(form.get("title", "")).strip(),
        "body": str(form.get("body", "")).strip(),
        "data": str(form.get("data", "")),
        "users": [str(u) for u in form.getall("users", [])],
        "other_users": str(form.get("other_users", "")),
        "platforms": [str(p) for p in form.getall("platforms", [])],
        "once": str(form.get("once", "")).strip(),
        "category": str(form.get("category", "")).strip(),
        "urgent": bool(form.get("urgent")),
        "audience_all": bool(form.get("audience_all")),
        "audience_locales": str(form.get("audience_locales", "")),
        "min_app_version": str(form.get("min_app_version", "")).strip(),
    }


def _audience(values: dict[str, Any]) -> dict[str, Any] | None:
    """The audience the compose form names (its platforms become the audience's), or None: users."""
    locales = [x for x in re.split(r"[\s,]+", values.get("audience_locales", "")) if x]
    audience: dict[str, Any] = {"all": True} if values.get("audience_all") else {}
    if locales:
        audience["locales"] = locales
    if values.get("min_app_version"):
        audience["app_version"] = {"min": values["min_app_version"]}
    if audience and values["platforms"]:
        audience["platforms"] = values["platforms"]
    return audience or None


def _compose_body(values: dict[str, Any]) -> dict[str, Any]:
    """The ``send`` request body the compose form asks for."""
    others = [u for u in re.split(r"[\s,]+", values["other_users"]) if u]
    audience = _audience(values)
    body: dict[str, Any] = {"audience": audience} if audience else {}
    if not audience or values["users"] or others:  # both: send answers which is wrong
        body["user_ids"] = list(dict.fromkeys(values["users"] + others))
    notification = {k: values[k] for k in ("title", "body") if values[k]}
    if notification:
        body["notification"] = notification
    data: dict[str, str] = {}
    for n, line in enumerate(values["data"].splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConsoleError(f"data line {n} is not key=value: {line!r}")
        data[key.strip()] = value.strip()
    if data:
        body["data"] = data
    if values["platforms"] and not audience:
        body["platforms"] = values["platforms"]
    if values["once"]:
        body["once"] = values["once"]
    if values["category"]:
        body["category"] = values["category"]
    if values["urgent"]:
        body["urgent"] = True
    return body


async def _post_send(app: web.Application, body: dict[str, Any]) -> str:
    """POST the body to the real ``send`` endpoint; the notification id it accepted."""
    cfg = app[CONFIG]
    # an audience needs an Idempotency-Key: one per press of the button
    headers = {"Idempotency-Key": uuid.uuid4().hex} if "audience" in body else {}
    try:
        async with app[HTTP].post(f"{cfg.send}/", json=body, headers=headers) as response:
            status, text = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise ConsoleError(f"send at {cfg.send} did not answer: {exc}") from exc
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"error": text[:500]}
    if status != 202:
        raise ConsoleError(f"send refused it ({status}): {answer.get('error', answer)}")
    return str(answer["id"])


async def send(request: web.Request) -> web.Response:
    form = await request.post()
    values = _compose_values(form)
    try:
        nid = await _post_send(request.app, _compose_body(values))
    except ConsoleError as exc:
        page = PageState(user=str(form.get("current", "")), error=str(exc), compose=values)
        return _html(await render_page(request.app, page), status=400)
    try:
        await _blocking(_remember_sent, nid)
    except ConsoleError:
        pass  # the list of recent sends is a convenience
    raise _redirect("status", n=nid, user=str(form.get("current", "")) or (values["users"] or [""])[0])


async def cancel(request: web.Request) -> web.Response:
    """Cancel through the real ``send`` endpoint (``DELETE /<id>``), then show the status."""
    nid = str((await request.post()).get("n", ""))
    cfg = request.app[CONFIG]
    try:
        async with request.app[HTTP].delete(f"{cfg.send}/{quote(nid, safe='')}") as response:
            status, text = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _redirect("status", n=nid, err=f"send at {cfg.send} did not answer: {exc}") from None
    if status != 200:
        try:
            reason = json.loads(text).get("error", text[:300])
        except (ValueError, AttributeError):
            reason = text[:300]
        raise _redirect("status", n=nid, err=f"send refused the cancel ({status}): {reason}")
    raise _redirect("status", n=nid, msg=f"Cancelled notification {nid}.")


async def receipt(request: web.Request) -> web.Response:
    """A simulated device opens (or dismisses) a notification: ``POST /receipts`` on the real register
    endpoint, as the device's user."""
    form = await request.post()
    nid, token, user, event = (str(form.get(k, "")) for k in ("n", "token", "user", "event"))
    if not USER_RE.fullmatch(user):
        raise _redirect("status", n=nid, err="the receipt names no user")
    cfg = request.app[CONFIG]
    headers = {"Authorization": f"Bearer {emulator_id_token(user, cfg.project)}"}
    body = {"notification_id": nid, "token": token, "event": event}
    try:
        async with request.app[HTTP].post(f"{cfg.register}/receipts", json=body, headers=headers) as response:
            status, answer = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _redirect("status", n=nid, user=user, err=f"register at {cfg.register} did not answer: {exc}") from None
    if status != 200:
        raise _redirect("status", n=nid, user=user, err=f"register answered {status} to the receipt: {answer[:300]}")
    counted = "counted" if json.loads(answer).get("counted") else "already counted for this device"
    raise _redirect("status", n=nid, user=user, msg=f"Device {token} {event} {nid}: {counted}.")


def _remember_sent(nid: str) -> None:
    pipe = instance.redis_client().pipeline()
    pipe.lpush(SENT_KEY, nid)
    pipe.ltrim(SENT_KEY, 0, SENT_KEPT - 1)
    pipe.execute()


async def fragment_devices(request: web.Request) -> web.Response:
    try:
        return _html(render_devices(await devices(request.app)))
    except ConsoleError as exc:
        return _html(f'<p class="error">{_e(exc)}</p>')


async def fragment_status(request: web.Request) -> web.Response:
    nid = request.query.get("n", "")
    try:
        return _html(render_status(nid, await notification_status(request.app, nid)))
    except ConsoleError as exc:
        return _html(render_status(nid, None, str(exc)))


async def fragment_stores(request: web.Request) -> web.Response:
    user = request.query.get("user", "")
    try:
        cached, db = await _blocking(_stores_of, user) if user else (None, {})
    except ConsoleError as exc:
        return _html(f'<p class="error">{_e(exc)}</p>')
    return _html(render_stores(user, cached, db))


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
async def local_only(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer only to this machine's browser: a foreign Host (DNS rebinding) or a state-changing
    request from another origin (CSRF) is refused, ``Origin: null`` included (a sandboxed iframe or a
    data: page: any site can be behind it). No Origin at all is a tool such as curl, not a browser
    (browsers send one with every POST). Pages may load nothing from elsewhere."""
    host = (request.host or "").rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        return web.Response(status=403, text="the console answers on 127.0.0.1 / localhost only")
    origin = request.headers.get("Origin")
    if request.method not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc != request.host:
        return web.Response(status=403, text="cross-origin form refused (Origin is not this console)")
    response = await handler(request)
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # Not no-referrer: under it browsers send "Origin: null" with the console's own forms, which the
    # check above must refuse; same-origin keeps the real Origin here and sends nothing elsewhere.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[HTTP] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
    yield
    await app[HTTP].close()
    await asyncio.to_thread(instance.reset)


def make_app(endpoints: Endpoints) -> web.Application:
    app = web.Application(middlewares=[local_only])
    app[CONFIG] = endpoints
    app.cleanup_ctx.append(_session)
    app.router.add_get("/", index)
    app.router.add_post("/users", create_user)
    app.router.add_post("/devices", register_device)
    app.router.add_post("/preferences", save_preferences)
    app.router.add_post("/send", send)
    app.router.add_post("/cancel", cancel)
    app.router.add_post("/receipts", receipt)
    app.router.add_get("/fragments/devices", fragment_devices)
    app.router.add_get("/fragments/status", fragment_status)
    app.router.add_get("/fragments/stores", fragment_stores)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pushline's local console (127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--register-url", default=os.environ.get("CONSOLE_REGISTER_URL", "http://127.0.0.1:8081"))
    parser.add_argument("--send-url", default=os.environ.get("CONSOLE_SEND_URL", "http://127.0.0.1:8082"))
    parser.add_argument("--fcm-url", default=os.environ.get("CONSOLE_FCM_URL", "http://127.0.0.1:9090"))
    args = parser.parse_args(argv)
    endpoints = Endpoints(
        register=args.register_url.rstrip("/"),
        send=args.send_url.rstrip("/"),
        fcm=args.fcm_url.rstrip("/"),
        project=settings().google_cloud_project,
    )
    print(f"console on http://127.0.0.1:{args.port}/", flush=True)
    web.run_app(make_app(endpoints), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
