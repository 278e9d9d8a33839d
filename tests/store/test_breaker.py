"""The circuit breaker in front of the request-path Redis client, against a real Redis that is
stopped and restarted: after N consecutive failures calls fail at once without reaching Redis,
and after the open period one probe goes through (half-open): success closes the breaker,
failure reopens it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from extproc.gen.tollgate.v1 import usage_pb2
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import CircuitBreaker, QuotaStore, SettleCall
from extproc.store.redis_store import StoreUnavailable, connect
from tests.conftest import OwnRedis

pytestmark = pytest.mark.redis


def _call(quota: QuotaStore, rid: str) -> SettleCall:
    event = usage_pb2.UsageEvent(request_id=rid).SerializeToString()
    return quota.settle_call(None, 10, 1, event, False, request_id=rid)


async def test_breaker_opens_skips_redis_then_half_opens(own_redis: OwnRedis) -> None:
    now = [1000.0]
    client = connect(own_redis.url, 0.2)
    quota = QuotaStore(client, KeySchema("breaker"), stream_maxlen=1000)
    quota.breaker = CircuitBreaker(failures=3, open_s=1.0, clock=lambda: now[0])
    try:
        assert (await quota.settle(_call(quota, "r0")))[0] == 1

        own_redis.stop()
        for i in range(3):  # three real attempts, each failing on its own
            with pytest.raises(StoreUnavailable) as failed:
                await quota.settle(_call(quota, f"down-{i}"))
            assert "circuit open" not in str(failed.value)
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await quota.settle(_call(quota, "while-open"))

        # Redis is back, but the breaker is still open: calls fail at once and Redis sees none.
        own_redis.start()
        now[0] += 0.9
        for i in range(5):
            with pytest.raises(StoreUnavailable, match="circuit open"):
                await quota.settle(_call(quota, f"open-{i}"))
        assert own_redis.script_calls() == 0

        # Open period over: one probe goes through, succeeds, and the breaker closes.
        now[0] += 0.2
        assert (await quota.settle(_call(quota, "probe")))[0] == 1
        assert own_redis.script_calls() >= 1
        for i in range(5):  # closed: every call reaches Redis, no clock change needed
            assert (await quota.settle(_call(quota, f"closed-{i}")))[0] == 1
        assert own_redis.script_calls() >= 6

        # A probe that fails reopens the breaker at once, without N new failures.
        own_redis.stop()
        for i in range(3):
            with pytest.raises(StoreUnavailable):
                await quota.settle(_call(quota, f"again-{i}"))
        now[0] += 1.1
        with pytest.raises(StoreUnavailable) as probe:
            await quota.settle(_call(quota, "failed-probe"))
        assert "circuit open" not in str(probe.value)  # the probe really tried Redis
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await quota.settle(_call(quota, "reopened"))
    finally:
        await client.aclose()


async def test_background_calls_do_not_trip_the_breaker(own_redis: OwnRedis) -> None:
    """Settlement replay and sweeping use the background client: their failures during an
    outage must not open the breaker that protects the request path."""
    client = connect(own_redis.url, 0.2)
    quota = QuotaStore(client, KeySchema("breaker-bg"), stream_maxlen=1000)
    try:
        own_redis.stop()
        for i in range(5):
            with pytest.raises(StoreUnavailable):
                await quota.settle(_call(quota, f"bg-{i}"), background=True)
        own_redis.start()
        assert (await quota.settle(_call(quota, "request-path")))[0] == 1
    finally:
        await client.aclose()


async def test_a_cluster_clients_leaked_transport_errors_count_as_redis_down(
    redis_cluster_url: str,
) -> None:
    """A Cluster client used by many requests at once before it learned the topology (Redis was
    down when the worker started) fails some of them with the transport's AttributeError
    (redis-py 8.1, redis/redis-py#4287). They must reach the request path as `StoreUnavailable`
    (fail open/closed, journal, breaker), never as an unexpected error (a 500 and a traceback)."""
    client = connect(redis_cluster_url, 2.0)  # deliberately not `ready()`
    quota = QuotaStore(client, KeySchema("leak-" + uuid.uuid4().hex[:8]), stream_maxlen=1000)
    quota.breaker = CircuitBreaker(failures=1_000, open_s=1.0)
    try:
        results = await asyncio.gather(
            *(quota.settle(_call(quota, f"burst-{i}")) for i in range(32)),
            return_exceptions=True)
    finally:
        await client.aclose()
    unexpected = [r for r in results if isinstance(r, BaseException)
                  and not isinstance(r, StoreUnavailable)]
    assert unexpected == []
    assert any(not isinstance(r, BaseException) for r in results)  # Redis itself was fine
