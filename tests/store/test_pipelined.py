"""The pipelined connection the scripts use (store/pipelined.py), against a real Redis: replies
reach the right callers under concurrency, errors and cancellations leave the connection in step,
a stalled Redis costs a call its timeout and no more, and a restarted Redis (scripts flushed) is
reconnected to without a lost or doubled reservation."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.core.quota import ReservationPlan
from extproc.launch import find_redis_binary, free_port, start_process, wait_until
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import StoreUnavailable, connect, pipelined
from tests.conftest import OwnRedis
from tests.e2e.test_listener_tls import make_ca

pytestmark = pytest.mark.redis


def _plan(rid: str) -> ReservationPlan:
    return ReservationPlan(request_id=rid, now_ms=int(time.time() * 1000),
                           hold_deadline_ms=int(time.time() * 1000) + 60_000,
                           estimate_nanos=1000, estimate_tokens=10, limits=(), windows=(),
                           leases=())


async def test_concurrent_calls_get_their_own_replies(own_redis: OwnRedis) -> None:
    client = connect(own_redis.url, 2.0)
    connection = pipelined(client)
    assert connection is not None
    try:
        values = [f"v{i}-{uuid.uuid4().hex}" for i in range(300)]
        # Written in the same loop turns, answered in order, each to its own caller.
        replies = await asyncio.gather(*(connection.call("ECHO", v) for v in values))
        assert [r.decode() for r in replies] == values
        # A batch gets its replies in order, Redis' errors among them as values.
        batch = await connection.call_many([("SET", "pl-a", "1"), ("INCR", "pl-count"),
                                            ("HSET", "pl-a", "f", "1"), ("GET", "pl-a")])
        assert batch[:2] == [b"OK", 1] and isinstance(batch[2], ResponseError)
        assert batch[3] == b"1"
        # A single call's error reply is raised; the connection stays in step.
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await connection.call("HSET", "pl-a", "f", "1")
        assert await connection.call("ECHO", "after") == b"after"
    finally:
        await client.aclose()


async def test_a_cancelled_call_does_not_shift_the_replies(own_redis: OwnRedis) -> None:
    client = connect(own_redis.url, 2.0)
    connection = pipelined(client)
    assert connection is not None
    try:
        slow = asyncio.create_task(connection.call("EVAL", "return redis.call('ECHO', 'slow')", 0))
        fast = [asyncio.create_task(connection.call("ECHO", f"f{i}")) for i in range(20)]
        await asyncio.sleep(0)
        slow.cancel()  # its reply still comes, and must be skipped
        assert [r.decode() for r in await asyncio.gather(*fast)] == [f"f{i}" for i in range(20)]
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await connection.call("ECHO", "next") == b"next"
    finally:
        await client.aclose()


async def test_a_stalled_redis_costs_the_timeout_then_the_connection_recovers(
    own_redis: OwnRedis,
) -> None:
    """SIGSTOP: every call waiting times out after the client timeout, none waits longer; after
    SIGCONT the next call goes on a fresh connection and late replies of the old one reach
    nobody."""
    client = connect(own_redis.url, 0.3)
    connection = pipelined(client)
    assert connection is not None and own_redis.proc is not None
    try:
        assert await connection.call("SET", "pl-stall", "0")
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # our own redis-server, by PID
        try:
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(connection.call("INCR", "pl-stall") for _ in range(10)),
                return_exceptions=True)
            waited = time.monotonic() - started
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert all(isinstance(o, RedisTimeoutError) for o in outcomes)
        assert 0.25 < waited < 1.5
        # Redis ran what it had received before the stall was noticed (at most all ten: the
        # scripts' idempotency covers this); what we read now is its own answer, not a stale one.
        value = int(await connection.call("GET", "pl-stall"))
        assert 0 <= value <= 10
        assert await connection.call("INCR", "pl-stall") == value + 1
    finally:
        await client.aclose()


async def test_reserve_survives_a_redis_restart_with_its_scripts_gone(
    own_redis: OwnRedis,
) -> None:
    """Restart: the call in flight fails (StoreUnavailable, as before), the next one reconnects,
    finds the script cache empty (NOSCRIPT), loads the script and reserves once."""
    client = connect(own_redis.url, 1.0)
    quota = QuotaStore(client, KeySchema("pl-restart"), stream_maxlen=100)
    try:
        assert (await quota.reserve(_plan("before"), b"e"))[0] == 1
        own_redis.stop()
        with pytest.raises(StoreUnavailable):
            await quota.reserve(_plan("during"), b"e")
        own_redis.start()  # empty: no keys, no scripts
        quota.breaker.success()  # the breaker's own timing is tested in test_breaker.py
        assert (await quota.reserve(_plan("after"), b"e"))[0] == 1
        assert await client.zcard(quota.keys.holds) == 1
        assert await client.exists(quota.keys.hold("after")) == 1
    finally:
        await client.aclose()


async def test_a_late_reply_costs_only_its_own_call(own_redis: OwnRedis) -> None:
    """Redis slow, not stopped: the call whose reply is late times out; a call sent after it
    on the same connection still gets its reply within its own timeout; the next call after
    the timeout goes on a fresh connection (as redis-py drops a connection with a late reply)."""
    client = connect(own_redis.url, 0.5)
    connection = pipelined(client)
    assert connection is not None
    spin = """local t = redis.call('TIME'); local start = t[1] * 1e6 + t[2]
              repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > 700000
              return 1"""
    try:
        assert await connection.call("PING") == b"PONG"
        late = asyncio.create_task(connection.call("EVAL", spin, 0))
        await asyncio.sleep(0.35)
        behind = asyncio.create_task(connection.call("ECHO", "behind"))
        with pytest.raises(RedisTimeoutError):
            await late
        assert await behind == b"behind"  # answered at ~0.7 s, within its own 0.5 s
        assert await connection.call("ECHO", "fresh") == b"fresh"
        clients = (await connection.call("CLIENT", "LIST")).decode().splitlines()
        assert len(clients) <= 2  # the old connection was closed once nothing waited on it
    finally:
        await client.aclose()


async def test_an_argument_redis_cannot_take_is_a_redis_error(own_redis: OwnRedis) -> None:
    """As with redis-py: a store error (StoreUnavailable upstream), not a crash of the caller."""
    client = connect(own_redis.url, 2.0)
    connection = pipelined(client)
    assert connection is not None
    try:
        with pytest.raises(DataError):
            await connection.call("SET", "pl-bad", None)
        assert await connection.call("ECHO", "still") == b"still"
    finally:
        await client.aclose()


async def test_reserve_over_tls(tmp_path: Path) -> None:
    """`rediss://`: redis-py's TLS connection is set up, then its transport carries the
    pipelined calls (reserve, settle batch) like a plain one."""
    binary = find_redis_binary(prefer_embedded=False)
    assert binary is not None
    issued = make_ca("127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(issued.cert_pem)
    (tmp_path / "key.pem").write_bytes(issued.key_pem)
    port = free_port()
    proc = start_process("redis-tls", [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
        "--tls-ca-cert-file", str(tmp_path / "cert.pem"), "--tls-auth-clients", "no"], tmp_path)
    client = connect(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none", 2.0)
    try:
        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(up, proc, 10, "starting")
        quota = QuotaStore(client, KeySchema("pl-tls"), stream_maxlen=100)
        replies = await asyncio.gather(*(quota.reserve(_plan(f"tls-{i}"), b"e")
                                         for i in range(20)))
        assert all(r[0] == 1 for r in replies)
        await quota.settle_many([quota.settle_call(None, 10, 1, b"e", False, request_id=f"u{i}")
                                 for i in range(5)])
        assert await client.zcard(quota.keys.holds) == 20
        assert await client.xlen(quota.keys.usage_stream) == 5
    finally:
        await client.aclose()
        proc.stop()
