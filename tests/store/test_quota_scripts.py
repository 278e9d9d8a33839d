"""The reserve and settle scripts against a real Redis: atomicity under concurrency, idempotent
settlement, hold expiry, period rollover, the rolling-window bound and concurrency leases."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from extproc.core.quota import (
    BUCKET_MS,
    WINDOW_MS,
    CredentialCharge,
    LimitSpec,
    RateLimitSpec,
    Selector,
    Subject,
    interpret_settlement,
    plan_reservation,
    window_buckets,
    window_label,
)
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.store.quota_store import (
    SETTLED_BUCKET_MS,
    USAGE_MARKER_MS,
    QuotaStore,
    SettleCall,
)
from tests.store.conftest import reserve

pytestmark = pytest.mark.redis

SUBJECT = Subject(key="team-a-ci", group="team-a", user="alice", tags=("ci",), model="gpt-4o",
                  ip="10.0.0.1")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()


def limit(name: str = "budget", max_nanos: int = 1_000_000, *, block: bool = True,
          strict: bool = True, period: str = "month", threshold: float = 1.0) -> LimitSpec:
    return LimitSpec(name=name, block=block, max_nanos=max_nanos,
                     threshold_nanos=int(max_nanos * threshold), period=period,
                     time_zone="UTC", strict=strict, fail_open=False, selector=Selector())


def plan(limits: list[LimitSpec] | None = None, rate_limits: list[RateLimitSpec] | None = None,
         *, estimate: int = 100_000, tokens: int = 100, now: float = NOW, hold_s: float = 600,
         credentials: list[CredentialCharge] | None = None):
    return plan_reservation(
        request_id=uuid.uuid4().hex, now=now, limits=limits or [], rate_limits=rate_limits or [],
        subject=SUBJECT, estimate_nanos=estimate, estimate_tokens=tokens, hold_seconds=hold_s,
        credentials=credentials or [],
    )


EVENT = usage_pb2.UsageEvent(key="team-a-ci").SerializeToString()


async def settle(quota: QuotaStore, p, actual: int, tokens: int = 0):  # type: ignore[no-untyped-def]
    call = quota.settle_call(p, actual, tokens, EVENT, confirmed=True, now_ms=p.now_ms)
    return await quota.settle(call)


async def test_concurrent_reservations_never_overspend(quota: QuotaStore) -> None:
    """Waves of 60 concurrent requests against a Block limit. Each admitted request settles at
    a cost anywhere up to its estimate (what a strict estimate bounds), concurrently with the
    next wave's reservations: spend never passes max, and what a request did not use goes back
    to the budget for later ones."""
    rng = random.Random(20261202)
    budget = limit(max_nanos=1_000_000)
    key = quota.keys.limit_state("budget", "month:2026-11")
    charged = admitted_total = refused_total = 0
    pending: list[tuple[Any, int]] = []
    for _wave in range(12):
        plans = [plan([budget], estimate=rng.randint(50_000, 150_000)) for _ in range(60)]
        costs = [(p, rng.choice([0, p.estimate_nanos, rng.randint(0, p.estimate_nanos)]))
                 for p, _ in pending]
        results, _ = await asyncio.gather(
            asyncio.gather(*(reserve(quota, p) for p in plans)),
            asyncio.gather(*(settle(quota, p, cost) for p, cost in costs)),
        )
        charged += sum(cost for _, cost in costs)
        admitted = [p for p, r in zip(plans, results, strict=True) if r.denial is None]
        refused = [r for r in results if r.denial is not None]
        assert all(r.denial.status == 429 and r.blocked_limit == "budget" for r in refused)
        assert all(r.limits[0].state == "blocked" for r in refused)
        admitted_total += len(admitted)
        refused_total += len(refused)
        pending = [(p, 0) for p in admitted]
        state = await quota.redis.hgetall(key)
        spent, held = int(state.get(b"spent", 0)), int(state[b"held"])
        assert spent == charged
        assert held == sum(p.estimate_nanos for p in admitted)
        assert spent + held <= 1_000_000
    # Requests that cost less than their estimate made room: far more than max / largest
    # estimate got through, yet spend stayed within max.
    assert admitted_total > 1_000_000 // 150_000
    assert refused_total > 0
    final = [(p, p.estimate_nanos) for p, _ in pending]  # the last wave costs its full bound
    await asyncio.gather(*(settle(quota, p, cost) for p, cost in final))
    charged += sum(cost for _, cost in final)
    state = await quota.redis.hgetall(key)
    assert int(state[b"spent"]) == charged <= 1_000_000 and int(state[b"held"]) == 0
    assert int(state[b"blocked"]) == refused_total
    # Full (or nearly): a request larger than what is left is refused with the seed's body.
    nxt = await reserve(quota, plan([budget], estimate=1_000_000 - charged + 1))
    assert nxt.denial is not None
    body = nxt.denial.body()
    assert b'"type":"LimitExceeded"' in body and b'"code":429' in body
    assert b'"limit_id":"budget"' in body


async def test_settlement_is_idempotent_and_releases_the_hold(quota: QuotaStore) -> None:
    budget = limit(max_nanos=10_000_000, threshold=0.5)
    p = plan([budget], estimate=3_000_000)
    r = await reserve(quota, p)
    assert r.denial is None and r.limits[0].held_nanos == 3_000_000
    first = await settle(quota, p, 6_000_000)
    second = await settle(quota, p, 6_000_000)
    assert first[0] == 1 and second[0] == 0
    statuses = interpret_settlement(p, first)
    assert statuses[0].spent_nanos == 6_000_000 and statuses[0].held_nanos == 0
    assert statuses[0].state == "exceeded"  # 6 >= 0.5 * 10 and <= 10: exceeded, not blocking
    assert statuses[0].remaining_nanos == 4_000_000
    state = await quota.redis.hgetall(quota.keys.limit_state("budget", "month:2026-11"))
    assert int(state[b"spent"]) == 6_000_000 and int(state[b"exceeded"]) == 1
    assert await quota.redis.xlen(quota.keys.usage_stream) == 1  # one event, not two
    assert await quota.redis.exists(quota.keys.hold(p.request_id)) == 0


async def test_allow_limits_never_refuse_and_report_overrun(quota: QuotaStore) -> None:
    tracker = limit("tracker", max_nanos=1_000, block=False, threshold=0.8)
    p1 = plan([tracker], estimate=5_000)
    assert (await reserve(quota, p1)).denial is None
    statuses = interpret_settlement(p1, await settle(quota, p1, 5_000))
    assert statuses[0].state == "overrun"
    p2 = plan([tracker], estimate=5_000)
    assert (await reserve(quota, p2)).denial is None


async def test_reactive_enforcement_refuses_only_after_overrun(quota: QuotaStore) -> None:
    reactive = limit("reactive", max_nanos=1_000_000, strict=False)
    p1 = plan([reactive], estimate=5_000_000)  # far above max, still admitted: spend <= max
    assert (await reserve(quota, p1)).denial is None
    await settle(quota, p1, 1_000_000)
    at_max = plan([reactive], estimate=1)  # spend == max is not an overrun yet
    assert (await reserve(quota, at_max)).denial is None
    await settle(quota, at_max, 500_000)
    p2 = plan([reactive], estimate=1)
    assert (await reserve(quota, p2)).denial is not None


async def test_expired_holds_are_swept_at_the_estimate(quota: QuotaStore) -> None:
    budget = limit(max_nanos=10_000_000)
    p = plan([budget], estimate=2_000_000, hold_s=1)
    await reserve(quota, p)
    assert await quota.expired_holds(p.now_ms) == []  # deadline not reached
    calls = await quota.expired_holds(p.hold_deadline_ms + 1)
    assert [c.request_id for c in calls] == [p.request_id]
    # The call survives a journal round trip unchanged.
    replayed = SettleCall.from_json(calls[0].to_json())
    assert (await quota.settle(replayed))[0] == 1
    state = await quota.redis.hgetall(quota.keys.limit_state("budget", "month:2026-11"))
    assert int(state[b"spent"]) == 2_000_000 and int(state[b"held"]) == 0
    # The late real settlement is a no-op: the sweeper already charged the estimate.
    assert (await settle(quota, p, 10))[0] == 0
    assert await quota.expired_holds(p.hold_deadline_ms + 1) == []


async def test_a_new_period_starts_from_zero(quota: QuotaStore) -> None:
    monthly = limit("monthly", max_nanos=1_000_000)
    november = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp()
    p1 = plan([monthly], estimate=1_000_000, now=november)
    assert (await reserve(quota, p1)).denial is None
    await settle(quota, p1, 1_000_000)
    assert (await reserve(quota, plan([monthly], estimate=1, now=november))).denial is not None
    december = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC).timestamp()
    r = await reserve(quota, plan([monthly], estimate=1_000_000, now=december))
    assert r.denial is None and r.limits[0].period_id == "month:2026-12"
    assert r.limits[0].spent_nanos == 0
    ttl = await quota.redis.pttl(quota.keys.limit_state("monthly", "month:2026-12"))
    assert ttl > 0  # old periods expire by themselves: no reset job


async def test_rolling_window_never_admits_more_than_the_limit(quota: QuotaStore) -> None:
    """Bursts at a window edge: at most `limit` admitted in ANY rolling 60 s interval."""
    rpm = RateLimitSpec("rpm", "key", Selector(), 10, None, None)
    start = NOW + 0.001
    admitted: list[float] = []
    # Probe every 1.25 s for 3 minutes, 4 requests per probe (bursty).
    t = start
    while t < start + 180:
        for _ in range(4):
            r = await reserve(quota, plan(rate_limits=[rpm], now=t))
            if r.denial is None:
                admitted.append(t)
            else:
                assert r.denial.status == 429
                assert int(dict(r.denial.headers)["retry-after"]) >= 1
        t += 1.25
    for i, first in enumerate(admitted):
        in_window = [x for x in admitted[i:] if x - first < WINDOW_MS / 1000]
        assert len(in_window) <= 10
    # ... and the bound is tight within one bucket: the limit is reached again within
    # 60 s + one bucket of the first burst.
    assert len(admitted) >= 10 * int(180 / (WINDOW_MS / 1000 + BUCKET_MS / 1000))


async def test_token_windows_are_corrected_at_settlement(quota: QuotaStore) -> None:
    tpm = RateLimitSpec("tpm", "key", Selector(), None, 1000, None)
    p1 = plan(rate_limits=[tpm], tokens=900)
    assert (await reserve(quota, p1)).denial is None
    refused = await reserve(quota, plan(rate_limits=[tpm], tokens=200))
    assert refused.denial is not None and refused.denial.code == "rate_limit_exceeded"
    await settle(quota, p1, 0, tokens=100)  # it really used 100 tokens, not 900
    ok = await reserve(quota, plan(rate_limits=[tpm], tokens=200))
    assert ok.denial is None and ok.windows[0].used == 300
    too_big = await reserve(quota, plan(rate_limits=[tpm], tokens=5000))
    assert too_big.denial is not None and "retry-after" not in dict(too_big.denial.headers)


async def test_concurrency_leases_expire(quota: QuotaStore) -> None:
    conc = RateLimitSpec("conc", "key", Selector(), None, None, 2)
    a, b = plan(rate_limits=[conc], hold_s=30), plan(rate_limits=[conc], hold_s=30)
    assert (await reserve(quota, a)).denial is None
    assert (await reserve(quota, b)).denial is None
    c = await reserve(quota, plan(rate_limits=[conc]))
    assert c.denial is not None and "concurrent" in c.denial.message
    await settle(quota, a, 0)  # a finished: its slot is free
    assert (await reserve(quota, plan(rate_limits=[conc], hold_s=30))).denial is None
    # Nobody settles b or the third one: their leases run out and the slots come back.
    later = plan(rate_limits=[conc], now=NOW + 31)
    assert (await reserve(quota, later)).denial is None


_WORKER = r"""
import asyncio, sys, uuid
from extproc.core.quota import LimitSpec, Selector, Subject, plan_reservation
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import connect, ready

async def main(url, tag, n):
    client = connect(url, 5.0)
    await ready(client)
    quota = QuotaStore(client, KeySchema(tag), 1000)
    budget = LimitSpec("shared", True, 1_000_000, 1_000_000, "none", "UTC", True, False,
                       Selector())
    subject = Subject("k", "", "", (), "m", "")
    async def one():
        plan = plan_reservation(request_id=uuid.uuid4().hex, now=1_800_000_000.0,
                                limits=[budget], rate_limits=[], subject=subject,
                                estimate_nanos=40_000, estimate_tokens=1, hold_seconds=60)
        reply = await quota.reserve(plan, b"")
        return reply[0]
    results = await asyncio.gather(*(one() for _ in range(n)))
    print(sum(results))
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes_sharing_one_redis_never_overspend(
    any_redis_url: str, tag: str, quota: QuotaStore
) -> None:
    """Two separate processes, 100 concurrent reservations each, one Block limit that fits
    exactly 25 estimates: exactly 25 are admitted in total."""
    import sys

    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WORKER, any_redis_url, tag, "100",
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), timeout=60) for p in procs]
    admitted = [int(out.decode().strip()) for out, _ in outputs]
    assert sum(admitted) == 25
    state = await quota.redis.hgetall(quota.keys.limit_state("shared", "all"))
    assert int(state[b"held"]) == 25 * 40_000 == 1_000_000
    assert int(state[b"blocked"]) == 175


async def test_settling_an_offline_admission_records_spend_only(quota: QuotaStore) -> None:
    """A request admitted while Redis was down (fail-open) held nothing: its settlement adds
    the spend and leaves `held` alone. (A regression: releasing a zero hold used to send "-0"
    to HINCRBY and abort the script half way.)"""
    tracker = limit("tracker", max_nanos=10_000_000, block=False)
    holder = plan([tracker], estimate=500)
    await reserve(quota, holder)  # someone else's live hold
    offline = plan([tracker], estimate=700)
    call = quota.settle_call(offline, 1234, 10, EVENT, confirmed=False, now_ms=offline.now_ms)
    reply = await quota.settle(SettleCall.from_json(call.to_json()))
    assert reply[0] == 1
    state = await quota.redis.hgetall(quota.keys.limit_state("tracker", "month:2026-11"))
    assert int(state[b"spent"]) == 1234 and int(state[b"held"]) == 500


async def test_settling_an_unconfirmed_admission_corrects_nothing_it_never_charged(
    quota: QuotaStore,
) -> None:
    """A request admitted without a confirmed reservation (Redis down: fail-open, or its
    reserve timed out) charged no token window, took no lease and held no money. Its
    settlement records its spend and its usage event, once, and releases nothing: releasing
    what it assumed it had would hand other requests' live tokens, slots and holds back, and
    the limits would admit more than their max. A reserve of it that reaches Redis after the
    settlement takes nothing either."""
    tracker = limit("tracker", max_nanos=10_000_000, block=False)
    tpm = RateLimitSpec("tpm", "key", Selector(), None, 1000, None)
    conc = RateLimitSpec("conc", "key", Selector(), None, None, 1)
    live = plan([tracker], [tpm, conc], estimate=500, tokens=900)
    assert (await reserve(quota, live)).denial is None  # someone else's live reservation
    state_key = quota.keys.limit_state("tracker", "month:2026-11")
    window_key = quota.keys.window("tpm", live.windows[0].ident, "tokens")
    lease_key = quota.keys.leases("conc", live.leases[0].ident)
    events_before = await quota.redis.xlen(quota.keys.usage_stream)

    unconfirmed = plan([tracker], [tpm, conc], estimate=700, tokens=800)
    call = quota.settle_call(unconfirmed, 1234, 10, EVENT, confirmed=False,
                             now_ms=unconfirmed.now_ms)
    assert (await quota.settle(call))[0] == 1
    assert (await quota.settle(call))[0] == 0  # a replay changes nothing
    state = await quota.redis.hgetall(state_key)
    assert int(state[b"spent"]) == 1234 and int(state[b"held"]) == 500
    assert await quota.redis.xlen(quota.keys.usage_stream) == events_before + 1
    assert int(await quota.redis.hget(window_key, str(live.bucket))) == 900
    assert await quota.redis.zrange(lease_key, 0, -1) == [live.request_id.encode()]
    # The live reservation's tokens and slot still count against new requests.
    assert (await reserve(quota, plan(rate_limits=[tpm], tokens=200))).denial is not None
    assert (await reserve(quota, plan(rate_limits=[conc]))).denial is not None

    # Its reserve arriving late (it had timed out, not failed) is a no-op.
    await quota.reserve(unconfirmed, EVENT)
    state = await quota.redis.hgetall(state_key)
    assert int(state[b"spent"]) == 1234 and int(state[b"held"]) == 500
    assert int(await quota.redis.hget(window_key, str(live.bucket))) == 900
    assert await quota.redis.zrange(lease_key, 0, -1) == [live.request_id.encode()]
    assert await quota.redis.get(quota.keys.hold(unconfirmed.request_id)) is None


async def test_a_usage_only_settlement_is_remembered_for_a_while_then_forgotten(
    quota: QuotaStore,
) -> None:
    """A request without limits, or one admitted while the circuit to Redis was open (no
    reserve was ever sent, so no late one can come), is made idempotent by a set of the minute
    it was settled in, which expires as a whole: by the settlement's own clock when the caller
    gives none. Were the ids kept in a set whose TTL every new request refreshes (one bucket for
    all time), Redis memory would grow with every request ever served."""
    offline = plan([limit("tracker", block=False)])
    before = int(time.time() * 1000) // SETTLED_BUCKET_MS
    calls = {
        "usage-only": quota.settle_call(None, 10, 1, EVENT, False, request_id="usage-only"),
        offline.request_id: quota.settle_call(offline, 10, 1, EVENT, False,
                                              reserve_maybe_ran=False),
    }
    after = int(time.time() * 1000) // SETTLED_BUCKET_MS
    sets = [quota.keys.settled(b) for b in range(before, after + 1)]
    for rid, call in calls.items():
        assert (await quota.settle(call))[0] == 1
        assert (await quota.settle(call))[0] == 0
        holding = [k for k in sets if await quota.redis.sismember(k, rid)]
        assert len(holding) == 1, rid
        assert 0 < await quota.redis.pttl(holding[0]) <= USAGE_MARKER_MS


def cred(name: str, *, tpm: int | None = None, rpm: int | None = None,
         primary: bool = True) -> CredentialCharge:
    return CredentialCharge("pool", name, f"SECRET_{name}", "gpt-4o", primary, rpm, tpm)


async def test_cooldown_doubles_without_retry_after_up_to_the_maximum(quota: QuotaStore) -> None:
    c = cred("c1")
    marker = quota.keys.cooldown("pool", "c1", "gpt-4o")
    applied = []
    for errors in range(1, 7):
        ms, count = await quota.cool_down(c, 1_000, 5_000, 0)
        assert count == errors
        applied.append(ms)
        assert 0 < await quota.redis.pttl(marker) <= ms  # the credential really rests that long
    assert applied == [1_000, 2_000, 4_000, 5_000, 5_000, 5_000]
    # Settling a failed call (the 429 that caused the cooldown) keeps the run of errors.
    failed = plan(credentials=[cred("other")])
    await reserve(quota, failed)
    await quota.settle(quota.settle_call(failed, 0, 0, EVENT, confirmed=True,
                                         now_ms=failed.now_ms, credential=c, success=False))
    assert (await quota.cool_down(c, 1_000, 5_000, 0))[1] == 7
    # The provider's Retry-After is taken as given, and still capped by the maximum.
    assert (await quota.cool_down(c, 1_000, 5_000, 3_000))[0] == 3_000
    assert (await quota.cool_down(c, 1_000, 5_000, 60_000))[0] == 5_000
    # Once the rest is over (the marker expires), a successful call through the credential
    # resets the run of errors: the next failure rests it for the base time again.
    await quota.redis.delete(marker)
    p = plan(credentials=[c])
    assert (await reserve(quota, p)).denial is None
    done = quota.settle_call(p, 0, 0, EVENT, confirmed=True, now_ms=p.now_ms, credential=c,
                             success=True)
    assert (await quota.settle(done))[0] == 1
    assert await quota.cool_down(c, 1_000, 5_000, 0) == (1_000, 1)


async def test_pooled_credentials_respect_their_tokens_per_minute(quota: QuotaStore) -> None:
    pool = [cred("a", tpm=1_000), cred("b", tpm=1_000)]
    first, second = plan(credentials=pool, tokens=600), plan(credentials=pool, tokens=600)
    r1, r2 = await reserve(quota, first), await reserve(quota, second)
    assert r1.credential is not None and r2.credential is not None
    assert {r1.credential.name, r2.credential.name} == {"a", "b"}  # 600 + 600 > 1000: spread
    assert r1.credential_tokens == 600 and r2.credential_tokens == 600
    full = await reserve(quota, plan(credentials=pool, tokens=600))
    assert full.denial is not None and full.denial.status == 503
    assert full.denial.code == "no_credential_available"
    # The first call really used 100 tokens: its credential has room again, the other not.
    call = quota.settle_call(first, 0, 100, EVENT, confirmed=True, now_ms=first.now_ms,
                             credential=r1.credential, success=True)
    await quota.settle(call)
    again = await reserve(quota, plan(credentials=pool, tokens=600))
    assert again.credential == r1.credential and again.credential_tokens == 700
    # A request larger than every cap is never admitted on any credential.
    assert (await reserve(quota, plan(credentials=pool, tokens=1_001))).denial is not None


async def test_settlement_after_a_manual_reset_never_leaves_negative_counts(
    quota: QuotaStore,
) -> None:
    """An operator reset a limit's `held` and a token window while requests were in flight:
    their settlements must not push either below zero, which would admit more than the max."""
    budget = limit(max_nanos=1_000_000)
    tpm = RateLimitSpec("tpm", "key", Selector(), None, 1000, None)
    p = plan([budget], [tpm], estimate=600_000, tokens=900)
    assert (await reserve(quota, p)).denial is None
    state_key = quota.keys.limit_state("budget", "month:2026-11")
    window_key = quota.keys.window("tpm", p.windows[0].ident, "tokens")
    await quota.redis.hset(state_key, "held", 0)
    await quota.redis.hset(window_key, str(p.bucket), 100)
    await settle(quota, p, 100_000, tokens=0)
    assert int(await quota.redis.hget(state_key, "held")) == 0
    assert int(await quota.redis.hget(window_key, str(p.bucket))) == 0
    # The limits still hold at their max: 0.9 USD more fits, 1 µ$ beyond does not.
    assert (await reserve(quota, plan([budget], estimate=900_001))).denial is not None
    full = await reserve(quota, plan(rate_limits=[tpm], tokens=1001))
    assert full.denial is not None


async def test_pooled_credentials_respect_rpm_and_cooldowns_each_on_its_own(
    quota: QuotaStore,
) -> None:
    pool = [cred("a", rpm=1), cred("b", rpm=1), cred("fb", rpm=5, primary=False)]
    # "a" rests after a provider error: the others serve, each within its own cap.
    await quota.cool_down(pool[0], 30_000, 60_000, 0)
    chosen = [(await reserve(quota, plan(credentials=pool))).credential for _ in range(3)]
    assert [c.name if c else None for c in chosen] == ["b", "fb", "fb"]
    # Another model on the same credential is not resting.
    other = [CredentialCharge("pool", "a", "SECRET_a", "gpt-4o-mini", True, 1, None)]
    assert (await reserve(quota, plan(credentials=other))).credential == other[0]


async def test_primaries_take_turns_and_fallbacks_wait_for_them(quota: QuotaStore) -> None:
    pool = [cred("a"), cred("b"), cred("fb", primary=False)]
    chosen = [(await reserve(quota, plan(credentials=pool))).credential for _ in range(4)]
    names = [c.name if c else None for c in chosen]
    assert names in (["a", "b", "a", "b"], ["b", "a", "b", "a"])  # never the fallback


async def test_fallbacks_take_turns_once_the_primaries_are_full(quota: QuotaStore) -> None:
    pool = [cred("a", rpm=1), cred("f1", primary=False), cred("f2", primary=False)]
    chosen = [(await reserve(quota, plan(credentials=pool))).credential for _ in range(5)]
    names = [c.name if c else None for c in chosen]
    assert names[0] == "a"
    assert names[1:] in (["f1", "f2", "f1", "f2"], ["f2", "f1", "f2", "f1"])


@pytest.mark.parametrize("window_ms", [10_000, 3_600_000, 86_400_000])
async def test_windows_other_than_a_minute_never_admit_more_than_the_limit(
    quota: QuotaStore, window_ms: int
) -> None:
    """`window: 10s | 1h | 1d`: at most `limit` in ANY rolling window of that length, the
    limit reached again within one window + one bucket, and the refusal's Retry-After says
    when a slot frees (never a minute's numbers)."""
    width, count = window_buckets(window_ms)
    assert width * count == window_ms
    rl = RateLimitSpec("hourly", "key", Selector(), 5, None, None, window_ms=window_ms)
    step = window_ms / 1000 / 40  # 40 probes per window, 3 probes each
    admitted: list[float] = []
    t = NOW + 0.001
    while t < NOW + 3 * window_ms / 1000:
        for _ in range(3):
            r = await reserve(quota, plan(rate_limits=[rl], now=t))
            if r.denial is None:
                admitted.append(t)
            else:
                assert "per " + window_label(window_ms) in r.denial.message
                retry = int(dict(r.denial.headers)["retry-after"])
                assert 1 <= retry <= window_ms / 1000 + width / 1000
        t += step
    for i, first in enumerate(admitted):
        assert len([x for x in admitted[i:] if x - first < window_ms / 1000]) <= 5
    assert len(admitted) >= 5 * int(3 * window_ms / (window_ms + width))


async def test_a_token_window_of_an_hour_is_corrected_at_settlement(quota: QuotaStore) -> None:
    """The settle script corrects the bucket the estimate went into, in the window's own
    bucket width (5 min for an hour), not the minute's 5 s."""
    hourly = RateLimitSpec("tph", "key", Selector(), None, 1000, None, window_ms=3_600_000)
    p1 = plan(rate_limits=[hourly], tokens=900, now=NOW + 100)
    assert (await reserve(quota, p1)).denial is None
    later = NOW + 100 + 30  # a later 5 s bucket, the same 5 min bucket
    refused = await reserve(quota, plan(rate_limits=[hourly], tokens=200, now=later))
    assert refused.denial is not None and "per 1h" in refused.denial.message
    call = quota.settle_call(p1, 0, 100, EVENT, confirmed=True, now_ms=int(later * 1000))
    await quota.settle(call)
    ok = await reserve(quota, plan(rate_limits=[hourly], tokens=200, now=later))
    assert ok.denial is None and ok.windows[0].used == 300


async def test_changing_a_window_starts_a_new_count(quota: QuotaStore) -> None:
    """A RateLimit moved from 1m to 1h counts in a new hash: the minute's bucket numbers are
    never read as hours."""
    minute = RateLimitSpec("moved", "key", Selector(), 2, None, None)
    hour = RateLimitSpec("moved", "key", Selector(), 2, None, None, window_ms=3_600_000)
    for _ in range(2):
        assert (await reserve(quota, plan(rate_limits=[minute]))).denial is None
    assert (await reserve(quota, plan(rate_limits=[minute]))).denial is not None
    assert (await reserve(quota, plan(rate_limits=[hour]))).denial is None
