"""Ingest retries against a real Redis: an event without `event_timestamp`, retried hours later
(a different clock hour, so a different settled set if it were planned at its arrival), is
recorded once; the first-seen record keeps the 48 h window (first_seen.lua, server/ingest.py)."""

from __future__ import annotations

import time

import pytest
import yaml

from extproc.core.ingest import (
    RETRY_WINDOW_S,
    IngestEvent,
    PricedEvent,
    first_seen,
    parse_event,
    price_event,
)
from extproc.core.resources import KeyRecord, key_record, validate_documents
from extproc.core.snapshot import Snapshot, build_snapshot
from extproc.server.state import builtin_resources
from extproc.store.quota_store import QuotaStore

pytestmark = pytest.mark.redis

DOCS = """\
apiVersion: tollgate.io/v1alpha1
kind: VirtualKey
metadata: {name: reporter}
spec: {keySha256: "%s"}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: reported}
spec: {type: Allow, max: 10, period: month, selector: {keys: [reporter]}}
""" % ("ab" * 32)
BODY = {"category": "system.openai", "resource": "gpt-4o",
        "units": {"text": {"input": 1000, "output": 100}}}  # $0.0035, no event_timestamp
COST = 3_500_000
HOUR = 3600.0
# 00:10 UTC on 2026-12-09: the retries below (up to 47 h later) stay in the month's period.
ARRIVAL = 1_796_868_600.0 - 1_796_868_600.0 % 86_400 + 600.0
PERIOD = time.strftime("month:%Y-%m", time.gmtime(ARRIVAL))
RESOURCES = validate_documents(yaml.safe_load_all(DOCS))
KEY: KeyRecord = key_record(next(r for r in RESOURCES if r.kind == "VirtualKey"))


def snapshot() -> Snapshot:
    return build_snapshot(1, builtin_resources(), RESOURCES, lambda _name: None)


async def ingest_once(quota: QuotaStore, snap: Snapshot, arrival: float,
                      use_first_seen: bool = True) -> bool:
    """One ingest of BODY arriving at `arrival`, as answer_ingest records it; True when it was
    recorded, False when the settle script called it a duplicate."""
    event = parse_event(BODY, KEY.name, arrival)
    assert isinstance(event, IngestEvent) and not event.timed
    if use_first_seen:
        (first_ms,) = await quota.first_seen([event.request_id], int(arrival * 1000),
                                             RETRY_WINDOW_S * 1000)
        event = first_seen(event, first_ms)
    priced = price_event(event, KEY, snap, 600.0)
    assert isinstance(priced, PricedEvent)
    reply = await quota.settle(quota.settle_call(
        priced.plan, priced.cost.total_nanos, event.usage.total, b"", confirmed=False,
        request_id=event.request_id))
    return reply[0] == 1


async def spent(quota: QuotaStore) -> int:
    return int(await quota.redis.hget(quota.keys.limit_state("reported", PERIOD), "spent") or 0)


async def test_a_retry_hours_later_is_recorded_once(quota: QuotaStore) -> None:
    snap = snapshot()
    assert await ingest_once(quota, snap, ARRIVAL) is True
    assert await spent(quota) == COST
    for later in (5 * HOUR, 30 * HOUR, 47 * HOUR):  # other clock hours, other days
        assert await ingest_once(quota, snap, ARRIVAL + later) is False
    assert await spent(quota) == COST
    # The first-seen record lasts the retry window, and no longer.
    event = parse_event(BODY, KEY.name, ARRIVAL)
    assert isinstance(event, IngestEvent)
    ttl = await quota.redis.pttl(quota.keys.ingest_seen(event.request_id))
    assert 0 < ttl <= RETRY_WINDOW_S * 1000


async def test_without_the_first_seen_time_a_later_retry_counted_twice(
    quota: QuotaStore,
) -> None:
    """What the first-seen record fixes: planned at its own arrival, the retry of an event
    without a timestamp lands in another hour's settled set and is recorded again."""
    snap = snapshot()
    assert await ingest_once(quota, snap, ARRIVAL, use_first_seen=False) is True
    assert await ingest_once(quota, snap, ARRIVAL + 5 * HOUR, use_first_seen=False) is True
    assert await spent(quota) == 2 * COST
