"""The settler's safety nets against a real Redis: the sweeper settles holds nobody settled at
their estimate and removes them; a settlement Redis refuses is set aside (dead-lettered) instead
of being retried forever or blocking the settlements queued behind it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from extproc.core.quota import LimitSpec, ReservationPlan, Selector, Subject, plan_reservation
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import free_port
from extproc.server import metrics
from extproc.server.settlement import Settler
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore, SettleCall
from extproc.store.redis_store import Store, connect
from tests.conftest import OwnRedis

pytestmark = pytest.mark.redis

SUBJECT = Subject(key="k", group="", user="", tags=(), model="gpt-4o", ip="")
BUDGET = LimitSpec(name="budget", block=True, max_nanos=10_000_000,
                   threshold_nanos=10_000_000, period="none", time_zone="UTC", strict=True,
                   fail_open=False, selector=Selector())


@pytest.fixture
async def quota(redis_url: str, tag: str) -> AsyncIterator[QuotaStore]:
    client = connect(redis_url, 2.0)
    yield QuotaStore(client, KeySchema(tag), stream_maxlen=10_000)
    await client.aclose()


def _plan(now: float, estimate: int = 2_000_000, hold_s: float = 1.0) -> ReservationPlan:
    return plan_reservation(request_id=uuid.uuid4().hex, now=now, limits=[BUDGET],
                            rate_limits=[], subject=SUBJECT, estimate_nanos=estimate,
                            estimate_tokens=100, hold_seconds=hold_s)


def _event(rid: str) -> bytes:
    return usage_pb2.UsageEvent(request_id=rid, key="k").SerializeToString()


async def _budget(quota: QuotaStore) -> tuple[int, int]:
    state = await quota.redis.hgetall(quota.keys.limit_state("budget", "all"))
    return int(state.get(b"spent", 0)), int(state.get(b"held", 0))


async def _usage_ids(quota: QuotaStore, count: int = 100) -> list[str]:
    entries = await Store(quota.redis, quota.keys).read_usage(count)
    return [usage_pb2.UsageEvent.FromString(raw).request_id for _, raw in entries]


def _rejected_ids(settler: Settler) -> list[str]:
    if not settler.dead_path.exists():
        return []
    return [SettleCall.from_json(line).request_id
            for line in settler.dead_path.read_bytes().splitlines()]


async def test_sweeper_settles_an_expired_hold_at_its_estimate(
    quota: QuotaStore, tmp_path: Path
) -> None:
    settler = Settler(quota, str(tmp_path))
    live = _plan(time.time(), estimate=1_000_000, hold_s=600)  # still within its deadline
    lost = _plan(time.time() - 5, estimate=2_000_000, hold_s=1)  # its stream vanished
    for plan in (live, lost):
        await quota.reserve(plan, _event(plan.request_id))
    assert await _budget(quota) == (0, 3_000_000)

    sweeper = asyncio.create_task(settler.sweep(interval_s=0.02))
    try:
        deadline = time.monotonic() + 5
        while await _budget(quota) != (2_000_000, 1_000_000):
            assert time.monotonic() < deadline, "the sweeper never settled the lost hold"
            await asyncio.sleep(0.02)
    finally:
        sweeper.cancel()
    # Charged at the estimate, its hold released and removed; its usage event written.
    assert await quota.redis.exists(quota.keys.hold(lost.request_id)) == 0
    assert await quota.redis.zscore(quota.keys.holds, lost.request_id) is None
    assert await _usage_ids(quota) == [lost.request_id]
    # The live hold is untouched, and the lost one is not charged twice.
    assert await quota.redis.zscore(quota.keys.holds, live.request_id) is not None
    assert await settler.sweep_once() == 0
    assert await _budget(quota) == (2_000_000, 1_000_000)
    # The real settlement arriving late changes nothing: the estimate was already charged.
    late = quota.settle_call(lost, 10, 1, _event(lost.request_id), confirmed=True)
    assert (await quota.settle(late))[0] == 0
    assert await _budget(quota) == (2_000_000, 1_000_000)


def _refused(call: SettleCall) -> SettleCall:
    """The same call with a cost Redis cannot take (as a hand-edited or corrupted journal line
    would carry): the settle script validates its arguments and refuses it with an error."""
    args = list(call.args)
    args[2] = "twelve dollars"
    return SettleCall(call.keys, tuple(args))


async def test_a_settlement_redis_refuses_is_dead_lettered(
    quota: QuotaStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settler = Settler(quota, str(tmp_path))
    plan = _plan(time.time(), hold_s=600)
    await quota.reserve(plan, _event(plan.request_id))
    good = quota.settle_call(plan, 1_500_000, 10, _event(plan.request_id), confirmed=True)
    bad = _refused(good)
    assert await settler.settle_now(bad) is None
    # The operator is told which request and where it was put.
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert plan.request_id in record.getMessage()
    assert "rejected.jsonl" in record.getMessage()
    # Set aside for an operator, byte for byte; not journaled for endless retries.
    assert settler.dead_path == tmp_path / "rejected.jsonl"
    assert settler.dead_path.read_bytes() == bad.to_json() + b"\n"
    assert settler.pending == 0 and not settler.path.exists()
    assert await _budget(quota) == (0, 2_000_000)  # nothing half applied
    assert (await settler.settle_now(good)) == [1, 1_500_000, 0, 0]


async def test_a_refused_journal_entry_does_not_block_the_ones_behind_it(
    quota: QuotaStore, tmp_path: Path
) -> None:
    """A dead worker's journal holds a call Redis refuses between two good ones: the next
    worker lands the good ones and sets the bad one aside."""
    rids = [f"j-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    calls = [quota.settle_call(None, 10, 1, _event(r), False, request_id=r) for r in rids]
    calls[1] = _refused(calls[1])
    (tmp_path / "journal-999999999.jsonl").write_bytes(
        b"".join(c.to_json() + b"\n" for c in calls))
    settler = Settler(quota, str(tmp_path))
    assert settler.pending == 3
    # Replays use the background client: an open request-path breaker does not stop them.
    quota.breaker.failures, quota.breaker.open_until = 99, time.monotonic() + 3600
    await settler.flush()
    assert settler.pending == 0
    assert await _usage_ids(quota) == [rids[0], rids[2]]
    assert _rejected_ids(settler) == [rids[1]]
    assert settler.path.read_bytes() == b""  # the journal starts afresh


async def test_a_hold_whose_settlement_is_refused_is_set_aside_and_dropped(
    quota: QuotaStore, tmp_path: Path
) -> None:
    settler = Settler(quota, str(tmp_path))
    plan = _plan(time.time() - 5, hold_s=1)
    await quota.reserve(plan, _event(plan.request_id))
    # The hold record is damaged (written by an incompatible version, edited by hand, ...).
    hold_key = quota.keys.hold(plan.request_id)
    record = SettleCall.from_json(await quota.redis.get(hold_key))
    await quota.redis.set(hold_key, _refused(record).to_json())
    assert await settler.sweep_once() == 1
    assert _rejected_ids(settler) == [plan.request_id]
    assert await quota.redis.zscore(quota.keys.holds, plan.request_id) is None
    assert await quota.redis.exists(hold_key) == 0
    assert await settler.sweep_once() == 0  # not retried on every sweep
    assert orjson.loads(settler.dead_path.read_bytes())["args"][2] == "twelve dollars"


async def test_close_flushes_what_is_queued_and_keeps_what_cannot_land(
    quota: QuotaStore, tmp_path: Path
) -> None:
    """On shutdown the settler writes its queued batch; when Redis cannot take it, the calls
    stay in the journal on disk for the next worker."""
    # A fresh machine: the journal folder and its parent do not exist yet.
    settler = Settler(quota, str(tmp_path / "tollgate-journal" / "target"))
    rids = [f"c-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    for rid in rids:
        settler.enqueue(quota.settle_call(None, 10, 1, _event(rid), False, request_id=rid))
    await settler.close(timeout=5)
    assert settler.pending == 0
    assert await _usage_ids(quota) == rids

    nobody = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    offline = QuotaStore(connect(nobody, 0.2), quota.keys, stream_maxlen=10)
    stranded = Settler(offline, str(tmp_path / "offline"))
    errors = metrics.REDIS_ERRORS.labels
    usage_errors, settle_errors = errors("usage")._value.get(), errors("settle")._value.get()
    stranded.enqueue(quota.settle_call(None, 10, 1, _event("late"), False, request_id="late"))
    assert await stranded.settle_now(
        quota.settle_call(None, 10, 1, _event("now"), False, request_id="now")) is None
    await stranded.close(timeout=5)
    assert [SettleCall.from_json(line).request_id
            for line in stranded.path.read_bytes().splitlines()] == ["now", "late"]
    # Counted for the dashboards, by what failed.
    assert errors("usage")._value.get() == usage_errors + 1
    assert errors("settle")._value.get() == settle_errors + 1
    await offline.redis.aclose()


async def test_two_flushes_at_once_write_each_settlement_once(
    quota: QuotaStore, tmp_path: Path
) -> None:
    """Shutdown flushes while the background loop may still be mid-flush (a cancellation the
    Redis client swallowed): the two must share the queue, not both write and pop it."""
    settler = Settler(quota, str(tmp_path), max_batch=7)
    rids = [f"f-{i}-{uuid.uuid4().hex[:6]}" for i in range(60)]
    for rid in rids:
        settler.enqueue(quota.settle_call(None, 10, 1, _event(rid), False, request_id=rid))
    await asyncio.gather(settler.flush(), settler.flush(), settler.flush())
    assert settler.pending == 0
    assert sorted(await _usage_ids(quota, 200)) == sorted(rids)


async def test_a_flush_cut_short_keeps_its_calls_and_close_journals_them(
    quota: QuotaStore, tmp_path: Path
) -> None:
    """A flush cancelled while Redis does not answer puts its calls back; a close that runs out
    of time writes the whole queue to the journal on disk, so the next worker settles them."""
    server = OwnRedis(tmp_path / "stalled")
    server.start()
    stalled = QuotaStore(connect(server.url, 5.0), quota.keys, stream_maxlen=10)
    settler = Settler(stalled, str(tmp_path / "journal"))
    rids = [f"s-{i}" for i in range(5)]
    for rid in rids:
        settler.enqueue(quota.settle_call(None, 10, 1, _event(rid), False, request_id=rid))
    await stalled.redis.ping()  # connected before the stall
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # our own redis-server, by PID: nothing answers
    try:
        flushing = asyncio.create_task(settler.flush())
        await asyncio.sleep(0.2)
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing
        assert len(settler.batch) == 5  # nothing lost by the cancellation
        await settler.close(timeout=0.3)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        await stalled.redis.aclose()
        server.stop()
    journaled = [SettleCall.from_json(line).request_id
                 for line in settler.path.read_bytes().splitlines()]
    assert journaled == rids


def _swept_total() -> float:
    return float(metrics.HOLDS_SWEPT._value.get())


async def test_sweeping_by_the_given_clock_past_a_damaged_hold_and_without_double_counts(
    quota: QuotaStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settler = Settler(quota, str(tmp_path))
    damaged, lost = _plan(time.time(), hold_s=60), _plan(time.time(), hold_s=61)
    for plan in (damaged, lost):
        await quota.reserve(plan, _event(plan.request_id))
    lost_record = await quota.redis.get(quota.keys.hold(lost.request_id))
    hold_key = quota.keys.hold(damaged.request_id)
    await quota.redis.set(hold_key,
                          _refused(SettleCall.from_json(await quota.redis.get(hold_key))).to_json())
    assert await settler.sweep_once(now_ms=lost.now_ms) == 0  # nothing is due yet
    # The request path's breaker is open (Redis was flaky a moment ago): the sweeper uses its
    # own client and goes on.
    quota.breaker.failures, quota.breaker.open_until = 99, time.monotonic() + 3600
    before = _swept_total()
    # Due by the clock passed in: the damaged hold (due first) is set aside, the next settled.
    assert await settler.sweep_once(now_ms=lost.hold_deadline_ms + 1) == 2
    assert _rejected_ids(settler) == [damaged.request_id]
    assert (await _budget(quota))[0] == 2_000_000  # the lost one, at its estimate
    assert _swept_total() == before + 1
    assert any(r.levelname == "WARNING" and lost.request_id in r.getMessage()
               for r in caplog.records)
    assert any(r.levelname == "ERROR" and "settle.lua: bad" in r.getMessage()
               for r in caplog.records)  # Redis's reason, for the operator
    # Another replica read the same hold before it was settled: its late settle of what it
    # read changes nothing (the hold record, the idempotency marker, is gone), and an index
    # entry left behind is dropped without counting or charging again.
    quota.breaker.failures, quota.breaker.open_until = 0, 0.0  # Redis is fine again
    await quota.settle(SettleCall.from_json(lost_record))
    await quota.redis.zadd(quota.keys.holds, {lost.request_id: lost.hold_deadline_ms})
    assert await settler.sweep_once(now_ms=lost.hold_deadline_ms + 1) == 0
    assert await quota.redis.zscore(quota.keys.holds, lost.request_id) is None
    assert _swept_total() == before + 1
    assert (await _budget(quota))[0] == 2_000_000  # not charged twice


async def test_expired_holds_skip_and_forget_ids_without_a_record(quota: QuotaStore) -> None:
    """A hold settled between the sweeper's two reads (or whose record expired) leaves an id in
    the index with no record: it is skipped and dropped from the index."""
    await quota.redis.zadd(quota.keys.holds, {"ghost": 1})
    assert await quota.expired_holds(now_ms=2) == []
    assert await quota.redis.zcard(quota.keys.holds) == 0


async def test_settle_later_lands_even_after_the_caller_is_gone(
    quota: QuotaStore, tmp_path: Path
) -> None:
    """Used from the `finally` of a cancelled stream: the settlement runs in its own task."""
    settler = Settler(quota, str(tmp_path))
    rid = "later-" + uuid.uuid4().hex[:6]

    async def cancelled_stream() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            settler.settle_later(quota.settle_call(None, 10, 1, _event(rid), False,
                                                   request_id=rid))

    stream = asyncio.create_task(cancelled_stream())
    await asyncio.sleep(0)
    stream.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stream
    await settler.close(timeout=5)
    assert await _usage_ids(quota) == [rid]


async def test_settled_later_calls_do_not_pile_up_in_a_long_running_worker(
    quota: QuotaStore, tmp_path: Path
) -> None:
    """A worker settles cancelled streams with `settle_later` for days: each finished
    settlement must leave the settler's set of running tasks, or memory grows with every
    cancelled stream ever served."""
    settler = Settler(quota, str(tmp_path))
    landed: list[str] = []
    for round_ in range(3):
        rids = [f"later-{round_}-{i}" for i in range(100)]
        for rid in rids:
            settler.settle_later(quota.settle_call(None, 10, 1, _event(rid), False,
                                                   request_id=rid))
        assert settler.in_flight == 100  # started, not finished: they are held on to
        landed += rids

        async def drained() -> None:
            while settler.in_flight:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(drained(), timeout=10)
        assert sorted(await _usage_ids(quota, 1000)) == sorted(landed)


async def test_a_worker_starting_during_an_outage_replays_its_journal_once_redis_is_back(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    """The first flush fails (Redis is down when the worker starts with an adopted journal):
    the settler keeps retrying with backoff and lands everything when Redis returns."""
    client = connect(own_redis.url, 0.2)
    quota = QuotaStore(client, KeySchema("outage-start"), stream_maxlen=100)
    calls = [quota.settle_call(None, 10, 1, _event(r), False, request_id=r) for r in ("a", "b")]
    (tmp_path / "journal-999999998.jsonl").write_bytes(
        b"".join(c.to_json() + b"\n" for c in calls))
    own_redis.stop()
    settler = Settler(quota, str(tmp_path))
    task = asyncio.create_task(settler.run())
    try:
        settler.enqueue(quota.settle_call(None, 10, 1, _event("c"), False, request_id="c"))
        deadline = time.monotonic() + 5
        while metrics.REDIS_ERRORS.labels("usage")._value.get() == 0 or settler.pending < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        own_redis.start()
        while settler.pending:
            assert time.monotonic() < deadline + 10, "the journal was never replayed"
            assert not task.done(), task
            await asyncio.sleep(0.02)
        assert sorted(await _usage_ids(quota)) == ["a", "b", "c"]
    finally:
        task.cancel()
        await client.aclose()


async def test_only_journals_of_dead_workers_are_adopted(
    quota: QuotaStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crashed worker's journal is taken over (even with a torn last line); a live worker's
    journal and files that are not journals are left alone."""
    live = subprocess.Popen(["sleep", "30"])  # stands for a worker still running
    try:
        good = quota.settle_call(None, 10, 1, _event("o1"), False, request_id="o1")
        other = quota.settle_call(None, 10, 1, _event("o2"), False, request_id="o2")
        (tmp_path / "journal-00x.jsonl").write_bytes(good.to_json() + b"\n")  # not a pid
        (tmp_path / f"journal-{live.pid}.jsonl").write_bytes(good.to_json() + b"\n")
        (tmp_path / "journal-999999997.jsonl").write_bytes(
            good.to_json() + b"\n" + b'{"v": 2, "args": []}\n' + other.to_json() + b"\n"
            + b'{"v": 2, "keys": ["tg:{x}:done:o3"], "ar')  # cut off mid-write by the crash
        settler = Settler(quota, str(tmp_path))
        assert [c.request_id for c in settler.journal] == ["o1", "o2"]
        assert live.poll() is None  # checking whether a worker lives must not hurt it
        assert (tmp_path / f"journal-{live.pid}.jsonl").exists()
        assert (tmp_path / "journal-00x.jsonl").exists()
        assert not (tmp_path / "journal-999999997.jsonl").exists()
        assert any("adopted 2 unwritten settlements from journal-999999997.jsonl"
                   in r.getMessage() for r in caplog.records)
    finally:
        live.kill()
        live.wait()
