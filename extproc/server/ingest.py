"""Telemetry-only mode at the edge: record the events of an ingest call (core/ingest.py) and
answer it through Envoy with an ImmediateResponse.

Each event is one settle-script call (no reservation: the call already happened), awaited on
the request path because the answer reports whether it was a duplicate and the limits' states.
When Redis cannot be reached nothing is recorded and the client gets 503 to retry (retries are
safe: an event is recorded at most once).
"""

from __future__ import annotations

import time

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core.decisions import Deny
from extproc.core.exchange import REQUEST_ID_HEADER, Exchange
from extproc.core.ingest import (
    RETRY_WINDOW_S,
    Ingest,
    PricedEvent,
    error_body,
    event_result,
    first_seen,
    iso,
    price_event,
)
from extproc.core.pricing import nanos_to_micros
from extproc.core.quota import interpret_settlement
from extproc.core.snapshot import Snapshot
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.server import adapter, metrics
from extproc.server.annotations import annotate_event
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import StoreRejected, StoreUnavailable


def _event_bytes(p: PricedEvent, key_group: str, key_tags: tuple[str, ...], key_name: str
                 ) -> bytes:
    e = p.event
    event = usage_pb2.UsageEvent(
        request_id=e.request_id, key=key_name, user=p.user, group=key_group,
        tags=list(dict.fromkeys(key_tags + e.request_tags)), model=p.model,
        provider=e.category, endpoint="ingest", status=e.http_status,
        latency_ms=e.latency_ms, timestamp_ms=int(e.event_time * 1000), priced=p.priced,
        source="ingest",
    )
    u, c = e.usage, p.cost
    event.tokens.CopyFrom(usage_pb2.TokenCounts(input=u.input, output=u.output,
                                                cached_input=u.cached_input,
                                                cache_write=u.cache_write))
    total = c.input_nanos + c.output_nanos
    event.cost.CopyFrom(usage_pb2.Cost(
        input_nanos=c.input_nanos, output_nanos=c.output_nanos, total_nanos=total,
        input_micros=nanos_to_micros(c.input_nanos),
        output_micros=nanos_to_micros(c.output_nanos), total_micros=nanos_to_micros(total)))
    annotate_event(event, e.notes)
    raw: bytes = event.SerializeToString()
    return raw


def _unavailable() -> Deny:
    return Deny(503, "limits_unavailable",
                "Usage cannot be recorded right now (limit store unreachable); retry shortly "
                "(a retried event is never counted twice).", headers=(("retry-after", "1"),))


def _answer(status: int, doc: dict[str, object], exchange: Exchange, code: str
            ) -> ep.ProcessingResponse:
    return adapter.immediate_response(status, orjson.dumps(doc),
                                      ((REQUEST_ID_HEADER, exchange.request_id),),
                                      f"tollgate_{code}")


def refuse(exchange: Exchange, deny: Deny) -> ep.ProcessingResponse:
    metrics.REQUESTS.labels("denied", deny.code).inc()
    return adapter.immediate_response(
        deny.status, orjson.dumps(error_body(deny)),
        (*deny.headers, (REQUEST_ID_HEADER, exchange.request_id)), f"tollgate_{deny.code}")


async def answer_ingest(quota: QuotaStore, exchange: Exchange, ingest: Ingest,
                        snapshot: Snapshot, hold_seconds: float) -> ep.ProcessingResponse:
    key = exchange.key
    assert key is not None
    received = time.time()
    results: list[dict[str, object]] = []
    refused = list(ingest.refused)
    events = list(ingest.events)
    untimed = [i for i, e in enumerate(events) if not e.timed]
    if untimed:
        # Retries of an event without a timestamp are planned at its first arrival: the settle
        # script then finds them for RETRY_WINDOW_S, not only within the hour they came in.
        try:
            firsts = await quota.first_seen([events[i].request_id for i in untimed],
                                            int(received * 1000), RETRY_WINDOW_S * 1000)
        except (StoreUnavailable, StoreRejected):
            metrics.REDIS_ERRORS.labels("ingest").inc()
            return refuse(exchange, _unavailable())
        for i, first_ms in zip(untimed, firsts, strict=True):
            events[i] = first_seen(events[i], first_ms)
    for index, event in enumerate(events):
        priced = price_event(event, key, snapshot, hold_seconds)
        if isinstance(priced, Deny):
            if not ingest.bulk:
                return refuse(exchange, priced)
            refused.append((index, priced))
            continue
        call = quota.settle_call(priced.plan, priced.cost.total_nanos, event.usage.total,
                                 _event_bytes(priced, key.group, key.tags, key.name),
                                 confirmed=False, request_id=event.request_id)
        try:
            reply = await quota.settle(call)
        except (StoreUnavailable, StoreRejected):
            metrics.REDIS_ERRORS.labels("ingest").inc()
            return refuse(exchange, _unavailable())
        duplicate = reply[0] == 0
        if not duplicate:
            metrics.COST_NANOS.labels("ingest").inc(priced.cost.total_nanos)
            metrics.count_spend(key.name, priced.model, priced.priced, "ingest",
                                priced.cost.total_nanos, event.usage.input, event.usage.output)
        result = event_result(priced, interpret_settlement(priced.plan, reply), duplicate,
                              key.name)
        results.append({"event_timestamp": event.event_timestamp, "request_id":
                        event.request_id, "xproxy_result": result})
    metrics.REQUESTS.labels("answered", "ingest").inc()
    if not ingest.bulk:
        return _answer(200, {**results[0], "ingest_timestamp": iso(received)}, exchange, "ingest")
    errors = [{"item_index": index, "xproxy_result": error_body(deny)} for index, deny
              in sorted(refused, key=lambda r: r[0])]
    return _answer(200, {
        "ingest_count": len(results), "error_count": len(errors),
        "item_error_count": len(errors), "total_count": len(results) + len(errors),
        "ingest_timestamp": iso(received), "request_id": exchange.request_id,
        "errors": errors, "results": results,
    }, exchange, "ingest")
