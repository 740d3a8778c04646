"""shared/http1.py against real sockets: the fake FCM, and raw servers answering scripted bytes."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from local.fake_fcm import FakeFcm
from shared import http1
from shared.credentials import AccessTokenProvider, StaticTokenCredentials
from shared.fcm import HttpFcmClient
from shared.outcomes import Cause, Kind, from_exception, from_response

HEAD = {"Authorization": "Bearer t", "Content-Type": "application/json"}
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"name":1}\n'

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length framed), as the client sent them."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    return head, await reader.readexactly(length)


class RawServer:
    """A TCP server on 127.0.0.1 whose ``handler(reader, writer, n)`` writes whatever bytes a test scripts
    (n: the connection's number, from 0); it counts accepted connections."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl_context
        self.accepted = 0
        self.closed = asyncio.Event()  # set when a handler returns (its connection closed)

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/v1/projects/p/messages:send"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n, self.accepted = self.accepted, self.accepted + 1
        try:
            await self.handler(reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()


def per_connection(*handlers: Handler) -> Handler:
    """The n-th connection served by the n-th handler (the last one for the rest)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await handlers[min(n, len(handlers) - 1)](reader, writer, n)

    return handler


def answering(*replies: bytes, byte_by_byte: bool = False) -> Handler:
    """A handler answering each request on a connection with the next reply (then keeping it open)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for reply in replies:
            await read_request(reader)
            for piece in [reply[i : i + 1] for i in range(len(reply))] if byte_by_byte else [reply]:
                writer.write(piece)
                await writer.drain()
        await reader.read()  # until the client closes

    return handler


async def post(pool: http1.Http1Pool, body: bytes = b'{"message":{}}', timeout: float = 5.0) -> http1.Response:
    return await pool.post(pool.request_head(HEAD), body, timeout)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


def test_request_bytes_and_content_length_answer() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)
        await reader.read()

    async def main() -> None:
        async with RawServer(handler) as server:
            pool = http1.Http1Pool(server.url())
            response = await post(pool, b'{"a":1}')
            await pool.close()
            assert (response.status, response.body) == (200, b'{"name":1}\n')
            assert response.headers["content-type"] == response.headers["Content-Type"] == "application/json"
            head, body = seen[0]
            assert head.startswith(b"POST /v1/projects/p/messages:send HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in head
            assert b"Authorization: Bearer t\r\n" in head and b"Content-Length: 7\r\n" in head
            assert b"User-Agent: pushline" in head
            assert body == b'{"a":1}'

    run(main())


CHUNKED = (
    b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nretry-after: 7\r\n\r\n"
    b'5;ext=1\r\n{"err\r\n'
    b'A\r\nor": "x"}\n\r\n'
    b"0\r\nX-Trailer: yes\r\n\r\n"
)


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_chunked_answer_with_extensions_and_trailers(byte_by_byte: bool) -> None:
    async def main() -> None:
        async with RawServer(answering(CHUNKED, OK, byte_by_byte=byte_by_byte)) as server:
            pool = http1.Http1Pool(server.url())
            first = await post(pool)
            second = await post(pool)  # the same connection: the chunked answer was read to its end
            await pool.close()
            assert (first.status, first.body) == (503, b'{"error": "x"}\n')
            assert from_response(first.status, first.body, first.headers).retry_after == 7.0
            assert second.status == 200
            assert server.accepted == pool.connections_made == 1

    run(main())


def test_answer_split_byte_by_byte_and_interim_100_continue() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK

    async def main() -> None:
        async with RawServer(answering(reply, reply, byte_by_byte=True)) as server:
            pool = http1.Http1Pool(server.url())
            answers = [await post(pool), await post(pool)]
            await pool.close()
            assert [(a.status, a.body) for a in answers] == [(200, b'{"name":1}\n')] * 2
            assert server.accepted == 1

    run(main())


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\r\nok",  # no length: up to EOF
    ],
    ids=["connection-close", "http-1.0", "read-to-eof"],
)
def test_connections_the_server_ends_are_not_reused(reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(reply)

    async def main() -> None:
        async with RawServer(handler) as server:
            pool = http1.Http1Pool(server.url())
            answers = [await post(pool), await post(pool)]
            await pool.close()
            assert [(a.status, a.body) for a in answers] == [(200, b"ok")] * 2
            assert server.accepted == 2

    run(main())


def test_http_1_0_keep_alive_and_204_are_reused() -> None:
    replies = [b"HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\n\r\n", OK]

    async def main() -> None:
        async with RawServer(answering(*replies)) as server:
            pool = http1.Http1Pool(server.url())
            answers = [await post(pool) for _ in replies]
            await pool.close()
            assert [(a.status, a.body) for a in answers] == [(204, b""), (304, b""), (200, b'{"name":1}\n')]
            assert server.accepted == 1

    run(main())


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + str(2 * 1024 * 1024).encode() + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n" + b"a" * 0x200000,
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: a\r\n" * 10000,
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    ],
    ids=[
        "head>64k",
        "body>1M",
        "chunked>1M",
        "http2",
        "status",
        "two-lengths",
        "negative-length",
        "space-in-name",
        "obs-fold",
        "chunk-size",
        "chunk-crlf",
        "trailers>64k",
        "length-digits",
    ],
)
def test_garbled_or_oversize_answers_are_errors_and_close_the_connection(reply: bytes) -> None:
    async def main() -> None:
        async with RawServer(per_connection(answering(reply), answering(OK))) as server:
            pool = http1.Http1Pool(server.url())
            with pytest.raises(http1.ProtocolError) as err:
                await post(pool)
            assert (await post(pool)).status == 200  # on a new connection
            await pool.close()
            assert server.accepted == 2
            outcome = from_exception(err.value)
            assert (outcome.code, outcome.maybe_sent) == ("CONNECTION", True)

    run(main())


def test_idle_connection_closed_by_the_server_is_dropped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive answer, then the server closes the connection anyway
        if n > 0:
            await reader.read()

    async def main() -> None:
        async with RawServer(handler) as server:
            pool = http1.Http1Pool(server.url())
            assert (await post(pool)).status == 200
            await server.closed.wait()
            await until(lambda: pool.idle_connections == 0)
            assert (await post(pool)).status == 200
            await pool.close()
            assert server.accepted == 2

    run(main())


def test_idle_connection_older_than_keepalive_is_not_reused() -> None:
    async def main() -> None:
        async with RawServer(answering(OK, OK)) as server:
            pool = http1.Http1Pool(server.url(), keepalive=0.0)
            assert (await post(pool)).status == 200
            assert (await post(pool)).status == 200
            await pool.close()
            assert server.accepted == 2

    run(main())


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], ids=["nothing", "half"])
def test_server_closing_mid_answer_is_connection_lost_maybe_sent(sent: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(sent)

    async def main() -> None:
        async with RawServer(handler) as server:
            pool = http1.Http1Pool(server.url())
            with pytest.raises(http1.ConnectionLost) as err:
                await post(pool)
            await pool.close()
            outcome = from_exception(err.value)
            assert (outcome.code, outcome.maybe_sent) == ("CONNECTION", True)

    run(main())


def test_server_that_never_answers_times_out_within_the_budget_and_is_not_reused() -> None:
    stalled = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")  # and nothing more
    handler = per_connection(stalled, answering(OK))

    async def main() -> None:
        async with RawServer(handler) as server:
            pool = http1.Http1Pool(server.url())
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(http1.AnswerTimeout) as err:
                await post(pool, timeout=0.3)
            assert loop.time() - started >= 0.3  # (no upper bound: timings are never asserted)
            assert (await post(pool)).status == 200
            await pool.close()
            assert server.accepted == 2
            outcome = from_exception(err.value)
            assert (outcome.code, outcome.maybe_sent) == ("TIMEOUT", True)

    run(main())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dns_is_cached_and_addresses_are_tried_in_order() -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with RawServer(answering(close)) as server:
            pool = http1.Http1Pool(server.url(host="localhost"), dns_ttl=300)
            answers = await asyncio.gather(*(post(pool) for _ in range(5)))
            answers.append(await post(pool))
            assert [a.status for a in answers] == [200] * 6
            assert (pool.lookups, server.accepted) == (1, 6)  # one lookup shared by every connection
            # A refused address first: the next one is tried.
            good = pool._addresses[0]
            refused = (good[0], good[1], good[2], good[3], ("127.0.0.1", _closed_port()))
            pool._addresses = [refused, good]
            assert (await post(pool)).status == 200
            await pool.close()

    run(main())


def test_an_address_that_never_answers_does_not_hold_back_the_next_one() -> None:
    """A first address that silently drops connection attempts (an AAAA record without IPv6 egress) gets only
    its share of the connect budget, the next address is tried within it, and the one that answered is tried
    first from then on (the request succeeds twice; the second makes no attempt on the dead address)."""
    silent = socket.socket()  # a listener whose accept queue is full drops further SYNs: no answer at all
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    filler = socket.create_connection(silent.getsockname())

    async def main() -> None:
        async with RawServer(answering(OK)) as server:
            pool = http1.Http1Pool(server.url(host="localhost"), connect_timeout=3.0)
            assert (await post(pool)).status == 200  # (resolves the host: its address)
            good = pool._addresses[0]
            dead = (good[0], good[1], good[2], good[3], silent.getsockname())
            await pool.close()
            pool = http1.Http1Pool(server.url(host="localhost"), connect_timeout=3.0)
            pool._addresses, pool._resolved_at = [dead, good], asyncio.get_running_loop().time()
            assert (await post(pool, timeout=5.0)).status == 200
            assert pool._addresses[0] == good  # the address that answered comes first now
            await pool.close()

    try:
        run(main())
    finally:
        filler.close()
        silent.close()


def test_a_caller_cancelled_during_the_lookup_does_not_stall_the_next() -> None:
    async def main() -> None:
        async with RawServer(answering(OK)) as server:
            pool = http1.Http1Pool(server.url(host="localhost"))
            first = asyncio.ensure_future(post(pool))
            await until(lambda: pool.lookups == 1)
            first.cancel()
            assert (await post(pool, timeout=2.0)).status == 200
            await pool.close()

    run(main())


def test_connection_refused_and_unknown_host_sent_nothing() -> None:
    async def main() -> None:
        for url in (f"http://127.0.0.1:{_closed_port()}/x", "http://no-such-host.invalid/x"):
            pool = http1.Http1Pool(url)
            with pytest.raises(http1.ConnectError) as err:
                await post(pool)
            await pool.close()
            outcome = from_exception(err.value)
            assert (outcome.code, outcome.maybe_sent) == ("CONNECTION", False), url

    run(main())


def test_connect_timeout_sent_nothing() -> None:
    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # The kernel accepts the TCP connection; no one answers the TLS handshake.
        pool = http1.Http1Pool(f"https://127.0.0.1:{port}/x", connect_timeout=0.2)
        with pytest.raises(http1.ConnectTimeout) as err:
            await post(pool)
        await pool.close()
        listener.close()
        outcome = from_exception(err.value)
        assert (outcome.code, outcome.maybe_sent) == ("TIMEOUT", False)

    run(main())


def test_retry_after_read_from_429() -> None:
    reply = b"HTTP/1.1 429 Too Many Requests\r\nRETRY-AFTER: 30\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        async with RawServer(answering(reply)) as server:
            pool = http1.Http1Pool(server.url())
            response = await post(pool)
            await pool.close()
            assert response.headers.get("Retry-After") == "30"
            assert from_response(response.status, response.body, response.headers).retry_after == 30.0

    run(main())


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeFcm]:
    server = FakeFcm()
    server.start()
    server.configure(delay_ms=5)
    yield server
    server.stop()


def test_many_in_flight_reuse_connections(fake: FakeFcm) -> None:
    bound = 20

    async def main() -> None:
        pool = http1.Http1Pool(fake.url + "/v1/projects/p/messages:send")
        head = pool.request_head(HEAD)
        slots = asyncio.Semaphore(bound)

        async def one(i: int) -> int:
            async with slots:
                body = json.dumps({"message": {"token": f"t-{i}"}}).encode()
                return (await pool.post(head, body, 5.0)).status

        statuses = await asyncio.gather(*(one(i) for i in range(300)))
        await pool.close()
        assert statuses == [200] * 300
        assert 2 <= pool.connections_made <= bound

    run(main())


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the server's self-signed certificate)."""
    cert, key = _certificate(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def test_tls_with_a_trusted_certificate(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with RawServer(answering(CHUNKED, OK), ssl_context=server_ctx) as server:
            pool = http1.Http1Pool(server.url("https", "localhost"), ssl=client_ctx)
            answers = [await post(pool), await post(pool)]
            await pool.close()
            assert [a.status for a in answers] == [503, 200]
            assert server.accepted == 1

    run(main())


def test_tls_refuses_a_wrong_host_name(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with RawServer(answering(OK), ssl_context=server_ctx) as server:
            # The same server by its address: the certificate names only localhost.
            pool = http1.Http1Pool(server.url("https", "127.0.0.1"), ssl=client_ctx)
            with pytest.raises(http1.ConnectError) as err:
                await post(pool)
            await pool.close()
            assert "certificate" in str(err.value).lower()
            assert from_exception(err.value).maybe_sent is False

    run(main())


def test_tls_untrusted_certificate_is_refused(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls

    async def main() -> None:
        async with RawServer(answering(OK), ssl_context=server_ctx) as server:
            pool = http1.Http1Pool(server.url("https", "localhost"))  # the default context: system CAs
            with pytest.raises(http1.ConnectError):
                await post(pool)
            await pool.close()

    run(main())


def test_close_ends_a_running_request_and_idle_connections() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async def main() -> None:
        async with RawServer(handler) as server:
            pool = http1.Http1Pool(server.url())
            task = asyncio.ensure_future(post(pool))
            await until(lambda: server.accepted == 1 and bool(pool._busy))
            await pool.close()
            with pytest.raises(http1.ConnectionLost):
                await task

    run(main())


def test_close_during_an_answer_read_to_its_end_is_no_answer() -> None:
    """An answer without a length ends with the connection; closing the pool while it is read must not turn
    the part read so far into an answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n{"error": {"co')
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with RawServer(handler) as server:
            pool = http1.Http1Pool(server.url())
            task = asyncio.ensure_future(post(pool))
            await until(lambda: any(conn._body for conn in pool._busy))
            await pool.close()
            with pytest.raises(http1.ConnectionLost):
                await task

    run(main())


def test_fcm_client_refuses_an_endpoint_that_is_no_url_at_once_and_never_raises_on_a_bad_host() -> None:
    tokens = AccessTokenProvider(StaticTokenCredentials("tok"))
    with pytest.raises(ValueError, match="not an http"):
        HttpFcmClient("p", "localhost:8080", tokens=tokens, timeout=2.0)

    async def main() -> None:
        client = HttpFcmClient("p", "http://a..b:1", tokens=tokens, timeout=2.0)  # IDNA cannot encode it
        outcome = await client.send({"token": "t"})
        await client.close()
        assert (outcome.code, outcome.maybe_sent) == ("CONNECTION", False)

    run(main())


def test_fcm_client_never_sends_an_access_token_that_is_not_a_header_value() -> None:
    async def main() -> None:
        async with RawServer(answering(OK)) as server:
            tokens = AccessTokenProvider(StaticTokenCredentials("tok\r\nX-Injected: 1"))
            client = HttpFcmClient("p", f"http://127.0.0.1:{server.port}", tokens=tokens, timeout=2.0)
            outcome = await client.send({"token": "t"})
            await client.close()
            assert (outcome.kind, outcome.cause, outcome.maybe_sent) == (Kind.RETRY, Cause.CREDENTIALS, False)
            assert server.accepted == 0

    run(main())


def test_bytes_after_a_whole_answer_end_the_connection() -> None:
    """More than one answer to one request (a confused server): the first is the answer, and the connection
    is not reused, so the stray bytes are never read as the next request's answer."""

    async def main() -> None:
        async with RawServer(answering(OK + b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", OK)) as server:
            pool = http1.Http1Pool(server.url())
            assert (await post(pool)).status == 200
            assert (await post(pool)).status == 200
            await pool.close()
            assert server.accepted == 2

    run(main())


def test_bytes_on_an_idle_connection_drop_it() -> None:
    """A server that writes while no request is open: the connection is dropped, never read as an answer."""

    answered = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await answered.wait()  # the client has its answer: the connection is idle now
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with RawServer(per_connection(handler, answering(OK))) as server:
            pool = http1.Http1Pool(server.url())
            assert (await post(pool)).status == 200
            assert len(pool._idle) == 1
            answered.set()
            await until(lambda: not pool._idle)  # dropped once the stray answer arrived
            assert (await post(pool)).status == 200
            await pool.close()
            assert server.accepted == 2

    run(main())


def test_a_request_cancelled_while_waiting_for_its_answer_leaves_no_connection_to_reuse() -> None:
    """A caller cancelled after its request went out: its connection is aborted (a late answer would
    otherwise be read as the next request's), the next request gets a new connection."""

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await reader.read()

    async def main() -> None:
        async with RawServer(per_connection(never, answering(OK))) as server:
            pool = http1.Http1Pool(server.url())
            task = asyncio.ensure_future(post(pool))
            await until(lambda: server.accepted == 1 and bool(pool._busy))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not pool._idle and not pool._busy
            assert (await post(pool)).status == 200
            await pool.close()
            assert server.accepted == 2

    run(main())
