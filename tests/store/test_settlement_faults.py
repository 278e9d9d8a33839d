"""Faults between the request path and Redis, against a real Redis: a reserve whose client timed
out may still run later (a stalled Redis executes what it had received), in either order with
the request's settlement or cancel. Whatever the order, nothing stays held, leased or charged
for a refused request; and a settled request leaves no per-request record behind."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from extproc.core.quota import (
    LimitSpec,
    RateLimitSpec,
    ReservationPlan,
    Selector,
    Subject,
    plan_reservation,
)
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.store.quota_store import QuotaStore, SettleCall
from tests.store.conftest import reserve

pytestmark = pytest.mark.redis

SUBJECT = Subject(key="k", group="g", user="u", tags=(), model="gpt-4o", ip="10.0.0.1")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()
EVENT = usage_pb2.UsageEvent(key="k").SerializeToString()
BLOCK = LimitSpec("hard", True, 10_000_000, 10_000_000, "none", "UTC", True, False, Selector())
ALLOW = LimitSpec("soft", False, 10_000_000, 8_000_000, "none", "UTC", True, False, Selector())
CONC = RateLimitSpec("conc", "key", Selector(), None, 100_000, 2)


def plan(estimate: int = 300_000, tokens: int = 100) -> ReservationPlan:
    return plan_reservation(
        request_id=uuid.uuid4().hex, now=NOW, limits=[BLOCK, ALLOW], rate_limits=[CONC],
        subject=SUBJECT, estimate_nanos=estimate, estimate_tokens=tokens, hold_seconds=600,
    )


async def state(quota: QuotaStore) -> dict[str, object]:
    r, k = quota.redis, quota.keys
    out: dict[str, object] = {}
    for name in ("hard", "soft"):
        raw = await r.hgetall(k.limit_state(name, "all"))
        out[name] = {f.decode(): int(v) for f, v in raw.items()}
    out["leases"] = await r.zcard(k.leases("conc", "k"))
    out["holds"] = await r.zcard(k.holds)
    out["events"] = await r.xlen(k.usage_stream)
    tokens = await r.hgetall(k.window("conc", "k", "tokens"))
    out["tokens"] = sum(int(v) for v in tokens.values())
    return out


def cancel(quota: QuotaStore, p: ReservationPlan) -> SettleCall:
    # Journaled on the way (the request path enqueues it while Redis does not answer).
    call = quota.settle_call(p, 0, 0, b"", confirmed=False, cancel=True, now_ms=p.now_ms)
    return SettleCall.from_json(call.to_json())


def offline(quota: QuotaStore, p: ReservationPlan, cost: int, tokens: int) -> SettleCall:
    return quota.settle_call(p, cost, tokens, EVENT, confirmed=False, now_ms=p.now_ms)


async def test_refused_request_whose_reserve_ran_late_is_released_not_charged(
    quota: QuotaStore,
) -> None:
    """Order: the reserve lands (late), then the cancel. Everything it took comes back."""
    other = plan()
    assert (await reserve(quota, other)).denial is None  # someone else's live request
    p = plan()
    assert (await reserve(quota, p)).denial is None  # the late reserve
    assert (await quota.settle(cancel(quota, p)))[0] == 1
    assert await state(quota) == {
        "hard": {"held": 300_000}, "soft": {"held": 300_000},
        "leases": 1, "holds": 1, "events": 0, "tokens": 100,
    }  # exactly the other request's hold, lease and tokens; no spend, no event, no count
    assert (await quota.settle(cancel(quota, p)))[0] == 0  # a journal replay changes nothing
    assert await quota.expired_holds(p.hold_deadline_ms + 1) != []  # only the other one
    calls = await quota.expired_holds(p.hold_deadline_ms + 1)
    assert [c.request_id for c in calls] == [other.request_id]


async def test_cancel_that_lands_first_stops_the_late_reserve(quota: QuotaStore) -> None:
    """Order: the cancel lands, then the stalled reserve runs: it reserves nothing."""
    p = plan()
    assert (await quota.settle(cancel(quota, p)))[0] == 1
    late = await reserve(quota, p)
    assert late.denial is not None and late.denial.status == 503
    assert await state(quota) == {"hard": {}, "soft": {}, "leases": 0, "holds": 0,
                                  "events": 0, "tokens": 0}
    assert await quota.redis.exists(quota.keys.hold(p.request_id)) == 0


async def test_offline_admission_whose_reserve_ran_late_releases_hold_and_lease(
    quota: QuotaStore,
) -> None:
    """An Allow-only request admitted while the reserve timed out, whose reserve then ran:
    its settlement charges the real cost once and releases the hold it finds (without this,
    `held` stayed up forever and the lease for the whole hold window)."""
    p = plan()
    assert (await reserve(quota, p)).denial is None  # ran late
    call = SettleCall.from_json(offline(quota, p, 123_456, 40).to_json())
    assert (await quota.settle(call))[0] == 1
    after = await state(quota)
    assert after["hard"] == after["soft"] == {"held": 0, "spent": 123_456, "ok": 1}
    assert (after["leases"], after["holds"], after["events"], after["tokens"]) == (0, 0, 1, 40)
    assert (await quota.settle(call))[0] == 0  # replayed from the journal: nothing twice
    assert await state(quota) == after
    assert await quota.expired_holds(p.hold_deadline_ms + 1) == []  # the sweeper has nothing


async def test_offline_settlement_that_lands_first_stops_the_late_reserve(
    quota: QuotaStore,
) -> None:
    p = plan()
    assert (await quota.settle(offline(quota, p, 5_000, 10)))[0] == 1
    assert (await reserve(quota, p)).denial is not None
    after = await state(quota)
    assert after["hard"] == {"spent": 5_000, "ok": 1}  # charged once, nothing held
    assert (after["leases"], after["holds"], after["events"]) == (0, 0, 1)


async def test_confirmed_settlement_keeps_no_record_per_request(quota: QuotaStore) -> None:
    """Settled requests with a confirmed hold leave no key behind: their idempotency comes from
    the hold record that the first settlement deletes. Requests without limits leave one member
    of a per-minute set that expires as a whole. The hourly usage rollup is one hash per hour,
    not a key per request."""
    for _ in range(20):
        p = plan()
        assert (await reserve(quota, p)).denial is None
        call = quota.settle_call(p, 1000, 50, EVENT, confirmed=True, now_ms=p.now_ms)
        assert (await quota.settle(call))[0] == 1
        assert (await quota.settle(call))[0] == 0
    for i in range(20):
        call = quota.settle_call(None, 7, 1, EVENT, False, request_id=f"{i:032x}",
                                 now_ms=int(NOW * 1000))
        assert (await quota.settle(call))[0] == 1
        assert (await quota.settle(call))[0] == 0
    keys = sorted([k.decode() async for k in quota.redis.scan_iter(
        match=f"{quota.keys.prefix}*")])
    p = quota.keys.prefix
    settled = quota.keys.settled(int(NOW * 1000) // 60_000)
    assert keys == sorted([
        f"{p}spend:hard:all", f"{p}spend:soft:all", f"{p}usage", f"{p}rl:conc:k:tpm", settled,
        quota.keys.rollup(int(NOW * 1000) // 3_600_000),
    ])
    assert await quota.redis.scard(settled) == 20
    assert 0 < await quota.redis.pttl(settled) <= 600_000
    after = await state(quota)
    assert after["hard"] == {"held": 0, "spent": 20_000, "ok": 20}
    assert after["events"] == 40


async def test_large_amounts_are_exact_in_redis(quota: QuotaStore) -> None:
    """Lua prints numbers with 14 significant digits: amounts of $100,000 and more (1e14 n$,
    e.g. an adversarial max_tokens on an Allow-only request) must still reach HINCRBY as exact
    integers, not as "3e+14"."""
    tracker = LimitSpec("big", False, 2**53 - 1, 2**53 - 1, "none", "UTC", True, False,
                        Selector())
    p = plan_reservation(request_id=uuid.uuid4().hex, now=NOW, limits=[tracker],
                         rate_limits=[], subject=SUBJECT, estimate_nanos=300_000_000_000_123,
                         estimate_tokens=1, hold_seconds=60)
    assert (await reserve(quota, p)).denial is None
    key = quota.keys.limit_state("big", "all")
    assert int(await quota.redis.hget(key, "held")) == 300_000_000_000_123
    call = quota.settle_call(p, 200_000_000_000_077, 1, EVENT, confirmed=True, now_ms=p.now_ms)
    assert (await quota.settle(call))[0] == 1
    state = await quota.redis.hgetall(key)
    assert int(state[b"spent"]) == 200_000_000_000_077 and int(state[b"held"]) == 0
    # Beyond what the scripts compare exactly (2**53 n$, ~$9M): a Block limit refuses.
    huge = plan_reservation(request_id=uuid.uuid4().hex, now=NOW, limits=[
        LimitSpec("cap", True, 2**53 - 1, 2**53 - 1, "none", "UTC", True, False, Selector())],
        rate_limits=[], subject=SUBJECT, estimate_nanos=10**20, estimate_tokens=1,
        hold_seconds=60)
    assert (await reserve(quota, huge)).denial is not None


async def test_offline_admission_without_a_sent_reserve_is_remembered_briefly(
    quota: QuotaStore,
) -> None:
    """During a long outage the circuit is open and no reserve is sent: no late reserve can
    come, so such settlements are remembered 10 minutes (not 48 h), bounding Redis memory."""
    p = plan()
    call = quota.settle_call(p, 2_000, 5, EVENT, confirmed=False, now_ms=p.now_ms,
                             reserve_maybe_ran=False)
    assert (await quota.settle(call))[0] == 1
    assert (await quota.settle(call))[0] == 0  # a replay: nothing twice
    after = await state(quota)
    assert after["hard"] == after["soft"] == {"spent": 2_000, "ok": 1}
    assert 0 < await quota.redis.pttl(call.keys[0]) <= 600_000
    assert await quota.redis.exists(quota.keys.unconfirmed(p.now_ms // 3_600_000)) == 0
