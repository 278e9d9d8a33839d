"""Runs reservation plans and settlements against Redis, one script call each.

A settlement travels as a `SettleCall` (script keys + arguments) so that the exact same call can
be made inline, batched, written to the journal when Redis is down and replayed later, or rebuilt
by the sweeper from a hold record. The settle script is idempotent per request id, so replaying a
call that did land is harmless.

A small circuit breaker stops calling Redis for a moment after consecutive failures: when Redis
is down every request would otherwise wait out the socket timeout.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources as importlib_resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from extproc.core.quota import BUCKET_MS, BUCKETS, CredentialCharge, ReservationPlan
from extproc.store.keyschema import KeySchema
from extproc.store.redis_store import StoreRejected, StoreUnavailable, is_cluster_client


def _lua(name: str) -> str:
    return importlib_resources.files("extproc.store").joinpath(f"lua/{name}").read_text()


# The settle script's argument layout. Journals and hold records outlive a process, so every
# serialized call says which layout it was written in; older layouts are upgraded on load.
SETTLE_LAYOUT = 2


@dataclass(frozen=True, slots=True)
class SettleCall:
    """One settle script call: its keys and its positional values (see settle.lua). On the wire
    the values travel as ONE JSON argument plus the event bytes: redis-py packs every argument
    in Python, and dozens of small ones cost more than the script itself."""

    keys: tuple[str, ...]
    args: tuple[int | str | bytes, ...]  # positional, item 5 (index 4) the event bytes

    @property
    def request_id(self) -> str:
        return str(self.args[0])

    def wire_args(self) -> list[bytes]:
        values = list(self.args)
        event = values[4]
        values[4] = 0
        return [orjson.dumps(values), event if isinstance(event, bytes) else str(event).encode()]

    def to_json(self) -> bytes:
        args = [
            {"b": base64.b64encode(a).decode()} if isinstance(a, bytes) else a for a in self.args
        ]
        return orjson.dumps({"v": SETTLE_LAYOUT, "keys": list(self.keys), "args": args})

    @classmethod
    def from_json(cls, raw: bytes | str) -> SettleCall:
        doc = orjson.loads(raw)
        args = [base64.b64decode(a["b"]) if isinstance(a, dict) else a for a in doc["args"]]
        if doc.get("v", 1) == 1:
            # Layout 1 had no "keys to delete" count (ARGV[12]): insert a zero.
            args.insert(11, 0)
        return cls(tuple(doc["keys"]), tuple(args))


class CircuitBreaker:
    """Open after `failures` consecutive failures: calls fail at once for `open_s`, then one
    call goes through (half-open); its success closes the breaker, its failure reopens it."""

    def __init__(self, failures: int = 3, open_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.open_s = open_s
        self.clock = clock  # passed in so tests can step through the open period
        self.failures = 0
        self.open_until = 0.0

    def check(self) -> None:
        if self.failures >= self.threshold and self.clock() < self.open_until:
            raise StoreUnavailable("circuit open after repeated Redis failures")

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self.clock() + self.open_s


class QuotaStore:
    def __init__(
        self,
        client: aioredis.Redis,
        schema: KeySchema,
        stream_maxlen: int,
        background: aioredis.Redis | None = None,
    ) -> None:
        # Two clients: `client` for the request path (short timeout, behind the breaker) and
        # `background` for batched settlements, journal replay and sweeping, which may wait
        # longer and must not trip the breaker that protects request latency.
        self.redis = client
        self.background = background or client
        self.keys = schema
        self.stream_maxlen = stream_maxlen
        self.breaker = CircuitBreaker()
        self._reserve = client.register_script(_lua("reserve.lua"))
        self._settle = client.register_script(_lua("settle.lua"))
        self._cooldown = client.register_script(_lua("cooldown.lua"))

    async def _run(
        self, script: Any, keys: list[str], args: list[Any], background: bool = False
    ) -> list[Any]:
        if background:
            try:
                return list(await script(keys=keys, args=args, client=self.background))
            except ResponseError as exc:
                raise StoreRejected(str(exc)) from exc
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(str(exc)) from exc
        self.breaker.check()
        try:
            reply = await script(keys=keys, args=args)
        except ResponseError as exc:
            raise StoreRejected(str(exc)) from exc
        except (RedisError, OSError) as exc:
            self.breaker.failure()
            raise StoreUnavailable(str(exc)) from exc
        self.breaker.success()
        return list(reply)

    # -- reserve ---------------------------------------------------------------------------

    def _limit_keys(self, plan: ReservationPlan) -> list[str]:
        return [self.keys.limit_state(c.limit.name, c.period_id) for c in plan.limits]

    def _window_keys(self, plan: ReservationPlan) -> list[str]:
        return [self.keys.window(w.rate_limit, w.ident, w.metric) for w in plan.windows]

    def _lease_keys(self, plan: ReservationPlan) -> list[str]:
        return [self.keys.leases(lease.rate_limit, lease.ident) for lease in plan.leases]

    async def reserve(self, plan: ReservationPlan, base_event: bytes) -> list[int]:
        keys = [
            self.keys.hold(plan.request_id),
            self.keys.holds,
            *self._limit_keys(plan),
            *self._window_keys(plan),
            *self._lease_keys(plan),
        ]
        if plan.credentials:
            keys.append(self.keys.round_robin(plan.credentials[0].upstream))
            for cred in plan.credentials:
                keys += [
                    self.keys.cooldown(cred.upstream, cred.name, cred.model),
                    self.keys.credential_window(cred.upstream, cred.name, "requests"),
                    self.keys.credential_window(cred.upstream, cred.name, "tokens"),
                ]
        # What the sweeper needs to settle this hold at its estimate if nobody else does.
        expired = self.settle_call(plan, plan.estimate_micros, plan.estimate_tokens, base_event,
                                   reserved=True)
        args: list[Any] = [
            plan.request_id,
            plan.now_ms,
            plan.hold_deadline_ms,
            len(plan.limits),
            len(plan.windows),
            len(plan.leases),
            plan.estimate_micros,
            0,  # placeholder: the hold payload travels as the second argument
        ]
        for c in plan.limits:
            mode = 0 if not c.limit.block else (1 if c.limit.strict else 2)
            args += [mode, c.limit.max_micros, c.ttl_ms, 0]
        for w in plan.windows:
            args += [w.limit, w.amount, BUCKET_MS, BUCKETS]
        for _lease in plan.leases:
            args += [_lease.limit, plan.lease_deadline_ms]
        primaries = sum(1 for c in plan.credentials if c.primary)
        args += [len(plan.credentials), primaries, BUCKET_MS, BUCKETS, plan.estimate_tokens]
        for cred in plan.credentials:
            args += [cred.rpm or 0, cred.tpm or 0]
        wire = [orjson.dumps(args), expired.to_json()]
        return [int(v) for v in await self._run(self._reserve, keys, wire)]

    # -- settle ----------------------------------------------------------------------------

    def settle_call(
        self,
        plan: ReservationPlan | None,
        actual_micros: int,
        actual_tokens: int,
        event: bytes,
        reserved: bool,
        request_id: str | None = None,
        now_ms: int | None = None,
        credential: CredentialCharge | None = None,
        success: bool = False,
    ) -> SettleCall:
        """The settle script call for a request. `reserved` is False when the reservation was
        admitted without Redis (fail-open): then there is no hold and no held amount to release,
        only the actual spend to record."""
        rid = request_id or (plan.request_id if plan else "")
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        if plan is None:
            keys = [self.keys.done(rid), self.keys.hold(rid), self.keys.holds,
                    self.keys.usage_stream]
            args: list[Any] = [rid, now, actual_micros, actual_tokens, event,
                               self.stream_maxlen, 0, 0, 0, 0, 0, 0]
            return SettleCall(tuple(keys), tuple(args))
        token_windows = [self.keys.window(w.rate_limit, w.ident, w.metric)
                         for w in plan.token_windows] if reserved else []
        if reserved and credential is not None and credential.tpm:
            # The credential's token window was charged the estimate too: correct it as well.
            token_windows.append(
                self.keys.credential_window(credential.upstream, credential.name, "tokens"))
        deletes = []
        if success and credential is not None:
            deletes.append(self.keys.credential_errors(credential.upstream, credential.name))
        leases = self._lease_keys(plan) if reserved else []
        keys = [
            self.keys.done(rid),
            self.keys.hold(rid),
            self.keys.holds,
            self.keys.usage_stream,
            *self._limit_keys(plan),
            *token_windows,
            *leases,
            *deletes,
        ]
        args = [
            rid, now, actual_micros, actual_tokens, event, self.stream_maxlen,
            len(plan.limits), len(token_windows), len(leases),
            plan.estimate_micros if reserved else 0,
            plan.estimate_tokens if reserved else 0,
            len(deletes),
        ]
        for c in plan.limits:
            args += [c.limit.max_micros, c.limit.threshold_micros, c.ttl_ms]
        for _w in token_windows:
            args.append(plan.bucket)
        return SettleCall(tuple(keys), tuple(args))

    async def cool_down(self, credential: CredentialCharge, base_ms: int, max_ms: int,
                        retry_after_ms: int) -> tuple[int, int]:
        """Rest a credential for a model after a failure. Returns (cooldown ms, errors)."""
        keys = [self.keys.cooldown(credential.upstream, credential.name, credential.model),
                self.keys.credential_errors(credential.upstream, credential.name)]
        reply = await self._run(self._cooldown, keys, [base_ms, max_ms, retry_after_ms])
        return int(reply[0]), int(reply[1])

    async def settle(self, call: SettleCall, background: bool = False) -> list[int]:
        reply = await self._run(self._settle, list(call.keys), call.wire_args(), background)
        return [int(v) for v in reply]

    async def settle_many(self, calls: list[SettleCall]) -> None:
        """Several settlements in one pipelined round trip. A cluster client refuses scripts in
        a pipeline, so there they go one after the other, in order (off the request path)."""
        if is_cluster_client(self.background):
            for call in calls:
                # A failure part way is safe to replay whole: settlement is idempotent.
                await self.settle(call, background=True)
            return
        try:
            async with self.background.pipeline(transaction=False) as pipe:
                for call in calls:
                    await self._settle(keys=list(call.keys), args=call.wire_args(), client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def drop_hold(self, request_id: str) -> None:
        try:
            await self.background.zrem(self.keys.holds, request_id)
            await self.background.delete(self.keys.hold(request_id))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    # -- sweeping --------------------------------------------------------------------------

    async def expired_holds(self, now_ms: int, count: int = 100) -> list[SettleCall]:
        """Settle calls (at the estimate) for holds whose deadline has passed."""
        try:
            ids = await self.background.zrangebyscore(self.keys.holds, "-inf", now_ms, 0, count)
            if not ids:
                return []
            rids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
            payloads = await self.background.mget([self.keys.hold(r) for r in rids])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        calls = []
        stale = []
        for rid, payload in zip(rids, payloads, strict=True):
            if payload is None:
                stale.append(rid)  # settled between the two reads, or the record expired
            else:
                calls.append(SettleCall.from_json(payload))
        if stale:
            try:
                await self.background.zrem(self.keys.holds, *stale)
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(str(exc)) from exc
        return calls

