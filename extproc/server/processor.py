"""The ext_proc servicer: one gRPC stream per HTTP request, driven through `core.exchange`.

This is glue: decode a message (adapter), ask the core, do the I/O the core cannot (key lookups
on a snapshot miss, queueing the usage event), encode the answer (adapter). A bug in a request
phase becomes a clean JSON 500 for that request, never a broken stream; a bug in a response phase
lets the response through unpriced (and is logged), because the upstream call already happened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.core.decisions import Continue, Deny
from extproc.core.exchange import REQUEST_ID_HEADER, Exchange, Options, Reply
from extproc.core.keys import find_key
from extproc.core.snapshot import Snapshot
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.server import adapter, metrics
from extproc.server.state import ConfigWatcher, KeyDirectory, UsageRecorder

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


def new_request_id() -> str:
    return os.urandom(16).hex()


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        watcher: ConfigWatcher,
        keys: KeyDirectory,
        recorder: UsageRecorder,
        options: Options,
    ) -> None:
        self.watcher = watcher
        self.keys = keys
        self.recorder = recorder
        self.options = options

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        exchange = Exchange(new_request_id(), self.options)
        started = time.monotonic()
        snapshot = self.watcher.snapshot  # one snapshot for the whole request
        try:
            async for request in request_iterator:
                phase = request.WhichOneof("request")
                t0 = time.perf_counter()
                response = await self._handle(phase, request, exchange, snapshot, started)
                _PHASE_TIMERS[phase].observe(time.perf_counter() - t0)
                yield response
        except asyncio.CancelledError:
            # Envoy cancels streams at request end unless graceful close is on: a normal end.
            return

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
                decision = exchange.on_request_body(request.request_body.body, snapshot)
                if isinstance(decision, Deny):
                    return self._deny(exchange, decision)
                metrics.REQUESTS.labels("allowed", "ok").inc()
                return adapter.continue_response(phase, decision)
            if phase == "response_headers":
                headers = adapter.header_map(request.response_headers)
                return adapter.continue_response(phase, exchange.on_response_headers(headers))
            if phase == "response_body":
                decision = exchange.on_response_body(request.response_body.body, snapshot)
                if exchange.priced is not None:
                    self._record(exchange, started)
                return adapter.continue_response(phase, decision)
            return adapter.continue_response(phase, Continue())
        except Exception:
            log.exception("bug while handling %s (request %s)", phase, exchange.request_id)
            metrics.REQUESTS.labels("error", "internal").inc()
            if phase.startswith("request"):
                return self._deny(
                    exchange,
                    Deny(500, "internal_error",
                         f"Tollgate failed on this request (id {exchange.request_id})."),
                )
            return adapter.continue_response(phase, Continue())

    async def _request_headers(
        self, request: ep.ProcessingRequest, exchange: Exchange, snapshot: Snapshot
    ) -> ep.ProcessingResponse:
        message = request.request_headers
        headers = adapter.header_map(message)
        presented = find_key(headers)
        record = await self.keys.resolve(snapshot, presented) if presented else None
        decision = exchange.on_request_headers(
            headers, presented, record, snapshot, message.end_of_stream, time.time()
        )
        if isinstance(decision, Deny):
            return self._deny(exchange, decision)
        if isinstance(decision, Reply):
            metrics.REQUESTS.labels("answered", "models").inc()
            return adapter.reply_response(decision, exchange.deny_headers())
        return adapter.continue_response("request_headers", decision)

    def _deny(self, exchange: Exchange, deny: Deny) -> ep.ProcessingResponse:
        metrics.REQUESTS.labels("denied", deny.code).inc()
        return adapter.deny_response(deny, exchange.anthropic_style, exchange.deny_headers())

    def _record(self, exchange: Exchange, started: float) -> None:
        priced = exchange.priced
        assert priced is not None and exchange.key is not None and exchange.facts is not None
        upstream = exchange.upstream
        event = usage_pb2.UsageEvent(
            request_id=priced.request_id,
            key=priced.key_name,
            user=exchange.facts.user or exchange.key.user,
            group=exchange.key.group,
            tags=list(exchange.key.tags),
            model=priced.model,
            provider=upstream.provider if upstream else "",
            upstream=priced.upstream,
            endpoint=exchange.facts.endpoint.value,
            tokens=usage_pb2.TokenCounts(
                input=priced.usage.input,
                output=priced.usage.output,
                cached_input=priced.usage.cached_input,
                cache_write=priced.usage.cache_write,
                reasoning=priced.usage.reasoning,
            ),
            cost=usage_pb2.Cost(
                input_micros=priced.cost.input_micros,
                output_micros=priced.cost.output_micros,
                total_micros=priced.cost.total_micros,
            ),
            status=exchange.status,
            latency_ms=int((time.monotonic() - started) * 1000),
            timestamp_ms=int(time.time() * 1000),
            priced=priced.priced,
            streamed=exchange.facts.stream,
        )
        self.recorder.record(event.SerializeToString())
        metrics.PRICED.labels(priced.upstream, "yes" if priced.priced else "no").inc()
        if not priced.priced:
            metrics.UNPRICED.labels("unknown_model").inc()
        metrics.COST_MICROS.labels(priced.upstream).inc(priced.cost.total_micros)
        metrics.TOKENS.labels("input").inc(priced.usage.input)
        metrics.TOKENS.labels("output").inc(priced.usage.output)


__all__ = ["REQUEST_ID_HEADER", "Processor"]
