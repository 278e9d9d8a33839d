"""The ext_proc servicer: one gRPC stream per HTTP request, driven through `core.exchange`.

This is glue: decode a message (adapter), ask the core, do the I/O the core cannot (key lookups
on a snapshot miss, the reserve and settle scripts), encode the answer (adapter). At most two
Redis round trips per allowed request (reserve, settle) and one per refused one; none at all for
a request no limit applies to (its usage event is written in a batch, off the request path).

A bug in a request phase becomes a clean JSON 500 for that request, never a broken stream; a bug
in a response phase lets the response through (and is logged), because the upstream call already
happened. However a stream ends, an admitted request is settled: normally in its response phase,
else from the `finally` below, in a task that the stream's cancellation cannot interrupt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.core.decisions import Continue, Decision, Deny, HeaderEdit
from extproc.core.exchange import (
    LOGGED_BYTES,
    MAX_RETRIES_HEADER,
    REQUEST_ID_HEADER,
    TRY_HEADER,
    Exchange,
    Options,
    Reply,
    Reserve,
    Settlement,
)
from extproc.core.header_budget import HeaderTally
from extproc.core.ingest import Ingest
from extproc.core.keys import find_key
from extproc.core.pricing import format_nanos, nanos_to_micros
from extproc.core.quota import (
    LimitStatus,
    LocalWindows,
    Reservation,
    interpret_reservation,
    project_settlement,
)
from extproc.core.request import classify_path
from extproc.core.snapshot import Snapshot
from extproc.envoyconf import (
    FAILED_ROLE_METADATA,
    FAILOVER_HEADER,
    METADATA_NAMESPACE,
    OBSERVE_ROLE_METADATA,
    TRY_ROLE_METADATA,
)
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.server import adapter, logs, metrics, tracing
from extproc.server.admission import LoopLag
from extproc.server.annotations import annotate_event
from extproc.server.failover import FailoverBoard, Live
from extproc.server.ingest import answer_ingest
from extproc.server.ingest import refuse as ingest_refuse
from extproc.server.moderation import ModerationClient
from extproc.server.observer import ObserverBoard
from extproc.server.policy_hits import PolicyHitRecorder
from extproc.server.retry import TryHandler
from extproc.server.settlement import Settler
from extproc.server.state import ConfigWatcher, KeyDirectory
from extproc.store.quota_store import CircuitOpen, QuotaStore, SettleCall
from extproc.store.redis_store import StoreRejected, StoreUnavailable

log = logging.getLogger(__name__)

_PHASES = (
    "request_headers",
    "request_body",
    "response_headers",
    "response_body",
    "request_trailers",
    "response_trailers",
)
_PHASE_TIMERS = {phase: metrics.PHASE_SECONDS.labels(phase) for phase in _PHASES}


def cost_message(input_nanos: int, output_nanos: int) -> usage_pb2.Cost:
    """The event's cost: nano-dollars, plus the deprecated micro-dollar fields for readers
    written before nano-dollars (rounded half up)."""
    total = input_nanos + output_nanos
    return usage_pb2.Cost(
        input_nanos=input_nanos, output_nanos=output_nanos, total_nanos=total,
        input_micros=nanos_to_micros(input_nanos), output_micros=nanos_to_micros(output_nanos),
        total_micros=nanos_to_micros(total),
    )


def new_request_id() -> str:
    return os.urandom(16).hex()


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        watcher: ConfigWatcher,
        keys: KeyDirectory,
        quota: QuotaStore,
        settler: Settler,
        options: Options,
        policy_hits: PolicyHitRecorder | None = None,
        max_pending: int = 0,
        lag: LoopLag | None = None,
        moderation: ModerationClient | None = None,
    ) -> None:
        self.watcher = watcher
        self.moderation = moderation or ModerationClient()
        self.keys = keys
        self.quota = quota
        self.settler = settler
        self.options = options
        self.policy_hits = policy_hits
        self.local = LocalWindows()
        self.warned_no_address = False
        # Admission control: requests between their first message and the reply to their
        # request body (the phases that cost CPU and a Redis round trip). Streams waiting for
        # the upstream are not counted: an LLM call may legitimately last minutes. 0 = no bound.
        # Sized from measured capacity (docs/performance.md); a slow upload holds its slot
        # until Envoy's request timeout (60 s).
        self.max_pending = max_pending
        self.pending = 0
        self.streams = 0  # requests this worker has seen (/readyz: how the load splits)
        # And while the event loop runs late, new requests would only queue into Envoy's
        # message timeout: refused too (see admission.py).
        self.lag = lag
        # Calls with a backup Upstream, for a failover after their last failed try.
        self.failover = FailoverBoard(release=self._release_failed)
        self.tries = TryHandler(watcher, quota, self.failover)
        # Passthrough streams, from the listener's stream to the observer's (server/observer.py).
        self.observers = ObserverBoard(unclaimed=self._unobserved)

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        if context is not None:
            metadata = context.invocation_metadata()
            if TRY_ROLE_METADATA in metadata:
                # A retried try, from the cluster's upstream filter (server/retry.py).
                async for response in self.tries.process(request_iterator):
                    yield response
                return
            if FAILED_ROLE_METADATA in metadata:
                # The answer of a try that failed (server/retry.py).
                async for response in self.tries.observe_failure(request_iterator):
                    yield response
                return
            if OBSERVE_ROLE_METADATA in metadata:
                # A passthrough stream's copy (server/observer.py): Envoy waits for no reply.
                await self._observe(request_iterator)
                return
        self.streams += 1
        exchange = Exchange(new_request_id(), self.options)
        started = time.monotonic()
        snapshot = self.watcher.snapshot  # one snapshot for the whole request
        answered: tuple[int, str] | None = None  # (status, details) when Tollgate answered
        counted = False  # this stream is one of self.pending
        owner = object()  # this stream, for the failover board
        resumed = False  # a failover's re-run of a call (server/failover.py)
        try:
            async for request in request_iterator:
                phase = request.WhichOneof("request")
                t0 = time.perf_counter()
                if phase == "request_headers" and (self.max_pending or self.lag):
                    if ((self.max_pending and self.pending >= self.max_pending)
                            or (self.lag is not None and self.lag.overloaded)):
                        response = self._shed(request, exchange)
                        answered = (503, response.immediate_response.details)
                        yield response
                        return
                    self.pending += 1
                    counted = True
                live = self._resumed(request) if (
                    phase == "request_headers" and self.failover.handed) else None
                if live is not None:
                    exchange, resumed = live.exchange, True
                    response = self._resume_headers(request, exchange)
                elif resumed and phase == "request_body":
                    response = await self._resume_body(exchange, started)
                elif tracing.enabled():
                    with tracing.span(f"ext_proc.{phase}", {"tollgate.request_id":
                                                            exchange.request_id}):
                        response = await self._handle(phase, request, exchange, snapshot,
                                                      started)
                else:  # no span name or attributes built per message while tracing is off
                    response = await self._handle(phase, request, exchange, snapshot, started)
                if phase == "request_body" and exchange.backups and exchange.admitted and \
                        exchange.credential is not None and not exchange.offline:
                    self.failover.register(exchange, owner, started)
                metrics.observe(_PHASE_TIMERS[phase], time.perf_counter() - t0)
                if response.HasField("immediate_response"):
                    immediate = response.immediate_response
                    answered = (immediate.status.code, immediate.details)
                if counted and (phase != "request_headers" or answered is not None
                                or request.request_headers.end_of_stream):
                    counted = False  # the request phases are over
                    self.pending -= 1
                yield response
        except asyncio.CancelledError:
            # Envoy cancels streams at request end unless graceful close is on: a normal end.
            pass
        finally:
            if counted:
                self.pending -= 1
            # A call that moved on to a failover's re-run stream is settled and logged there;
            # a passthrough stream's, by its observer (or the board, if none comes).
            if not self.failover.leave(exchange, owner) and not exchange.passthrough:
                self._finish(exchange, answered, started)

    def _finish(self, exchange: Exchange, answered: tuple[int, str] | None,
                started: float) -> None:
        due = exchange.settlement_on_abort()
        if due is not None:
            self.settler.settle_later(self._settle_call(exchange, due, started))
        if exchange.path != "/" or answered is not None:  # a request, not an empty stream
            self._access(exchange, answered, started)
        if exchange.policy_hits and self.policy_hits is not None:
            self.policy_hits.record(exchange.policy_hits)
        if exchange.logged is not None and self.policy_hits is not None:
            self.policy_hits.log_bodies(self._body_log_entry(exchange))

    async def _observe(self, requests: AsyncIterator[ep.ProcessingRequest]) -> None:
        """The observer filter's stream of a passthrough response: its headers name the call
        (the request id the listener's filter set), then a copy of every chunk follows, which
        is metered as a held chunk would be. Nothing is sent back: in observability mode Envoy
        reads no reply. The end of the stream settles at the price (or, cut short, at what was
        seen), as the listener's stream does for a held one."""
        waiting = None
        try:
            async for request in requests:
                phase = request.WhichOneof("request")
                if phase == "response_headers" and waiting is None:
                    for h in request.response_headers.headers.headers:
                        if h.key == REQUEST_ID_HEADER:
                            waiting = self.observers.take(
                                h.raw_value.decode("latin-1") if h.raw_value else h.value)
                            break
                elif phase == "response_body" and waiting is not None:
                    exchange = waiting.exchange
                    message = request.response_body
                    if exchange.on_stream_chunk(message.body, message.end_of_stream).finished:
                        due = exchange.take_due()
                        if due is not None:
                            await self._settle(exchange, due, waiting.started)
                            self._count_priced(exchange)
                        # Done now: Envoy would keep this gRPC stream open for its deferred
                        # close (5 s) after the response ended; ending it here frees it, and
                        # the access log's latency is the call's, not the close's.
                        return
        except asyncio.CancelledError:
            pass  # Envoy closes the stream after the response (deferred close): a normal end
        except Exception:
            log.exception("bug while observing a stream")
        finally:
            if waiting is not None:
                metrics.STREAMS_PASSED.labels("observer").inc()
                self._finish(waiting.exchange, None, waiting.started)

    def settle_unobserved(self) -> None:
        """At shutdown, after the streams drained: calls still waiting for their observer
        are settled as unobserved now, not left for the sweeper."""
        for waiting in self.observers.drain():
            self._unobserved(waiting.exchange, waiting.started)

    def _unobserved(self, exchange: Exchange, started: float) -> None:
        metrics.STREAMS_PASSED.labels("unobserved").inc()
        due = exchange.settlement_unobserved()
        if due is not None:
            self.settler.settle_later(self._settle_call(exchange, due, started))
        self._finish(exchange, None, started)

    def _resumed(self, request: ep.ProcessingRequest) -> Live | None:
        """The call a failover's re-run continues, named by the failover header (only looked
        for while a hand-over is pending). An unknown nonce is a client's header: stripped
        with the other `x-tollgate-*` ones by the normal path."""
        for h in request.request_headers.headers.headers:
            if h.key == FAILOVER_HEADER:
                return self.failover.take(h.raw_value.decode("latin-1") if h.raw_value
                                          else h.value)
        return None

    def _resume_headers(
        self, request: ep.ProcessingRequest, exchange: Exchange
    ) -> ep.ProcessingResponse:
        """The re-run's headers are those the failed Upstream got: the call's own were read
        in its first pass. What that pass added for the failed Upstream's retries goes; the
        rest is set again for the backup in the body phase."""
        message = request.request_headers
        exchange.header_tally = HeaderTally(
            (h.key, h.raw_value or h.value) for h in message.headers.headers)
        edit = HeaderEdit(remove=(FAILOVER_HEADER, "x-envoy-original-url", TRY_HEADER,
                                  MAX_RETRIES_HEADER))
        exchange.header_tally.apply(edit)
        return adapter.continue_response("request_headers", Continue(edit))

    async def _resume_body(self, exchange: Exchange, started: float) -> ep.ProcessingResponse:
        """The call as its next backup Upstream sends it: planned and reserved again (its
        price and body may differ), under a new request id."""
        failed = exchange.request_id
        decision = exchange.fail_over(new_request_id(), time.time())
        log.info("request %s continues as %s on upstream %s", failed, exchange.request_id,
                 exchange.upstream.name if exchange.upstream else "-")
        if decision is None:
            decision = Deny(502, "no_backup_left", "The upstream failed and no backup was left.")
        if isinstance(decision, Reserve):
            decision = await self._reserve(exchange, decision, started)
        if isinstance(decision, Deny):
            return self._deny(exchange, decision)
        exchange.admitted = True
        metrics.count(metrics.labelled(metrics.REQUESTS, "allowed", "ok"))
        response = adapter.continue_response("request_body", decision)
        adapter.name_request(response, METADATA_NAMESPACE, exchange.request_id)
        return response

    def _release_failed(self, live: Live, status: int) -> None:
        """A call fails over: its hold on the failed Upstream is released at zero now, as for
        a provider error that reaches the client (the re-run reserves for the backup)."""
        exchange = live.exchange
        exchange.status = status
        exchange.settled = True
        self.settler.settle_later(self._settle_call(
            exchange, Settlement(0, 0, status, "upstream_error"), live.started))
        self._access(exchange, None, live.started)

    def _shed(self, request: ep.ProcessingRequest, exchange: Exchange) -> ep.ProcessingResponse:
        """Past capacity: a cheap JSON 503 with Retry-After now, instead of queueing until
        Envoy's message timeout turns the request into a bare 500. Nothing was reserved or
        sent upstream, so nothing is charged."""
        path = ""
        for h in request.request_headers.headers.headers:
            if h.key == ":path":
                path = h.raw_value.decode("latin-1") if h.raw_value else h.value
                break
        exchange.path = path or "/"
        exchange.route = classify_path(exchange.path)  # the refusal in the client's API shape
        metrics.REQUESTS.labels("denied", "overloaded").inc()
        deny = Deny(503, "overloaded",
                    "Tollgate is at capacity; retry after the time in Retry-After.",
                    headers=(("retry-after", "1"),))
        return adapter.deny_response(deny, exchange.error_body(deny), exchange.deny_headers())

    def _access(
        self, exchange: Exchange, answered: tuple[int, str] | None, started: float
    ) -> None:
        """The access log line: names, numbers and codes only, never a prompt or a key."""
        priced = exchange.priced
        logs.access({
            "request_id": exchange.request_id,
            "path": exchange.path,
            "key": exchange.key.name if exchange.key else None,
            "model": exchange.facts.model if exchange.facts else None,
            "upstream": exchange.upstream.name if exchange.upstream else None,
            "status": answered[0] if answered else exchange.status,
            "code": answered[1].removeprefix("tollgate_") if answered else None,
            "stream": bool(exchange.facts and exchange.facts.stream),
            "cost_usd": format_nanos(priced.cost.total_nanos) if priced else "0",
            "input_tokens": priced.usage.input if priced else 0,
            "output_tokens": priced.usage.output if priced else 0,
            "latency_ms": round((time.monotonic() - started) * 1000, 1),
        })

    async def _handle(
        self,
        phase: str,
        request: ep.ProcessingRequest,
        exchange: Exchange,
        snapshot: Snapshot | None,
        started: float,
    ) -> ep.ProcessingResponse:
        try:
            if snapshot is None:
                if phase.startswith("request"):
                    return self._deny(
                        exchange,
                        Deny(503, "config_unavailable",
                             "Tollgate has not loaded its configuration yet; retry shortly."),
                    )
                return adapter.continue_response(phase, Continue())
            if phase == "request_headers":
                return await self._request_headers(request, exchange, snapshot)
            if phase == "request_body":
                return await self._request_body(request, exchange, snapshot, started)
            if phase == "response_headers":
                headers = adapter.header_map(request.response_headers)
                decision = exchange.on_response_headers(headers)
                if exchange.passthrough:  # before the reply: its observer may come at once
                    self.observers.expect(exchange, started)
                if exchange.cooldown_due is not None:
                    await self._cool_down(exchange, exchange.cooldown_due)
                due = exchange.take_due()
                if due is not None:
                    statuses = await self._settle(exchange, due, started)
                    edit = decision.headers.plus(exchange.after_settlement(statuses))
                    decision = dataclasses.replace(decision, headers=edit)
                return adapter.continue_response(phase, decision)
            if phase == "response_body" and exchange.meter is not None:
                return await self._stream_chunk(request, exchange, started)
            if phase == "response_body" and exchange.admitted:
                body = request.response_body.body
                exchange.on_response_body(body)
                due = exchange.take_due()
                assert due is not None
                statuses = await self._settle(exchange, due, started)
                self._count_priced(exchange)
                reply = exchange.response_body_reply(body, statuses)
                if isinstance(reply, Deny):  # a response-side policy withheld the answer
                    return self._deny(exchange, reply)
                return adapter.continue_response(phase, reply)
            return adapter.continue_response(phase, Continue())
        except Exception:
            log.exception("bug while handling %s (request %s)", phase, exchange.request_id)
            # Counted here once, as an error; the 500 below is not counted again as a denial.
            metrics.REQUESTS.labels("error", "internal").inc()
            if phase.startswith("request"):
                return self._deny(
                    exchange,
                    Deny(500, "internal_error",
                         f"Tollgate failed on this request (id {exchange.request_id})."),
                    counted=True,
                )
            return adapter.continue_response(phase, Continue())

    async def _stream_chunk(
        self, request: ep.ProcessingRequest, exchange: Exchange, started: float
    ) -> ep.ProcessingResponse:
        message = request.response_body
        body = message.body  # each read of a bytes field copies it out of the message
        step = exchange.on_stream_chunk(body, message.end_of_stream)
        data = step.forward
        if step.finished:
            due = exchange.take_due()
            if due is not None:
                statuses = await self._settle(exchange, due, started)
                self._count_priced(exchange)
            else:
                statuses = None
            data += exchange.stream_closing(statuses)
        if data == body:
            return adapter.UNCHANGED_RESPONSE_BODY
        return adapter.continue_response("response_body", Continue(body=data,
                                                                   streamed_chunk=True))

    async def _request_headers(
        self, request: ep.ProcessingRequest, exchange: Exchange, snapshot: Snapshot
    ) -> ep.ProcessingResponse:
        message = request.request_headers
        entries = adapter.header_entries(message)
        headers = adapter.header_map(message, entries)
        presented = find_key(headers)
        record = await self.keys.resolve(snapshot, presented) if presented else None
        client_ip = adapter.client_address(request)
        if not client_ip and not self.warned_no_address:
            self.warned_no_address = True
            log.warning("Envoy sends no client address (ext_proc request_attributes lacks "
                        "source.address): every request shares one `per: ip` window")
        # Every entry as Envoy counts it (duplicates and pseudo-headers too).
        # Sizes only: a raw value's byte length is its latin-1 length (no decoding needed).
        exchange.header_tally = HeaderTally(entries)
        decision = exchange.on_request_headers(
            headers, presented, record, snapshot, message.end_of_stream, time.time(),
            client_ip=client_ip,
        )
        if isinstance(decision, Deny):
            return self._deny(exchange, decision)
        if isinstance(decision, Reply):
            kind = "models" if exchange.path.startswith("/v1/models") else "cors_preflight"
            metrics.REQUESTS.labels("answered", kind).inc()
            return adapter.reply_response(decision, exchange.deny_headers())
        response = adapter.continue_response("request_headers", decision)
        adapter.name_request(response, METADATA_NAMESPACE, exchange.request_id)
        return response

    async def _request_body(
        self,
        request: ep.ProcessingRequest,
        exchange: Exchange,
        snapshot: Snapshot,
        started: float,
    ) -> ep.ProcessingResponse:
        decision: Decision | Reserve | Ingest | Reply = exchange.on_request_body(
            request.request_body.body, snapshot, time.time()
        )
        if isinstance(decision, Ingest):
            return await answer_ingest(self.quota, exchange, decision, snapshot,
                                       self.options.hold_seconds)
        if isinstance(decision, Reply):
            # A policy's auto-reply: never sent upstream, recorded at zero cost.
            metrics.REQUESTS.labels("answered", "auto_reply").inc()
            self.settler.enqueue(self._settle_call(
                exchange, Settlement(0, 0, 200, "auto_reply"), started))
            return adapter.reply_response(decision, exchange.deny_headers())
        if exchange.moderation_calls and not isinstance(decision, Deny):
            # Before anything is reserved: a flagged request holds nothing.
            refused = await self._moderate(exchange, snapshot, started)
            if refused is not None:
                return self._deny(exchange, refused)
        if isinstance(decision, Reserve):
            decision = await self._reserve(exchange, decision, started)
        if isinstance(decision, Deny):
            return self._deny(exchange, decision)
        exchange.admitted = True
        metrics.count(metrics.labelled(metrics.REQUESTS, "allowed", "ok"))
        return adapter.continue_response("request_body", decision)

    async def _moderate(self, exchange: Exchange, snapshot: Snapshot,
                        started: float) -> Deny | None:
        """The Policy moderation calls (server/moderation.py), each recorded as its own usage
        event: model = the moderation model, priced only if a PriceTable prices it."""
        upstream = exchange.upstream.name if exchange.upstream else ""
        for call in exchange.moderation_calls:
            with tracing.span("moderation", {"tollgate.request_id": exchange.request_id}):
                hits, refusal, answered = await self.moderation.check(call, snapshot, upstream)
            if answered:
                price = snapshot.price(call.model)
                cost = -(-call.tokens * price.input // 1_000_000) if price else 0
                event = usage_pb2.UsageEvent.FromString(self._event(
                    exchange, Settlement(cost, call.tokens, 200, "moderation"), started))
                event.model, event.endpoint = call.model, "moderations"
                event.priced = price is not None
                event.streamed = False
                del event.policies[:]
                self.settler.enqueue(self.quota.settle_call(
                    None, cost, call.tokens, event.SerializeToString(), False,
                    request_id=f"{exchange.request_id}:moderation:{call.model}"))
            denied = exchange.on_moderated(hits, refusal)
            if denied is not None:
                return denied
        return None

    async def _reserve(self, exchange: Exchange, reserve: Reserve, started: float) -> Decision:
        plan = reserve.plan
        # Recorded by the sweeper if this request is never settled: priced at the estimate.
        base = self._event(exchange, Settlement(plan.estimate_nanos, plan.estimate_tokens, 0,
                                                "expired"), started)
        try:
            with tracing.span("redis.reserve", {"tollgate.request_id": exchange.request_id,
                                                "tollgate.limits": len(plan.limits),
                                                "tollgate.windows": len(plan.windows)}):
                reply = await self.quota.reserve(plan, base)
        except StoreUnavailable as exc:
            metrics.REDIS_ERRORS.labels("reserve").inc()
            exchange.reserve_maybe_ran = not isinstance(exc, CircuitOpen)
            decision = exchange.on_reserve_failed(reserve, self.local)
            if not isinstance(decision, Deny):
                metrics.FAIL_OPEN.labels("limits" if plan.limits else "rate_limits").inc()
            elif exchange.reserve_maybe_ran:
                # The script may still run once Redis answers again (a stalled Redis executes
                # what it had received). The refused request must not keep a hold, a lease or
                # a window charge: queue a cancel, which releases them if they appear and
                # otherwise stops the late reserve (settle.lua). Journaled like a settlement.
                self.settler.enqueue(self.quota.settle_call(
                    plan, 0, 0, b"", confirmed=False, cancel=True))
            return decision
        reservation = interpret_reservation(plan, reply)
        if reservation.credential is not None:
            cred = reservation.credential
            metrics.count(metrics.labelled(metrics.CRED_REQUESTS, cred.upstream, cred.name))
            metrics.labelled(metrics.CRED_RPM, cred.upstream, cred.name).set(
                reservation.credential_requests)
            metrics.labelled(metrics.CRED_TPM, cred.upstream, cred.name).set(
                reservation.credential_tokens)
        if reservation.blocked_limit:
            clamped = exchange.clamp(reserve, reservation, time.time())
            if clamped is not None:
                # `onInsufficient: clamp`: reserve again for the smaller output cap. A second
                # round trip, only on this path; the first refusal held nothing.
                retry = await self._reserve_clamped(exchange, clamped, started)
                if retry is not None:
                    reserve, reservation = clamped, retry
                else:
                    exchange.clamp_failed(reserve)
        if reservation.blocked_limit:
            metrics.LIMIT_DENIALS.labels(reservation.blocked_limit).inc()
        if reservation.no_credential:
            # No usable credential on this upstream: the next one serving the model, if any
            # (a further round trip only on this path; the refusal held nothing).
            backup = exchange.next_upstream(time.time())
            if isinstance(backup, Reserve):
                return await self._reserve(exchange, backup, started)
            if backup is not None:
                return backup
        return exchange.on_reserved(reserve, reservation)

    async def _reserve_clamped(
        self, exchange: Exchange, clamped: Reserve, started: float
    ) -> Reservation | None:
        plan = clamped.plan
        base = self._event(exchange, Settlement(plan.estimate_nanos, plan.estimate_tokens, 0,
                                                "expired"), started)
        try:
            reply = await self.quota.reserve(plan, base)
        except StoreUnavailable:
            metrics.REDIS_ERRORS.labels("reserve").inc()
            return None
        reservation = interpret_reservation(plan, reply)
        if reservation.denial is not None:
            return None  # spent by others in between: the first refusal stands
        metrics.CLAMPED.inc()
        return reservation

    def _settle_call(self, exchange: Exchange, due: Settlement, started: float) -> SettleCall:
        event = self._event(exchange, due, started)
        plan = exchange.plan
        if plan is None or plan.empty:
            return self.quota.settle_call(None, due.cost_nanos, due.tokens, event, False,
                                          request_id=exchange.request_id)
        # Offline: the reserve failed, and may yet run late; the script then finds its hold.
        return self.quota.settle_call(
            plan, due.cost_nanos, due.tokens, event, confirmed=not exchange.offline,
            credential=exchange.credential if exchange.pool else None,
            success=200 <= due.status < 300,
            reserve_maybe_ran=exchange.reserve_maybe_ran,
        )

    async def _cool_down(self, exchange: Exchange, retry_after_ms: int) -> None:
        credential, upstream = exchange.credential, exchange.upstream
        assert credential is not None and upstream is not None
        metrics.CRED_ERRORS.labels(upstream.name, credential.name, str(exchange.status)).inc()
        try:
            with tracing.span("redis.cool_down", {"tollgate.request_id": exchange.request_id,
                                                  "tollgate.upstream": upstream.name}):
                ms, errors = await self.quota.cool_down(
                    credential, upstream.cooldown_ms, upstream.cooldown_max_ms, retry_after_ms)
        except (StoreUnavailable, StoreRejected):
            metrics.REDIS_ERRORS.labels("cooldown").inc()
            return
        metrics.CRED_COOLDOWNS.labels(upstream.name, credential.name).inc()
        log.warning("credential %s/%s answered %d: resting %d ms for %s (%d errors in a row)",
                    upstream.name, credential.name, exchange.status, ms, credential.model,
                    errors)

    async def _settle(
        self, exchange: Exchange, due: Settlement, started: float
    ) -> tuple[LimitStatus, ...] | None:
        call = self._settle_call(exchange, due, started)
        plan = exchange.plan
        # Written in a pipelined batch, off the request path: the response reports the states
        # projected from this request's own reservation (exact spend and state counts are kept
        # by the script). One Redis round trip per request on the request path, not two.
        self.settler.enqueue(call)
        if plan is None or plan.empty or exchange.reservation is None:
            return ()
        return project_settlement(exchange.reservation.limits, plan, due.cost_nanos,
                                  [c.limit for c in plan.limits])

    def _deny(
        self, exchange: Exchange, deny: Deny, counted: bool = False
    ) -> ep.ProcessingResponse:
        if exchange.ingest_bulk is not None and not counted:
            return ingest_refuse(exchange, deny)  # Pay-i's error model (core/ingest.py)
        if not counted:
            metrics.REQUESTS.labels("denied", deny.code).inc()
        return adapter.deny_response(deny, exchange.error_body(deny), exchange.deny_headers())

    def _event(self, exchange: Exchange, due: Settlement, started: float) -> bytes:
        """The usage event, serialized. A reserved request needs it twice (the sweeper's copy at
        reserve time, the real one at settlement): the fields that never change after routing
        are serialized once per upstream tried (`_event_head`) and the rest appended. Two
        serialized messages concatenated parse as one message with the fields of both (the
        protobuf wire format's merge rule; the two parts share no field)."""
        head = exchange.event_head
        if head is None or head[0] is not exchange.upstream:
            head = exchange.event_head = (exchange.upstream, self._event_head(exchange))
        priced = exchange.priced
        hits = exchange.policy_hits
        real = priced is not None and due.reason in ("priced", "stream_cut")
        event = usage_pb2.UsageEvent(
            status=due.status,
            latency_ms=int((time.monotonic() - started) * 1000),
            timestamp_ms=int(time.time() * 1000),
            priced=real and priced.priced,  # type: ignore[union-attr]
        )
        if hits:
            event.policies.extend([
                usage_pb2.PolicyHit(policy=h.policy, rule=h.rule, action=h.action, side=h.side,
                                    count=h.count) for h in hits])
        if real:
            assert priced is not None
            u, c = priced.usage, priced.cost
            event.tokens.CopyFrom(usage_pb2.TokenCounts(
                input=u.input, output=u.output, cached_input=u.cached_input,
                cache_write=u.cache_write, reasoning=u.reasoning))
            event.cost.CopyFrom(cost_message(c.input_nanos, c.output_nanos))
        else:
            event.tokens.input = due.tokens
            event.cost.total_nanos = due.cost_nanos  # an estimate or 0: no parts to tell
            event.cost.total_micros = nanos_to_micros(due.cost_nanos)
        raw: bytes = head[1] + event.SerializeToString()
        return raw

    @staticmethod
    def _event_head(exchange: Exchange) -> bytes:
        """The event's fields known once the request is routed (who, what, where)."""
        key, facts, upstream = exchange.key, exchange.facts, exchange.upstream
        assert key is not None and facts is not None
        event = usage_pb2.UsageEvent(
            request_id=exchange.request_id,
            key=key.name,
            user=exchange.user,
            group=key.group,
            tags=list(dict.fromkeys(key.tags + exchange.request_tags)),
            model=exchange.model_identity or facts.model,
            provider=upstream.provider if upstream else "",
            upstream=upstream.name if upstream else "",
            endpoint=facts.endpoint.value,
            streamed=facts.stream,
        )
        annotate_event(event, exchange.annotations)
        raw: bytes = event.SerializeToString()
        return raw

    def _body_log_entry(self, exchange: Exchange) -> bytes:
        """The opt-in log entry: bodies as they went on (after redaction), and who and what."""
        assert exchange.logged is not None
        priced = exchange.priced
        request, response = (b[:LOGGED_BYTES].decode("utf-8", "replace")
                             for b in exchange.logged)
        return orjson.dumps({
            "request_id": exchange.request_id, "timestamp_ms": int(time.time() * 1000),
            "key": exchange.key.name if exchange.key else None, "user": exchange.user,
            "model": exchange.facts.model if exchange.facts else None,
            "status": exchange.status,
            "cost_usd": format_nanos(priced.cost.total_nanos) if priced else "0",
            "policies": [h.result() for h in exchange.policy_hits],
            "request": request, "response": response})

    def _count_priced(self, exchange: Exchange) -> None:
        priced = exchange.priced
        if priced is None:
            return
        metrics.count(metrics.labelled(metrics.PRICED, priced.upstream,
                                       "yes" if priced.priced else "no"))
        if not priced.priced:
            metrics.UNPRICED.labels("unknown_model").inc()
        metrics.count(metrics.labelled(metrics.COST_NANOS, priced.upstream),
                      priced.cost.total_nanos)
        metrics.count_spend(priced.key_name, exchange.model_identity or priced.model,
                            priced.priced, priced.upstream, priced.cost.total_nanos,
                            priced.usage.input, priced.usage.output)
        if exchange.credential is not None:
            metrics.count(metrics.labelled(metrics.CRED_TOKENS, priced.upstream,
                                           exchange.credential.name), priced.usage.total)
        metrics.count(metrics.labelled(metrics.TOKENS, "input"), priced.usage.input)
        metrics.count(metrics.labelled(metrics.TOKENS, "output"), priced.usage.output)
