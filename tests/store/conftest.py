"""Fixtures and helpers of the store tier."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from extproc.core.quota import Reservation, ReservationPlan, interpret_reservation
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import connect, ready


@pytest.fixture
async def quota(any_redis_url: str, tag: str) -> AsyncIterator[QuotaStore]:
    """A QuotaStore on this test's own key tag, against a standalone Redis and a Cluster."""
    client = connect(any_redis_url, 2.0)
    await ready(client)
    yield QuotaStore(client, KeySchema(tag), stream_maxlen=10_000)
    await client.aclose()


async def reserve(quota: QuotaStore, plan: ReservationPlan, event: bytes = b"") -> Reservation:
    """Run the reserve script for `plan` and read its reply as the request path does."""
    return interpret_reservation(plan, await quota.reserve(plan, event))
