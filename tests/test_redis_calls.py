"""shared/redis_calls.ScriptCalls on a private redis-server: the replies and errors of redis-py's own script
calls, a script Redis forgot loaded again, a failed connection never reused half-read, the pool's one
connection given back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from local.servers import RedisServer, free_port, wait_until
from shared.redis_calls import ScriptCalls

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1, redis.call('GET', KEYS[1])}"
FAIL = "return redis.error_reply('ERR refused by the script')"
SLOW = """
local t = redis.call('TIME'); local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1])
return 'slow'
"""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    started = RedisServer(persistent=False).start()
    yield started
    started.cleanup()


def client_of(server: RedisServer, **options: object) -> redis.Redis:
    return redis.Redis(port=server.port, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **options)


def test_the_reply_is_the_clients_own(server):
    client = client_of(server)
    script = client.register_script(ECHO)
    client.set("k", "v")
    with ScriptCalls(client) as calls:
        assert calls.run(script, ["k"], ["a", 41]) == script(keys=["k"], args=["a", 41]) == [b"k", b"a", 42, b"v"]
        assert calls.run(script, ["absent"], ["b", 1]) == [b"absent", b"b", 2, None]


def test_a_script_redis_forgot_is_loaded_again(server):
    client = client_of(server)
    script = client.register_script(ECHO)
    with ScriptCalls(client) as calls:
        assert calls.run(script, ["k"], ["a", 1])[:3] == [b"k", b"a", 2]
        client.script_flush()
        assert calls.run(script, ["k"], ["a", 2])[:3] == [b"k", b"a", 3]
    assert client.script_exists(script.sha) == [True]


def test_an_error_redis_answers_is_raised_and_the_connection_stays_in_step(server):
    client = client_of(server)
    fail, echo = client.register_script(FAIL), client.register_script(ECHO)
    with ScriptCalls(client) as calls:
        calls.run(echo, ["k"], ["before", 0])
        sock = calls._conn._sock
        with pytest.raises(redis.ResponseError, match="refused by the script"):
            calls.run(fail, ["k"])
        assert calls.run(echo, ["k"], ["after", 0])[:3] == [b"k", b"after", 1]
        assert calls._conn._sock is sock  # the same connection: no reconnect after an answer


def test_a_timed_out_call_never_hands_its_late_answer_to_the_next(server):
    client = client_of(server, socket_timeout=0.2)
    slow, echo = client.register_script(SLOW), client.register_script(ECHO)
    slow(keys=["k"], args=[0])  # loaded
    admin = client_of(server, socket_timeout=10)
    with ScriptCalls(client) as calls:
        with pytest.raises(redis.TimeoutError):
            calls.run(slow, ["k"], [600_000])
        wait_until(admin.ping, what="the slow script to end")
        assert calls.run(echo, ["k"], ["next", 0])[:3] == [b"k", b"next", 1]


def test_a_killed_connection_fails_once_then_a_new_one_is_used(server):
    client = client_of(server)
    echo = client.register_script(ECHO)
    admin = client_of(server)
    with ScriptCalls(client) as calls:
        calls.run(echo, ["k"], ["a", 0])
        admin.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(redis.ConnectionError):
            calls.run(echo, ["k"], ["b", 0])
        assert calls.run(echo, ["k"], ["c", 0])[:3] == [b"k", b"c", 1]


def test_redis_unreachable_is_a_connection_error_at_each_call():
    client = redis.Redis(port=free_port(), socket_connect_timeout=1)
    script = client.register_script(ECHO)
    with ScriptCalls(client) as calls:
        for _ in range(2):
            with pytest.raises(redis.ConnectionError):
                calls.run(script, ["k"], ["a", 0])


def test_one_connection_for_a_block_given_back_to_the_pool(server):
    client = client_of(server)
    echo = client.register_script(ECHO)
    for i in range(3):
        with ScriptCalls(client) as calls:
            calls.run(echo, ["k"], [str(i), 0])
            calls.run(echo, ["k"], [str(i), 1])
    assert len(client.client_list()) == 1  # (this command took the same connection from the pool)


def test_a_call_that_fails_before_reading_its_answer_never_hands_it_to_the_next(server):
    """Anything that interrupts a call between its write and its read (not only redis-py's own errors)
    leaves the answer unread on the socket: the connection is dropped, never given to the next call."""
    client = client_of(server)
    echo = client.register_script(ECHO)
    with ScriptCalls(client) as calls:
        calls.run(echo, ["k"], ["first", 0])
        conn = calls._conn

        def interrupted(*args: object, **kwargs: object) -> object:
            del conn.read_response  # once
            raise RuntimeError("interrupted before the read")

        conn.read_response = interrupted
        with pytest.raises(RuntimeError):
            calls.run(echo, ["k"], ["unread", 0])
        assert calls.run(echo, ["k"], ["own", 0])[:3] == [b"k", b"own", 1]
    with ScriptCalls(client) as calls:
        assert calls.run(echo, ["k"], ["next block", 0])[:3] == [b"k", b"next block", 1]


def test_an_argument_redis_cannot_take_is_a_redis_error(server):
    """As redis-py's own call: a DataError (a RedisError, which the callers treat as Redis unusable), not
    a TypeError that would escape them."""
    client = client_of(server)
    echo = client.register_script(ECHO)
    with ScriptCalls(client) as calls:
        with pytest.raises(redis.DataError):
            calls.run(echo, ["k"], [None, 0])
        assert calls.run(echo, ["k"], ["after", 0])[:3] == [b"k", b"after", 1]
