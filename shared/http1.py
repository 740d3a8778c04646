"""A small asyncio HTTP/1.1 client for one origin: the FCM endpoint (``https://``) or the fake (``http://``).

Why not aiohttp: FCM sending is one POST per device, hundreds in flight on one core, and aiohttp's request
path was most of ``deliver``'s CPU. This client does only what FCM HTTP v1 needs, on ``asyncio.Protocol``:

- a keep-alive pool: idle connections are reused last-in first-out (the warmest socket first, and when
  traffic drops the surplus ones stay unused and age out), closed instead of reused once idle for
  ``keepalive`` seconds (60, aiohttp's keepalive_timeout), dropped when the server closes them;
- the host resolved once per ``dns_ttl`` (300 s, aiohttp's ttl_dns_cache), its addresses tried in order,
  each but the last for at most ``ATTEMPT_SECONDS`` of the connect budget (one that never answers does not
  hold back the others), the one that answered first from then on;
  TLS with the given ``ssl.SSLContext`` (default: ``ssl.create_default_context()``, certificate and host
  name checked, SNI sent);
- ``POST`` with a request head the caller encodes once (``request_head``: it changes only with the
  access token), ``Content-Length`` framing;
- answers read with ``Content-Length``, ``Transfer-Encoding: chunked`` (extensions and trailers skipped),
  or up to EOF; 1xx interim answers skipped, 204/304 without a body; ``Connection: close`` and HTTP/1.0
  without keep-alive end the connection; heads over 64 KiB or bodies over 1 MiB, and anything unparsable,
  are errors that close the connection;
- one deadline per request (``timeout``: connecting, writing and the whole answer), and a connect
  timeout; a connection whose request timed out or failed is aborted, never reused.

Errors: ``ConnectError`` (``ConnectTimeout``) when nothing was sent (DNS, refused, TLS handshake,
connect timeout); ``AnswerTimeout``, ``ConnectionLost`` and ``ProtocolError`` once the request may
have reached the server. ``shared.outcomes.from_exception`` maps them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # status line + headers (and a chunk-size line, and the trailers)
MAX_BODY = 1024 * 1024
KEEPALIVE_SECONDS = 60.0
DNS_TTL_SECONDS = 300.0
ATTEMPT_SECONDS = 2.0  # at most this of the connect budget for an address when another one is left to try
USER_AGENT = "pushline-fcm/1 (+asyncio http1)"

_CRLF = b"\r\n"
_END_OF_HEAD = b"\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})


class HttpError(Exception):
    """Base of this module's errors."""


class ConnectError(HttpError):
    """No connection could be made (DNS, refused, unreachable, TLS handshake): nothing was sent."""


class ConnectTimeout(ConnectError):
    """Connecting took longer than allowed: nothing was sent."""


class AnswerTimeout(HttpError):
    """The request was written (or being written) and no complete answer came in time."""


class ConnectionLost(HttpError):
    """The connection ended after the request was written, before the answer was complete."""


class ProtocolError(HttpError):
    """The answer could not be parsed or broke a limit; the connection was closed."""


class Headers(Mapping[str, str]):
    """Response headers, looked up case-insensitively; a repeated header's values joined with ', '."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items  # keys lower-cased

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _parse_head(head: bytes) -> tuple[int, bool, dict[str, str]]:
    """(status, keep-alive by default, lower-cased headers) of one response head without its last CRLF."""
    lines = head.split(_CRLF)
    line = lines[0]
    if line[:7] != b"HTTP/1." or line[7:8] not in (b"0", b"1") or line[8:9] != b" " or line[12:13] not in (b"", b" "):
        raise ProtocolError(f"bad status line {line[:40]!r}")
    code = line[9:12]
    if not code.isdigit():
        raise ProtocolError(f"bad status line {line[:40]!r}")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not name or b" " in name or b"\t" in name:
            raise ProtocolError(f"bad header line {raw[:40]!r}")  # no obs-fold, no space in or after a name
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(code), line[7:8] == b"1", headers


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


def _content_length(value: str) -> int:
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise ProtocolError("conflicting Content-Length values")
    [text] = values
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise ProtocolError(f"bad Content-Length {text[:20]!r}")
    return int(text)


def _check_body(size: int) -> None:
    if size > MAX_BODY:
        raise ProtocolError(f"answer body over {MAX_BODY} bytes")


# Reading states of a connection.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _TO_EOF = range(7)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time (no pipelining)."""

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport  # set by connection_made, before create_connection returns
        self.closed = False
        self.idle_since = 0.0
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for the end of the head
        self._state = _IDLE
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status = 0
        self._headers = Headers({})
        self._keep = True
        self._body = bytearray()
        self._remaining = 0

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE:  # nothing was asked: the server is confused, drop the connection
            self._fail(ProtocolError("data from the server while no request was open"))
            return
        self._buf += data
        try:
            self._advance()
        except ProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        if self._state == _TO_EOF:
            self._complete(bytes(self._body), keep=False)
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _TO_EOF and exc is None:  # TLS without close_notify still ends such a body
            self._complete(bytes(self._body), keep=False)
        self.closed = True
        self.pool._forget(self)
        if self._state == _HEAD and not self._buf and self._waiter is not None:
            reason = "the server closed the connection without answering"
        else:
            reason = "the server closed the connection mid-answer"
        self._settle(ConnectionLost(f"{reason}: {exc!r}" if exc else reason))

    # -- one request ----------------------------------------------------------------------------

    async def request(self, data: bytes, deadline: float) -> Response:
        loop = self.pool.loop
        self._waiter = waiter = loop.create_future()
        self._timer = loop.call_at(deadline, self._timed_out)
        self._state = _HEAD
        self.transport.write(data)
        try:
            return await waiter
        except BaseException:
            if self._state != _IDLE:  # cancelled mid-answer: the connection cannot be reused
                self._fail(ConnectionLost("request cancelled"))
            raise

    def _timed_out(self) -> None:
        self._fail(AnswerTimeout("no complete answer before the deadline"))

    def _fail(self, exc: HttpError) -> None:
        self._settle(exc)
        self._close(abort=True)

    def _settle(self, exc: HttpError) -> None:
        waiter, self._waiter = self._waiter, None
        self._finish_request()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish_request(self) -> None:
        self._state = _IDLE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _complete(self, body: bytes, keep: bool) -> None:
        waiter, self._waiter = self._waiter, None
        self._finish_request()
        keep = keep and self._keep and not self._buf  # leftover bytes: the server sent more than one answer
        response = Response(self._status, self._headers, body)
        if keep:
            self.pool._release(self)
        else:
            self._close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # -- parsing ----------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Parse as much of ``_buf`` as has arrived; complete the request when its answer is whole."""
        while self._state != _IDLE:
            state = self._state
            if state == _HEAD:
                if not self._read_head():
                    return
            elif state == _LENGTH:
                if len(self._buf) < self._remaining:
                    return
                body = bytes(self._buf[: self._remaining])
                del self._buf[: self._remaining]
                self._complete(body, keep=True)
            elif state == _TO_EOF:
                self._take_body(len(self._buf))
                return
            elif not self._read_chunked(state):
                return

    def _take_body(self, size: int) -> None:
        _check_body(len(self._body) + size)
        self._body += self._buf[:size]
        del self._buf[:size]

    def _line(self) -> bytes | None:
        """One CRLF-terminated line of a chunked body (size line, trailer), or None until it is whole."""
        end = self._buf.find(_CRLF)
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise ProtocolError("chunk line or trailers too long")
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _read_chunked(self, state: int) -> bool:
        """One step of a chunked body; False when more bytes are needed."""
        if state == _CHUNK_DATA:
            if len(self._buf) < self._remaining + 2:
                return False
            if self._buf[self._remaining : self._remaining + 2] != _CRLF:
                raise ProtocolError("chunk not followed by CRLF")
            self._take_body(self._remaining)
            del self._buf[:2]
            self._state = _CHUNK_SIZE
            return True
        line = self._line()
        if line is None:
            return False
        if state == _TRAILERS:
            self._remaining += len(line) + 2  # the trailers' size so far
            if self._remaining > MAX_HEAD:
                raise ProtocolError("trailers too long")
            if not line:  # the empty line after the trailers: the answer is whole
                self._complete(bytes(self._body), keep=True)
            return True
        size = line.split(b";", 1)[0].strip(b" \t")
        if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
            raise ProtocolError(f"bad chunk size {line[:20]!r}")
        self._remaining = int(size, 16)
        _check_body(len(self._body) + self._remaining)
        self._state = _CHUNK_DATA if self._remaining else _TRAILERS
        return True

    def _read_head(self) -> bool:
        """Parse a whole head if it has arrived (skipping 1xx answers); False when more bytes are needed."""
        buf = self._buf
        end = buf.find(_END_OF_HEAD, max(0, self._scanned - 3))
        if end < 0 or end > MAX_HEAD:
            if len(buf) > MAX_HEAD:
                raise ProtocolError(f"answer head over {MAX_HEAD} bytes")
            self._scanned = len(buf)
            return False
        status, http11, headers = _parse_head(bytes(buf[:end]))
        del buf[: end + 4]
        self._scanned = 0
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("the server switched protocols")
            return True  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._start_body(status, http11, headers)
        return True

    def _start_body(self, status: int, http11: bool, headers: dict[str, str]) -> None:
        connection = _tokens(headers.get("connection"))
        self._status = status
        self._headers = Headers(headers)
        self._keep = "close" not in connection and (http11 or "keep-alive" in connection)
        self._body = bytearray()
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if status in _NO_BODY_STATUSES:
            self._complete(b"", keep=True)
        elif encoding is not None:
            if length is not None:  # both: Transfer-Encoding wins, and the connection is not trusted after
                self._keep = False
            codings = [t.strip().lower() for t in encoding.split(",")]
            self._state = _CHUNK_SIZE if codings[-1] == "chunked" else _TO_EOF
        elif length is not None:
            self._remaining = _content_length(length)
            _check_body(self._remaining)
            self._state = _LENGTH
        else:
            self._state = _TO_EOF


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a lookup's failure as seen when every caller gave up waiting (no "never retrieved" warning)."""
    if not task.cancelled():
        task.exception()


class Http1Pool:
    """Keep-alive connections to the origin of ``url``; ``post`` sends one request on one of them."""

    def __init__(
        self,
        url: str,
        *,
        ssl: ssl_module.SSLContext | None = None,
        connect_timeout: float | None = None,
        keepalive: float = KEEPALIVE_SECONDS,
        dns_ttl: float = DNS_TTL_SECONDS,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl or ssl_module.create_default_context()) if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = f"{host}:{parts.port}" if parts.port else host
        self.path = parts.path or "/"
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.dns_ttl = dns_ttl
        self.connections_made = 0  # for stats and tests
        self.lookups = 0
        self._closed = False
        self._idle: deque[_Connection] = deque()  # oldest on the left
        self._busy: set[_Connection] = set()
        self._addresses: list[Any] = []
        self._resolved_at = -1e18
        self._resolving: asyncio.Task[list[Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def request_head(self, headers: Mapping[str, str], path: str | None = None) -> bytes:
        """The encoded request head up to the Content-Length value: build it once, send it many times."""
        lines = [f"POST {path or self.path} HTTP/1.1", f"Host: {self.host_header}", f"User-Agent: {USER_AGENT}"]
        for name, value in headers.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
                raise ValueError(f"bad header {name!r}")
            lines.append(f"{name}: {value}")
        lines.append("Content-Length: ")
        return "\r\n".join(lines).encode("latin-1")

    async def post(self, head: bytes, body: bytes, timeout: float) -> Response:
        """Send ``head`` (from ``request_head``) and ``body``; the answer, all within ``timeout`` seconds."""
        loop = self.loop
        deadline = loop.time() + timeout
        conn = self._take_idle(loop.time())
        if conn is None:
            conn = await self._connect(deadline)
        self._busy.add(conn)
        return await conn.request(b"%s%d\r\n\r\n%s" % (head, len(body), body), deadline)

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        expired = now - self.keepalive
        while idle and idle[0].idle_since < expired:  # the oldest first: close what waited too long
            idle.popleft()._close()
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    def _release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if self._closed:  # a request that outlived close(): its connection is not kept
            conn._close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    async def _connect(self, deadline: float) -> _Connection:
        budget = deadline - self.loop.time()
        if self.connect_timeout is not None:
            budget = min(budget, self.connect_timeout)
        try:
            async with asyncio.timeout(max(budget, 0.0)):
                addresses = await self._resolve()
        except TimeoutError:
            raise ConnectTimeout(f"could not resolve {self.host} in time") from None
        return await self._open(addresses, self.loop.time() + max(budget, 0.0))

    async def _open(self, addresses: list[Any], give_up_at: float) -> _Connection:
        """Try the addresses in order; each but the last gets at most ATTEMPT_SECONDS (and its share) of the
        budget, so one that never answers does not hold back the others; the one that answers comes first
        from then on. None answering: the host is resolved again next time."""
        errors: list[str] = []
        timed_out = False
        for i, (family, _, proto, _, address) in enumerate(addresses):
            left = give_up_at - self.loop.time()
            share = left if i == len(addresses) - 1 else min(ATTEMPT_SECONDS, left / (len(addresses) - i))
            try:
                async with asyncio.timeout(max(share, 0.0)):
                    _, conn = await self.loop.create_connection(
                        lambda: _Connection(self),
                        host=address[0],
                        port=address[1],
                        family=family,
                        proto=proto,
                        ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None,
                    )
            except TimeoutError:
                timed_out = True
                errors.append(f"{address[0]}: no answer in {share:.1f} s")
                continue
            except (OSError, ssl_module.SSLError) as exc:
                errors.append(f"{address[0]}: {exc!r}")
                continue
            if i and self._addresses is addresses:
                self._addresses = addresses[i:] + addresses[:i]
            self.connections_made += 1
            return conn
        self._resolved_at = -1e18  # resolve again next time: the addresses may have changed
        error = ConnectTimeout if timed_out else ConnectError
        raise error(f"cannot connect to {self.host_header}: " + "; ".join(errors))

    async def _resolve(self) -> list[Any]:
        """The host's addresses, cached for ``dns_ttl``; one lookup at a time shared by every caller (a task
        of its own, so a caller that times out or is cancelled does not leave the others waiting)."""
        if self.loop.time() - self._resolved_at < self.dns_ttl:
            return self._addresses
        if self._resolving is None:
            self._resolving = self.loop.create_task(self._lookup())
            self._resolving.add_done_callback(_retrieve)
        return await asyncio.shield(self._resolving)

    async def _lookup(self) -> list[Any]:
        self.lookups += 1
        try:
            infos = await self.loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # (a host name IDNA cannot encode: UnicodeError)
            raise ConnectError(f"cannot resolve {self.host}: {exc!r}") from exc
        finally:
            self._resolving = None
        if not infos:
            raise ConnectError(f"no address for {self.host}")
        self._addresses, self._resolved_at = infos, self.loop.time()
        return infos

    async def close(self) -> None:
        """Close every connection, idle or busy (a request still running ends with ConnectionLost)."""
        self._closed = True
        for conn in [*self._idle, *self._busy]:
            conn._fail(ConnectionLost("the pool was closed"))  # settled first: never a cut answer as whole
        self._idle.clear()
        self._busy.clear()
