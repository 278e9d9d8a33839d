"""Runs reservation plans and settlements against Redis, one script call each.

A settlement travels as a `SettleCall` (script keys + arguments) so that the exact same call can
be made inline, batched, written to the journal when Redis is down and replayed later, or rebuilt
by the sweeper from a hold record. The settle script is idempotent per request id, so replaying a
call that did land is harmless.

A small circuit breaker stops calling Redis for a moment after consecutive failures: when Redis
is down every request would otherwise wait out the socket timeout.

Money is integer nano-dollars (money layout 2, settle layout 3). Layout-1 state (micro-dollars,
`lim:` keys) is folded in by `migrate_money`; layout-1/2 settle calls (old hold records and
journal lines) are upgraded on load by `SettleCall.from_json`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from importlib import resources as importlib_resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from extproc.core.pricing import MAX_AMOUNT_NANOS
from extproc.core.quota import BUCKET_MS, BUCKETS, CredentialCharge, ReservationPlan
from extproc.core.values import value_type
from extproc.store import rollup
from extproc.store.keyschema import KeySchema
from extproc.store.pipelined import PipelinedConnection
from extproc.store.redis_store import (
    REDIS_DOWN,
    StoreRejected,
    StoreUnavailable,
    is_cluster_client,
    pipelined,
)


def _lua(name: str) -> str:
    return importlib_resources.files("extproc.store").joinpath(f"lua/{name}").read_text()


# The settle script's argument layout. Journals and hold records outlive a process, so every
# serialized call says which layout it was written in; older layouts are upgraded on load.
# 3: nano-dollars, `spend:` limit keys, settled sets, marker TTL and cancel arguments.
SETTLE_LAYOUT = 3

# Settled sets (see settle.lua and KeySchema): one per bucket of this width. Unconfirmed sets
# are bucketed by the time the request was planned, so that every settle call and the reserve
# of one request name the same set.
SETTLED_BUCKET_MS = 60_000
UNCONFIRMED_BUCKET_MS = 3_600_000
RETRY_TRIED_MS = 600_000  # how long a request's tried credentials are remembered
# How long an unconfirmed settlement is remembered. Requests with no plan only write a usage
# event: a replay later than this (a journal line whose first attempt did land) could add the
# event twice, nothing else. Plans settled without a confirmed hold (Redis did not answer the
# reserve) change money, and are rare (outages only): remembered for 48 h.
USAGE_MARKER_MS = 600_000
UNCONFIRMED_MARKER_MS = 172_800_000
_LEGACY_SCALE = 1000  # layout 1 was micro-dollars


def _exact(n: int) -> int:
    """An amount (nano-dollars or tokens) as the scripts can take it: Lua numbers are doubles,
    exact to 2**53. Larger ones (only absurd requests, e.g. max_tokens of 1e17) are capped at
    2**53, still more than any Limit's max (validated below it), so a Block limit refuses them
    instead of the script failing half way or JSON refusing the integer."""
    return n if n < _EXACT_CAP else _EXACT_CAP


_EXACT_CAP = MAX_AMOUNT_NANOS + 1


@value_type
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
        # orjson writes the tuples as arrays itself and hands only what it cannot write (the
        # event's bytes) to `_bytes_arg`; a Python pass over the ~30 arguments cost ~5x more.
        return orjson.dumps({"v": SETTLE_LAYOUT, "keys": self.keys, "args": self.args},
                            default=_bytes_arg)

    @classmethod
    def from_json(cls, raw: bytes | str) -> SettleCall:
        doc = orjson.loads(raw)
        args = [base64.b64decode(a["b"]) if isinstance(a, dict) else a for a in doc["args"]]
        keys = list(doc["keys"])
        version = doc.get("v", 1)
        if version == 1:
            # Layout 1 had no "keys to delete" count (ARGV[12]): insert a zero.
            args.insert(11, 0)
        if version < 3:
            keys, args = _upgrade_micro_call(keys, args)
        return cls(tuple(keys), tuple(args))


def _bytes_arg(value: object) -> dict[str, str]:
    """A bytes argument in a settle call's JSON: `{"b": <base64>}` (`SettleCall.from_json`)."""
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode()}
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _upgrade_micro_call(keys: list[str], args: list[Any]) -> tuple[list[str], list[Any]]:
    """A layout-1 or -2 call (micro-dollars, `lim:` keys, a `done:<id>` marker) as a layout-3
    one.

    One with an estimate came from a confirmed reservation (a hold record, or the normal settle
    of one): its hold decides. One without is unconfirmed and gets a settled-set entry."""
    prefix = keys[0][: keys[0].index("}:") + 2]
    schema = KeySchema(prefix[len("tg:{"):-2])
    nl = int(args[6])
    args[2] = int(args[2]) * _LEGACY_SCALE  # actual cost
    args[9] = int(args[9]) * _LEGACY_SCALE  # held estimate
    for i in range(nl):
        args[12 + 3 * i] = int(args[12 + 3 * i]) * _LEGACY_SCALE  # max
        args[13 + 3 * i] = int(args[13 + 3 * i]) * _LEGACY_SCALE  # threshold
    confirmed = int(args[9]) > 0
    planned = confirmed or any(int(n) for n in args[6:9])
    marker = 0 if confirmed else (UNCONFIRMED_MARKER_MS if planned else USAGE_MARKER_MS)
    args[12:12] = [marker, 0]
    now = int(args[1])
    keys[0] = (schema.unconfirmed(now // UNCONFIRMED_BUCKET_MS) if planned
               else schema.settled(now // SETTLED_BUCKET_MS))
    keys[4 : 4 + nl] = [schema.upgrade_limit_key(k) for k in keys[4 : 4 + nl]]
    return keys, args


class CircuitOpen(StoreUnavailable):
    """Redis was not called at all (the breaker is open): nothing can have reached it."""


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
            raise CircuitOpen("circuit open after repeated Redis failures")

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
        self._cluster = is_cluster_client(self.background)  # asked once, not per batch
        # The scripts' own connections (store/pipelined.py); None: redis-py's path (Cluster).
        self._hot = pipelined(client)
        self._slow = pipelined(self.background)
        self._reserve = client.register_script(_lua("reserve.lua"))
        self._settle = client.register_script(_lua("settle.lua"))
        self._cooldown = client.register_script(_lua("cooldown.lua"))
        self._migrate = client.register_script(_lua("migrate.lua"))
        self._retry_pick = client.register_script(_lua("retry_pick.lua"))
        self._first_seen = client.register_script(_lua("first_seen.lua"))

    async def _run(
        self, script: Any, keys: list[str], args: list[Any], background: bool = False
    ) -> list[Any]:
        if background:
            try:
                return list(await self._eval(self._slow, self.background, script, keys, args))
            except ResponseError as exc:
                raise StoreRejected(str(exc)) from exc
            except REDIS_DOWN as exc:
                raise StoreUnavailable(str(exc)) from exc
        self.breaker.check()
        try:
            reply = await self._eval(self._hot, self.redis, script, keys, args)
        except ResponseError as exc:
            raise StoreRejected(str(exc)) from exc
        except REDIS_DOWN as exc:
            self.breaker.failure()
            raise StoreUnavailable(str(exc)) from exc
        self.breaker.success()
        return list(reply)

    @staticmethod
    async def _eval(connection: PipelinedConnection | None, client: aioredis.Redis,
                    script: Any, keys: list[str], args: list[Any]) -> Any:
        if connection is None:
            return await script(keys=keys, args=args, client=client)
        try:
            return await connection.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis lost its script cache (restart, SCRIPT FLUSH): load it and call again, as
            # redis-py's Script does.
            await connection.call("SCRIPT", "LOAD", script.script)
            return await connection.call("EVALSHA", script.sha, len(keys), *keys, *args)

    # -- reserve ---------------------------------------------------------------------------

    def _limit_keys(self, plan: ReservationPlan) -> list[str]:
        return [self.keys.limit_state(c.limit.name, c.period_id) for c in plan.limits]

    def _window_keys(self, plan: ReservationPlan) -> list[str]:
        return [self.keys.window(w.rate_limit, w.ident, w.metric, w.window_ms)
                for w in plan.windows]

    def _lease_keys(self, plan: ReservationPlan) -> list[str]:
        return [self.keys.leases(lease.rate_limit, lease.ident) for lease in plan.leases]

    async def reserve(self, plan: ReservationPlan, base_event: bytes) -> list[int]:
        keys = [
            self.keys.hold(plan.request_id),
            self.keys.holds,
            self.keys.unconfirmed(plan.now_ms // UNCONFIRMED_BUCKET_MS),
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
        expired = self.settle_call(plan, plan.estimate_nanos, plan.estimate_tokens, base_event,
                                   confirmed=True)
        args: list[Any] = [
            plan.request_id,
            plan.now_ms,
            plan.hold_deadline_ms,
            len(plan.limits),
            len(plan.windows),
            len(plan.leases),
            _exact(plan.estimate_nanos),
            0,  # placeholder: the hold payload travels as the second argument
        ]
        for c in plan.limits:
            mode = 0 if not c.limit.block else (1 if c.limit.strict else 2)
            args += [mode, c.limit.max_nanos, c.ttl_ms, 0]
        for w in plan.windows:
            args += [w.limit, _exact(w.amount), *w.buckets]
        for _lease in plan.leases:
            args += [_lease.limit, plan.lease_deadline_ms]
        primaries = sum(1 for c in plan.credentials if c.primary)
        args += [len(plan.credentials), primaries, BUCKET_MS, BUCKETS, _exact(plan.estimate_tokens)]
        for cred in plan.credentials:
            args += [cred.rpm or 0, cred.tpm or 0]
        wire = [orjson.dumps(args), expired.to_json()]
        return [int(v) for v in await self._run(self._reserve, keys, wire)]

    # -- settle ----------------------------------------------------------------------------

    def settle_call(
        self,
        plan: ReservationPlan | None,
        actual_nanos: int,
        actual_tokens: int,
        event: bytes,
        confirmed: bool,
        request_id: str | None = None,
        now_ms: int | None = None,
        credential: CredentialCharge | None = None,
        success: bool = False,
        cancel: bool = False,
        reserve_maybe_ran: bool = True,
    ) -> SettleCall:
        """The settle script call for a request.

        `confirmed`: the reserve script's reply was seen (the hold record exists until the
        first settle). False when the request was admitted without Redis (fail-open) or its
        reserve timed out: then the call still names the plan's estimate, windows and leases,
        and the script releases them only if a hold turns out to exist (a reserve that reached
        Redis late). `cancel`: the request was refused after such a timeout; release only.
        `reserve_maybe_ran` False (unconfirmed because the reserve was never sent: the circuit
        was open): no late reserve can come, so the settlement is remembered only as long as a
        request without limits is (`USAGE_MARKER_MS`), which bounds Redis memory during a long
        outage."""
        rid = request_id or (plan.request_id if plan else "")
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        if plan is None:
            keys = [self.keys.settled(now // SETTLED_BUCKET_MS), self.keys.hold(rid),
                    self.keys.holds, self.keys.usage_stream]
            args: list[Any] = [rid, now, _exact(actual_nanos), _exact(actual_tokens), event,
                               self.stream_maxlen, 0, 0, 0, 0, 0, 0, USAGE_MARKER_MS, 0]
            return SettleCall(tuple(keys), tuple(args))
        token_windows = [self.keys.window(w.rate_limit, w.ident, w.metric, w.window_ms)
                         for w in plan.token_windows]
        # The bucket each window charged its estimate to (widths differ by window).
        buckets = [plan.now_ms // w.buckets[0] for w in plan.token_windows]
        if credential is not None and credential.tpm:
            # The credential's token window was charged the estimate too: correct it as well.
            token_windows.append(
                self.keys.credential_window(credential.upstream, credential.name, "tokens"))
            buckets.append(plan.bucket)
        deletes = []
        if success and credential is not None:
            deletes.append(self.keys.credential_errors(credential.upstream, credential.name))
        leases = self._lease_keys(plan)
        if confirmed or reserve_maybe_ran:
            marker_key = self.keys.unconfirmed(plan.now_ms // UNCONFIRMED_BUCKET_MS)
            marker_ms = 0 if confirmed else UNCONFIRMED_MARKER_MS
        else:
            marker_key = self.keys.settled(now // SETTLED_BUCKET_MS)
            marker_ms = USAGE_MARKER_MS
        keys = [
            marker_key,
            self.keys.hold(rid),
            self.keys.holds,
            self.keys.usage_stream,
            *self._limit_keys(plan),
            *token_windows,
            *leases,
            *deletes,
        ]
        args = [
            rid, now, _exact(actual_nanos), _exact(actual_tokens), event, self.stream_maxlen,
            len(plan.limits), len(token_windows), len(leases),
            _exact(plan.estimate_nanos),
            _exact(plan.estimate_tokens),
            len(deletes),
            marker_ms,
            1 if cancel else 0,
        ]
        for c in plan.limits:
            args += [c.limit.max_nanos, c.limit.threshold_nanos, c.ttl_ms]
        args += buckets
        return SettleCall(tuple(keys), tuple(args))

    async def cool_down(self, credential: CredentialCharge, base_ms: int, max_ms: int,
                        retry_after_ms: int) -> tuple[int, int]:
        """Rest a credential for a model after a failure. Returns (cooldown ms, errors)."""
        keys = [self.keys.cooldown(credential.upstream, credential.name, credential.model),
                self.keys.credential_errors(credential.upstream, credential.name)]
        reply = await self._run(self._cooldown, keys, [base_ms, max_ms, retry_after_ms])
        return int(reply[0]), int(reply[1])

    async def pick_retry(self, request_id: str, candidates: Sequence[CredentialCharge],
                         failed: int, estimate_tokens: int, now_ms: int) -> int:
        """The candidate (0-based index) for the next try after `failed` failed; -1 when every
        one was tried. Charges its request and token windows (retry_pick.lua)."""
        keys = [self.keys.retry_tried(request_id)]
        args: list[Any] = [failed + 1, len(candidates), sum(1 for c in candidates if c.primary),
                           now_ms, BUCKET_MS, BUCKETS, _exact(estimate_tokens), RETRY_TRIED_MS]
        for cred in candidates:
            keys += [self.keys.cooldown(cred.upstream, cred.name, cred.model),
                     self.keys.credential_window(cred.upstream, cred.name, "requests"),
                     self.keys.credential_window(cred.upstream, cred.name, "tokens")]
            args += [cred.rpm or 0, cred.tpm or 0]
        reply = await self._run(self._retry_pick, keys, args)
        return int(reply[0]) - 1

    async def first_seen(self, request_ids: list[str], now_ms: int, ttl_ms: int) -> list[int]:
        """When each ingested event (by request id) was first received, unix ms; records `now_ms`
        for those seen for the first time (kept `ttl_ms`). One round trip."""
        keys = [self.keys.ingest_seen(rid) for rid in request_ids]
        reply = await self._run(self._first_seen, keys, [now_ms, ttl_ms])
        return [int(v) for v in reply]

    def _wire(self, call: SettleCall) -> tuple[list[str], list[bytes]]:
        """Keys and arguments of a settle call, with its hourly rollup (store/rollup.py) added
        on the wire only: journals and hold records keep the settle layout unchanged."""
        extra_keys, extra_args = rollup.wire(call.keys, call.args, self.keys)
        return [*call.keys, *extra_keys], [*call.wire_args(), *extra_args]

    async def settle(self, call: SettleCall, background: bool = False) -> list[int]:
        keys, args = self._wire(call)
        reply = await self._run(self._settle, keys, args, background)
        return [int(v) for v in reply]

    async def settle_many(self, calls: list[SettleCall]) -> None:
        """Several settlements in one pipelined round trip. A cluster client refuses scripts in
        a pipeline, so there they go one after the other, in order (off the request path)."""
        if self._cluster:
            for call in calls:
                # A failure part way is safe to replay whole: settlement is idempotent.
                await self.settle(call, background=True)
            return
        wired = [self._wire(call) for call in calls]
        try:
            try:
                await self._settle_pipelined(wired)
            except NoScriptError:
                # Redis lost its script cache (restart, SCRIPT FLUSH): load it and run the
                # batch again; nothing of it ran (every call failed the same way).
                if self._slow is not None:
                    await self._slow.call("SCRIPT", "LOAD", self._settle.script)
                else:
                    await self.background.script_load(self._settle.script)
                await self._settle_pipelined(wired)
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def _settle_pipelined(self, wired: list[tuple[list[str], list[bytes]]]) -> None:
        sha = self._settle.sha
        if self._slow is not None:
            replies = await self._slow.call_many(
                [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in wired])
            for reply in replies:  # the first error, as redis-py's pipeline raises it
                if isinstance(reply, Exception):
                    raise reply
            return
        # EVALSHA directly: a registered Script in a pipeline makes redis-py send SCRIPT EXISTS
        # for it before every batch (Pipeline.load_scripts), a second command per batch.
        async with self.background.pipeline(transaction=False) as pipe:
            for keys, args in wired:
                pipe.evalsha(self._settle.sha, len(keys), *keys, *args)
            await pipe.execute()

    async def drop_hold(self, request_id: str) -> None:
        try:
            await self.background.zrem(self.keys.holds, request_id)
            await self.background.delete(self.keys.hold(request_id))
        except REDIS_DOWN as exc:
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
        except REDIS_DOWN as exc:
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
            except REDIS_DOWN as exc:
                raise StoreUnavailable(str(exc)) from exc
        return calls


    # -- money layout migration --------------------------------------------------------------

    async def migrate_money(self) -> int:
        """Fold every layout-1 limit state (micro-dollars, `lim:` keys) into layout 2
        (nano-dollars, `spend:` keys): amounts times 1,000, request counts added, the longer
        TTL kept, the old key deleted, one key at a time atomically. Safe to run any number of
        times and while replicas serve (what they add meanwhile is added, not overwritten).
        Returns the number of keys migrated."""
        moved = 0
        try:
            async for raw in self.background.scan_iter(match=self.keys.legacy_limit_pattern,
                                                       count=500, _type="hash"):
                old = raw.decode() if isinstance(raw, bytes) else str(raw)
                new = self.keys.upgrade_limit_key(old)
                if new == old:
                    continue
                moved += int(await self._migrate(keys=[old, new], args=[_LEGACY_SCALE],
                                                 client=self.background))
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        return moved
