"""Reads the live state the gateway keeps in Redis, for people: limit spend, rate-limit windows,
credential cooldowns. Used by `tollgate get` and by the operator's status write-back, so both
show the same numbers, read one way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from extproc.core.periods import period_bounds
from extproc.core.quota import WINDOW_MS, window_buckets
from extproc.core.reports import LimitReport, limit_report
from extproc.core.resources import Resource, limit_spec
from extproc.store.redis_store import REDIS_DOWN, Store, StoreUnavailable


async def limit_reports(
    store: Store, limits: list[Resource], now: float | None = None
) -> list[LimitReport]:
    """One report per Limit resource, for the period that contains `now`."""
    now = time.time() if now is None else now
    specs = [limit_spec(r) for r in limits]
    periods = [period_bounds(s.period, s.time_zone, now)[0] for s in specs]
    counters = await store.limit_states(
        [(s.name, p) for s, p in zip(specs, periods, strict=True)]
    )
    return [limit_report(s, p, c) for s, p, c in zip(specs, periods, counters, strict=True)]


@dataclass(frozen=True, slots=True)
class Cooldown:
    credential: str
    model: str
    until_ms: int  # unix ms


async def _scan(store: Store, pattern: str) -> list[str]:
    # Every Tollgate key shares one hash tag, so on a Cluster they all live on one node; a
    # standalone SCAN covers them. The patterns are built from validated names (no glob chars).
    out = []
    try:
        async for key in store.redis.scan_iter(match=pattern, count=500):
            out.append(key.decode() if isinstance(key, bytes) else str(key))
    except REDIS_DOWN as exc:
        raise StoreUnavailable(str(exc)) from exc
    return out


async def cooldowns(store: Store, upstream_id: str, now_ms: int | None = None) -> list[Cooldown]:
    """Credentials of an upstream resting now, per model, and until when."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    prefix = store.keys.cooldown(upstream_id, "", "")[:-1]  # ".../cool:<upstream>:"
    keys = await _scan(store, prefix + "*")
    if not keys:
        return []
    try:
        async with store.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(key)
            ttls = await pipe.execute()
    except REDIS_DOWN as exc:
        raise StoreUnavailable(str(exc)) from exc
    out = []
    for key, ttl in zip(keys, ttls, strict=True):
        credential, _, model = key[len(prefix):].partition(":")
        if int(ttl) > 0:
            out.append(Cooldown(credential, model, now_ms + int(ttl)))
    return sorted(out, key=lambda c: (c.credential, c.model))


@dataclass(frozen=True, slots=True)
class RateUsage:
    """The busiest identity of a rate limit over the current rolling window."""

    identities: int  # identities with traffic in the window
    busiest: str
    requests: int
    tokens: int
    in_flight: int  # concurrency leases held now, over every identity


async def rate_usage(store: Store, rate_limit_id: str, now_ms: int | None = None,
                     window_ms: int = WINDOW_MS) -> RateUsage:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    suffixes = {store.keys.window("", "", metric, window_ms).rpartition(":")[2]: metric
                for metric in ("requests", "tokens")}
    window_prefix = store.keys.window(rate_limit_id, "", "requests")[: -len(":rpm")]
    lease_prefix = store.keys.leases(rate_limit_id, "")
    windows = await _scan(store, window_prefix + "*")
    leases = await _scan(store, lease_prefix + "*")
    try:
        async with store.redis.pipeline(transaction=False) as pipe:
            for key in windows:
                pipe.hgetall(key)
            for key in leases:
                pipe.zcount(key, now_ms, "+inf")
            replies: list[Any] = await pipe.execute()
    except REDIS_DOWN as exc:
        raise StoreUnavailable(str(exc)) from exc
    width, count = window_buckets(window_ms)
    current = now_ms // width
    usage: dict[str, dict[str, int]] = {}
    for key, buckets in zip(windows, replies[: len(windows)], strict=True):
        ident, _, short = key[len(window_prefix):].rpartition(":")
        metric = suffixes.get(short)
        if metric is None:
            continue  # a hash of the window the RateLimit had before a change
        total = sum(int(v) for b, v in buckets.items() if int(b) >= current - count)
        if total:
            usage.setdefault(ident, {})[metric] = total
    in_flight = sum(int(n) for n in replies[len(windows):])
    if not usage:
        return RateUsage(0, "", 0, 0, in_flight)
    busiest = max(usage, key=lambda i: (usage[i].get("requests", 0), usage[i].get("tokens", 0)))
    return RateUsage(len(usage), busiest, usage[busiest].get("requests", 0),
                     usage[busiest].get("tokens", 0), in_flight)


def utc_day(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))


async def policy_hits(store: Store, policy_ids: list[str],
                      now: float | None = None) -> list[dict[str, int]]:
    """Per Policy id: today's (UTC) requests acted on, by `<action>` and `<rule>:<action>`."""
    day = utc_day(now)
    try:
        async with store.redis.pipeline(transaction=False) as pipe:
            for policy in policy_ids:
                pipe.hgetall(store.keys.policy_hits(policy, day))
            replies = await pipe.execute()
    except REDIS_DOWN as exc:
        raise StoreUnavailable(str(exc)) from exc
    return [{(k.decode() if isinstance(k, bytes) else str(k)): int(v)
             for k, v in reply.items()} for reply in replies]
