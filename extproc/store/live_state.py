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


async def _scan(store: Store, pattern: str, limit: int | None = None) -> list[str]:
    # Every Tollgate key shares one hash tag, so on a Cluster they all live on one node; a
    # standalone SCAN covers them. The patterns are built from validated names (no glob chars).
    # `limit` stops after that many keys (the dashboard's bound on one refresh).
    out: list[str] = []
    try:
        async for key in store.redis.scan_iter(match=pattern, count=500):
            out.append(key.decode() if isinstance(key, bytes) else str(key))
            if limit is not None and len(out) >= limit:
                break
    except REDIS_DOWN as exc:
        raise StoreUnavailable(str(exc)) from exc
    return out


async def cooldowns(store: Store, upstream_id: str, now_ms: int | None = None) -> list[Cooldown]:
    """Credentials of an upstream resting now, per model, and until when."""
    return [c for _upstream, c in await _cooldowns(
        store, store.keys.cooldown(upstream_id, "", "")[:-1], now_ms)]


async def all_cooldowns(store: Store, now_ms: int | None = None, limit: int | None = None
                        ) -> list[tuple[str, Cooldown]]:
    """(upstream id, cooldown) for every credential resting now, of every upstream, in one
    SCAN (upstream ids have no colon)."""
    return await _cooldowns(store, f"{store.keys.prefix}cool:", now_ms, limit)


async def _cooldowns(store: Store, prefix: str, now_ms: int | None, limit: int | None = None
                     ) -> list[tuple[str, Cooldown]]:
    """Cooldown keys under `prefix` (".../cool:" or ".../cool:<upstream>:") with their TTLs."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    keys = await _scan(store, prefix + "*", limit)
    if not keys:
        return []
    try:
        async with store.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(key)
            ttls = await pipe.execute()
    except REDIS_DOWN as exc:
        raise StoreUnavailable(str(exc)) from exc
    whole = f"{store.keys.prefix}cool:"
    out = []
    for key, ttl in zip(keys, ttls, strict=True):
        upstream, _, rest = key[len(whole):].partition(":")
        credential, _, model = rest.partition(":")
        if int(ttl) > 0:
            out.append((upstream, Cooldown(credential, model, now_ms + int(ttl))))
    return sorted(out, key=lambda uc: (uc[0], uc[1].credential, uc[1].model))


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
    pressure = (await rate_pressure(store, {rate_limit_id: window_ms}, now_ms, top=1)
                )[rate_limit_id]
    if not pressure.busiest:
        return RateUsage(0, "", 0, 0, pressure.in_flight)
    top = pressure.busiest[0]
    return RateUsage(pressure.identities, top.identity, top.requests, top.tokens,
                     pressure.in_flight)


@dataclass(frozen=True, slots=True)
class IdentityUsage:
    identity: str
    requests: int  # over the rate limit's current rolling window
    tokens: int


@dataclass(frozen=True, slots=True)
class RatePressure:
    """How hard a rate limit is pressed now: its busiest identities and the leases in flight."""

    identities: int  # identities with traffic in the window
    busiest: tuple[IdentityUsage, ...]  # busiest first (requests, then tokens)
    in_flight: int  # concurrency leases held now, over every identity
    truncated: bool = False  # the scan stopped at its key bound: numbers are a lower bound


async def rate_pressure(store: Store, windows: dict[str, int], now_ms: int | None = None,
                        top: int = 5, limit: int | None = None) -> dict[str, RatePressure]:
    """Per rate limit id (mapped to its window, ms): the `top` busiest identities of its
    current rolling window and the leases in flight. One SCAN per key family whatever the
    number of rate limits (ids have no colon, so a key names its rate limit up to the first
    one). Hashes of a window the RateLimit had before a change are not counted."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    head_w, head_c = f"{store.keys.prefix}rl:", f"{store.keys.prefix}cc:"
    if len(windows) == 1:  # the operator's status of one resource: a narrow pattern
        (only,) = windows
        found = await _scan(store, f"{head_w}{only}:*", limit)
        leases = await _scan(store, f"{head_c}{only}:*", limit)
    else:
        found = await _scan(store, head_w + "*", limit)
        leases = await _scan(store, head_c + "*", limit)
    truncated = limit is not None and (len(found) >= limit or len(leases) >= limit)
    try:
        async with store.redis.pipeline(transaction=False) as pipe:
            for key in found:
                pipe.hgetall(key)
            for key in leases:
                pipe.zcount(key, now_ms, "+inf")
            replies: list[Any] = await pipe.execute()
    except REDIS_DOWN as exc:
        raise StoreUnavailable(str(exc)) from exc
    suffixes = {rl: {store.keys.window("", "", metric, ms).rpartition(":")[2]: metric
                     for metric in ("requests", "tokens")} for rl, ms in windows.items()}
    usage: dict[str, dict[str, dict[str, int]]] = {i: {} for i in windows}
    for key, buckets in zip(found, replies[: len(found)], strict=True):
        rate_limit, _, rest = key[len(head_w):].partition(":")
        ident, _, short = rest.rpartition(":")
        metric = suffixes.get(rate_limit, {}).get(short)
        if metric is None:
            continue  # another rate limit's, or a window this one had before a change
        width, count = window_buckets(windows[rate_limit])
        current = now_ms // width
        total = sum(int(v) for b, v in buckets.items() if int(b) >= current - count)
        if total:
            usage[rate_limit].setdefault(ident, {})[metric] = total
    in_flight = dict.fromkeys(windows, 0)
    for key, count_ in zip(leases, replies[len(found):], strict=True):
        rate_limit = key[len(head_c):].partition(":")[0]
        if rate_limit in in_flight:
            in_flight[rate_limit] += int(count_)
    out = {}
    for rate_limit, by_ident in usage.items():
        ranked = sorted(by_ident.items(), key=lambda kv: (
            -kv[1].get("requests", 0), -kv[1].get("tokens", 0), kv[0]))
        out[rate_limit] = RatePressure(
            len(by_ident),
            tuple(IdentityUsage(i, m.get("requests", 0), m.get("tokens", 0))
                  for i, m in ranked[:top]),
            in_flight[rate_limit], truncated)
    return out


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
