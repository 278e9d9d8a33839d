"""The per-replica limiter that rate limits fail open to while Redis is unreachable
(`LocalWindows`) decides like the Redis windows of reserve.lua: same buckets, same rolling sum,
same refusals, for any sequence of requests and token amounts on one replica. (With N replicas
the local limiter admits up to N times the limit during an outage; that bound is documented on
`LocalWindows` and is not exercised here.)"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.core.quota import (
    BUCKET_MS,
    WINDOW_MS,
    LocalWindows,
    RateLimitSpec,
    Selector,
    Subject,
    plan_reservation,
)
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import connect
from tests.store.conftest import reserve

pytestmark = pytest.mark.redis

SUBJECT = Subject(key="k", group="", user="", tags=(), model="m", ip="")
START = 1_800_000_000.0

# (milliseconds since the previous request, tokens it asks for); gaps near the bucket and
# window edges are drawn often, where an off-by-one bucket would show.
GAPS = st.one_of(st.integers(0, 3 * BUCKET_MS),
                 st.sampled_from([BUCKET_MS, WINDOW_MS - BUCKET_MS, WINDOW_MS, WINDOW_MS + 1,
                                  WINDOW_MS + BUCKET_MS - 1, WINDOW_MS + BUCKET_MS]))
STEPS = st.lists(st.tuples(GAPS, st.integers(0, 700)), min_size=1, max_size=40)


async def decisions(redis_url: str, limits: list[RateLimitSpec],
                    steps: list[tuple[int, int]]) -> tuple[list[bool], list[bool]]:
    client = connect(redis_url, 2.0)
    quota = QuotaStore(client, KeySchema("prop-" + uuid.uuid4().hex[:10]), stream_maxlen=100)
    local = LocalWindows()
    shared, alone = [], []
    now_ms = START * 1000
    try:
        for gap_ms, tokens in steps:
            now_ms += gap_ms
            plan = plan_reservation(
                request_id=uuid.uuid4().hex, now=now_ms / 1000, limits=[], rate_limits=limits,
                subject=SUBJECT, estimate_nanos=0, estimate_tokens=tokens, hold_seconds=600)
            shared.append((await reserve(quota, plan)).denial is None)
            alone.append(local.admit(plan) is None)
    finally:
        await client.aclose()
    return shared, alone


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rpm=st.integers(1, 8), tpm=st.one_of(st.none(), st.integers(100, 3000)), steps=STEPS)
# The window's far edge: one bucket past 60 s the oldest request still counts, then it leaves.
@example(rpm=1, tpm=None, steps=[(0, 0), (WINDOW_MS + 1, 0), (BUCKET_MS, 0)])
@example(rpm=1, tpm=None, steps=[(2_500, 0), (WINDOW_MS - 1, 0), (BUCKET_MS, 0)])
def test_local_windows_decide_like_the_redis_windows(
    redis_url: str, rpm: int, tpm: int | None, steps: list[tuple[int, int]]
) -> None:
    limits = [RateLimitSpec("rl", "key", Selector(), rpm, tpm, None)]
    shared, alone = asyncio.run(decisions(redis_url, limits, steps))
    assert alone == shared


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window_ms=st.sampled_from([10_000, 3_600_000, 86_400_000]), rpm=st.integers(1, 8),
       tpm=st.one_of(st.none(), st.integers(100, 3000)), steps=STEPS)
def test_local_windows_decide_like_the_redis_windows_of_any_length(
    redis_url: str, window_ms: int, rpm: int, tpm: int | None, steps: list[tuple[int, int]]
) -> None:
    """The same for `window: 10s | 1h | 1d`: the gaps are stretched to the window's length."""
    limits = [RateLimitSpec("rl", "key", Selector(), rpm, tpm, None, window_ms=window_ms)]
    scaled = [(gap * window_ms // WINDOW_MS, tokens) for gap, tokens in steps]
    shared, alone = asyncio.run(decisions(redis_url, limits, scaled))
    assert alone == shared
