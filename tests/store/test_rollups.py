"""Hourly usage rollups written by the settle script, against a real Redis (standalone and
cluster), and `tollgate usage --by ...` reading them: totals match what was settled, a replayed
or cancelled settlement adds nothing, and every output format carries the same numbers."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from extproc.core.quota import LimitSpec, Selector, Subject, plan_reservation
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import connect, ready
from extproc.store.rollup import HOUR_MS

pytestmark = pytest.mark.redis

NOW = datetime.now(UTC).timestamp()
SUBJECT = Subject(key="k", group="g", user="u", tags=(), model="m", ip="10.0.0.1")


def event(key: str, model: str, cost: int, tin: int, tout: int, *, tags: tuple[str, ...] = (),
          use_case: str = "", ts_ms: int | None = None) -> bytes:
    return usage_pb2.UsageEvent(
        request_id=uuid.uuid4().hex, key=key, user=f"user-{key}", group="team", model=model,
        upstream="openai", tags=list(tags), use_case_name=use_case,
        tokens=usage_pb2.TokenCounts(input=tin, output=tout),
        cost=usage_pb2.Cost(total_nanos=cost),
        timestamp_ms=ts_ms if ts_ms is not None else int(NOW * 1000)).SerializeToString()


def budget(name: str) -> LimitSpec:
    return LimitSpec(name=name, block=False, max_nanos=10**15, threshold_nanos=10**15,
                     period="month", time_zone="UTC", strict=False, fail_open=False,
                     selector=Selector())


@pytest.fixture
async def quota(any_redis_url: str, tag: str) -> AsyncIterator[QuotaStore]:
    client = connect(any_redis_url, 2.0)
    await ready(client)
    yield QuotaStore(client, KeySchema(tag), stream_maxlen=10_000)
    await client.aclose()


async def settle(quota: QuotaStore, ev: bytes, cost: int, limits: list[LimitSpec],
                 *, cancel: bool = False) -> None:
    plan = plan_reservation(request_id=uuid.uuid4().hex, now=NOW, limits=limits,
                            rate_limits=[], subject=SUBJECT, estimate_nanos=cost,
                            estimate_tokens=0, hold_seconds=60, credentials=[])
    await quota.reserve(plan, ev)
    call = quota.settle_call(plan, cost, 0, ev, confirmed=True, now_ms=plan.now_ms,
                             cancel=cancel)
    await quota.settle(call)
    await quota.settle(call)  # a replay (journal, sweeper) is not counted twice


async def totals(quota: QuotaStore, by: tuple[str, ...]) -> dict[tuple[str, ...], list[int]]:
    from extproc.store.redis_store import Store
    from extproc.store.rollup import aggregate

    hour = int(NOW * 1000) // HOUR_MS
    store = Store(quota.redis, quota.keys)
    report = aggregate(await store.read_rollups([hour - 1, hour, hour + 1]), by)
    return {g: [t.cost_nanos, t.requests, t.input_tokens, t.output_tokens]
            for g, t in report.groups.items()}


async def test_settled_requests_roll_up_by_any_dimension(quota: QuotaStore) -> None:
    team, alice = budget("team-budget"), budget("alice-cap")
    await settle(quota, event("a", "gpt-4o", 1_000, 10, 20, tags=("ci", "nightly"),
                              use_case="triage"), 1_000, [team, alice])
    await settle(quota, event("a", "gpt-4o-mini", 300, 5, 1), 300, [team])
    await settle(quota, event("b", "gpt-4o", 7_000, 100, 200, tags=("ci",)), 7_000, [])
    await settle(quota, event("b", "gpt-4o", 9_999, 1, 1), 9_999, [team], cancel=True)
    # A request without a plan (no limits applied) is rolled up too.
    ev = event("c", "claude", 50, 2, 3)
    await quota.settle(quota.settle_call(None, 50, 5, ev, confirmed=False,
                                         request_id=uuid.uuid4().hex))
    assert await totals(quota, ()) == {(): [8_350, 4, 117, 224]}
    assert await totals(quota, ("key",)) == {
        ("a",): [1_300, 2, 15, 21], ("b",): [7_000, 1, 100, 200], ("c",): [50, 1, 2, 3]}
    assert await totals(quota, ("model", "key")) == {
        ("gpt-4o", "a"): [1_000, 1, 10, 20], ("gpt-4o-mini", "a"): [300, 1, 5, 1],
        ("gpt-4o", "b"): [7_000, 1, 100, 200], ("claude", "c"): [50, 1, 2, 3]}
    # Multi-valued dimensions: a request counts under each of its tags / limits.
    assert await totals(quota, ("tag",)) == {
        ("ci",): [8_000, 2, 110, 220], ("nightly",): [1_000, 1, 10, 20], ("-",): [350, 2, 7, 4]}
    assert await totals(quota, ("limit",)) == {
        ("team-budget",): [1_300, 2, 15, 21], ("alice-cap",): [1_000, 1, 10, 20],
        ("-",): [7_050, 2, 102, 203]}
    assert (await totals(quota, ("use_case", "user")))[("triage", "user-a")][0] == 1_000


async def test_batched_settlements_roll_up_once_each(quota: QuotaStore) -> None:
    plans = []
    for i in range(5):
        ev = event(f"k{i % 2}", "gpt-4o", 100 * (i + 1), 1, 1)
        plans.append(quota.settle_call(None, 100 * (i + 1), 2, ev, confirmed=False,
                                       request_id=f"r{i}"))
    await quota.settle_many(plans)
    await quota.settle_many(plans)  # replayed whole after a failure part way
    assert await totals(quota, ("key",)) == {("k0",): [900, 3, 3, 3], ("k1",): [600, 2, 2, 2]}


async def test_an_hour_is_kept_by_its_event_time_and_expires(quota: QuotaStore) -> None:
    earlier = int(NOW * 1000) - 30 * 24 * HOUR_MS  # an ingested call from a month ago
    ev = event("old", "gpt-4o", 5, 1, 1, ts_ms=earlier)
    await quota.settle(quota.settle_call(None, 5, 2, ev, confirmed=False, request_id="old-1"))
    key = quota.keys.rollup(earlier // HOUR_MS)
    assert await quota.redis.hget(key, b"c" + json.dumps(
        ["old", "user-old", "team", "gpt-4o", "openai", [], "", []],
        separators=(",", ":")).encode()) == b"5"
    assert await quota.redis.pttl(key) > 0


def cli(redis_url: str, tag: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(REDIS_URL=redis_url, TOLLGATE_REDIS_TAG=tag)
    return subprocess.run([sys.executable, "-m", "extproc", "usage", *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_usage_report_from_the_command_line(redis_url: str, tag: str) -> None:
    client = connect(redis_url, 2.0)
    quota = QuotaStore(client, KeySchema(tag), stream_maxlen=10_000)
    for key, model, cost in (("a", "gpt-4o", 1_500_000), ("a", "gpt-4o", 500_000),
                             ("b", "claude", 250_000)):
        ev = event(key, model, cost, 10, 5)
        await quota.settle(quota.settle_call(None, cost, 15, ev, confirmed=False,
                                             request_id=uuid.uuid4().hex))
    await client.aclose()

    as_json = cli(redis_url, tag, "--by", "model,key", "--since", "1d", "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [
        {"model": "gpt-4o", "key": "a", "requests": 2, "cost_usd": "0.002000000",
         "cost_nanos": 2_000_000, "input_tokens": 20, "output_tokens": 10, "tokens": 30},
        {"model": "claude", "key": "b", "requests": 1, "cost_usd": "0.000250000",
         "cost_nanos": 250_000, "input_tokens": 10, "output_tokens": 5, "tokens": 15}]
    rows = list(csv.DictReader(io.StringIO(cli(redis_url, tag, "--by", "key", "-o",
                                                "csv").stdout)))
    assert [(r["key"], r["cost_nanos"], r["requests"]) for r in rows] == [
        ("a", "2000000", "2"), ("b", "250000", "1")]
    table = cli(redis_url, tag, "--by", "upstream", "-o", "table").stdout.splitlines()
    assert table[0].split() == ["UPSTREAM", "REQUESTS", "COST_USD", "INPUT_TOKENS",
                                "OUTPUT_TOKENS", "TOKENS"]
    assert table[1].split() == ["openai", "3", "0.002250000", "30", "15", "45"]
    # A range that holds none of it, and the raw events still listed as before.
    past = cli(redis_url, tag, "--from", "2020-01-01", "--to", "2020-01-02", "-o", "table")
    assert past.stdout.strip() == "no usage in this range"
    assert len(cli(redis_url, tag, "--count", "2").stdout.splitlines()) == 2


@pytest.mark.parametrize(("args", "message"), [
    (("--by", "colour"), "unknown dimension 'colour'"),
    (("--since", "7x"), "--since"),
    (("--since", "1d", "--from", "2026-01-01"), "cannot be combined"),
    (("--from", "yesterday"), "ISO 8601"),
    (("--from", "2026-02-01", "--to", "2026-01-01"), "not before its end"),
    (("-o", "csv"), "-o csv is for reports"),
])
def test_bad_report_options_are_refused_clearly(redis_url: str, tag: str,
                                                args: tuple[str, ...], message: str) -> None:
    result = cli(redis_url, tag, *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
