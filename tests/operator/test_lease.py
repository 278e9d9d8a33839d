"""The operator's one-writer lease against a real Redis: two contenders, expiry and takeover,
renewal, and a holder that loses it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc.launch import start_redis
from extproc.store.keyschema import KeySchema
from extproc.store.lease import RedisLease
from extproc.store.redis_store import connect

pytestmark = pytest.mark.redis


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_url, timeout_s=2)
    yield c
    await c.aclose()


def lease_key(tag: str) -> str:
    return KeySchema(tag).operator_lease


async def test_only_one_contender_holds_the_lease(client: aioredis.Redis, tag: str) -> None:
    first = RedisLease(client, lease_key(tag), "replica-a", ttl_s=5)
    second = RedisLease(client, lease_key(tag), "replica-b", ttl_s=5)
    assert await first.try_acquire()
    assert first.held
    assert not await second.try_acquire()
    assert not await second.acquire(poll_s=0.05, timeout_s=0.3)
    assert not second.held
    assert await client.get(lease_key(tag)) == b"replica-a"
    # The holder asking again keeps it (a restart of the same replica's startup handler).
    assert await first.try_acquire()
    await first.release()
    assert await second.acquire(poll_s=0.05, timeout_s=2)
    assert await client.get(lease_key(tag)) == b"replica-b"


async def test_a_crashed_holder_is_replaced_once_its_lease_expires(
    client: aioredis.Redis, tag: str
) -> None:
    crashed = RedisLease(client, lease_key(tag), "replica-a", ttl_s=0.3)
    waiting = RedisLease(client, lease_key(tag), "replica-b", ttl_s=0.3)
    assert await crashed.try_acquire()
    # replica-a stops renewing (it died); replica-b waits and takes over after the expiry.
    assert await waiting.acquire(poll_s=0.05, timeout_s=5)
    assert await client.get(lease_key(tag)) == b"replica-b"
    # The old holder cannot extend or delete its successor's lease.
    assert not await crashed.renew()
    assert not crashed.held
    await crashed.release()
    assert await client.get(lease_key(tag)) == b"replica-b"


async def test_renewal_keeps_the_lease_past_its_ttl(client: aioredis.Redis, tag: str) -> None:
    holder = RedisLease(client, lease_key(tag), "replica-a", ttl_s=0.3)
    rival = RedisLease(client, lease_key(tag), "replica-b", ttl_s=0.3)
    assert await holder.try_acquire()
    lost: list[bool] = []
    keeper = asyncio.create_task(holder.keep(on_lost=lambda: lost.append(True)))
    try:
        # Several lease times pass; the rival never gets in while renewals run.
        assert not await rival.acquire(poll_s=0.05, timeout_s=1.2)
        assert holder.held and not lost
    finally:
        keeper.cancel()
    assert await rival.acquire(poll_s=0.05, timeout_s=5)  # no renewals: it expires


async def test_a_holder_whose_lease_was_taken_stops(client: aioredis.Redis, tag: str) -> None:
    holder = RedisLease(client, lease_key(tag), "replica-a", ttl_s=1)
    assert await holder.try_acquire()
    lost = asyncio.Event()
    keeper = asyncio.create_task(holder.keep(on_lost=lost.set, every_s=0.05))
    # Someone else now owns the key (e.g. this replica was paused past its lease time).
    await client.set(lease_key(tag), "replica-b", px=5000)
    await asyncio.wait_for(lost.wait(), timeout=5)
    await asyncio.wait_for(keeper, timeout=1)  # the keeper returns after reporting the loss
    assert not holder.held
    assert await client.get(lease_key(tag)) == b"replica-b"


async def test_a_holder_that_cannot_reach_redis_gives_up_after_its_lease_time(
    tag: str, tmp_path: Path
) -> None:
    # Its own Redis, so that stopping it does not disturb the other tests.
    proc, url = start_redis(tmp_path, prefer_embedded=False)
    client = connect(url, timeout_s=0.2)
    try:
        holder = RedisLease(client, lease_key(tag), "replica-a", ttl_s=0.5)
        assert await holder.try_acquire()
        lost = asyncio.Event()
        keeper = asyncio.create_task(holder.keep(on_lost=lost.set, every_s=0.05))
        proc.stop()  # Redis gone: renewals fail; the lease may expire there, so stop writing
        await asyncio.wait_for(lost.wait(), timeout=10)
        await asyncio.wait_for(keeper, timeout=1)
        assert not holder.held
    finally:
        await client.aclose()
        proc.stop()


