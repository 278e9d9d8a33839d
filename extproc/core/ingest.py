"""Telemetry-only mode: usage an application reports after calling the provider itself.

`POST /api/v1/ingest` (one event; annotations as headers, as the `payi` SDK sends them) and
`POST /api/v1/ingest/bulk` (a JSON array of events, annotations in each) are answered by the
gateway itself, in the shape the `payi` SDK parses (`IngestResponse`, `BulkIngestResponse`).

Rules:
* an event is priced like a proxied call: `resource` is the model, `units.text` its input and
  output tokens, `text_cache_read` / `text_cache_write` the cached and cache-write parts of the
  input; any other unit kind is reported in `unknown_units` and costs nothing;
* it is charged to every limit that selects it or that it names, Block limits included (the
  money was spent), but nothing is refused for being over a limit: the call already happened,
  so its state (`exceeded`, `overrun`) is reported instead;
* it is recorded once: the request id is derived from the key and the event's content, and
  the settle script records a request id at most once, so a retried ingest returns
  `duplicate_request: true` and counts nothing twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import fields, replace
from datetime import UTC, datetime

import orjson

from extproc.core import attribution, payi
from extproc.core.decisions import Deny
from extproc.core.keys import model_allowed
from extproc.core.payi import Annotations
from extproc.core.pricing import Cost, nanos_to_usd, price_usage
from extproc.core.quota import (
    LimitStatus,
    ReservationPlan,
    Subject,
    applicable,
    limits_result,
    plan_reservation,
)
from extproc.core.request import MAX_MODEL_CHARS, load_body
from extproc.core.resources import KeyRecord, qualify
from extproc.core.snapshot import Snapshot
from extproc.core.usage import Usage
from extproc.core.values import value_type

INGEST_PATH = "/api/v1/ingest"
BULK_PATH = "/api/v1/ingest/bulk"
MAX_BULK_EVENTS = 1000
MAX_UNITS = 1_000_000_000  # per unit kind and direction; far above any real call
#: How far back an event's own timestamp may lie (its period is charged), and ahead.
MAX_EVENT_AGE_S = 7 * 86400
MAX_EVENT_AHEAD_S = 300
# How long a retried event is recognised (recorded once). The settle script keeps the ids of
# unconfirmed settlements 48 h after the last write to their hour's set
# (quota_store.UNCONFIRMED_MARKER_MS); this must not be longer.
RETRY_WINDOW_S = 48 * 3600

_KNOWN_UNITS = ("text", "text_cache_read", "text_cache_write")


def ingest_kind(path: str) -> bool | None:
    """True for the bulk path, False for the single one, None for anything else."""
    bare = path.split("?", 1)[0].rstrip("/")
    if bare == BULK_PATH:
        return True
    if bare == INGEST_PATH:
        return False
    return None


@value_type
class IngestEvent:
    """One reported call, checked."""

    request_id: str
    category: str
    resource: str
    usage: Usage
    unknown_units: tuple[tuple[str, int, int], ...]
    event_time: float  # unix seconds: the call's own time (its limit periods), else now
    event_timestamp: str  # as reported back (ISO 8601)
    latency_ms: int
    http_status: int
    notes: Annotations
    limit_ids: tuple[str, ...]
    request_tags: tuple[str, ...]
    user: str
    # The client gave `event_timestamp`. Without one, `event_time` is the arrival, replaced by
    # the first arrival of the same event (`first_seen`) before it is recorded.
    timed: bool = True


@value_type
class Ingest:
    """The request-body decision for an ingest call: the events to record, and for bulk the
    items refused (index, refusal)."""

    bulk: bool
    events: tuple[IngestEvent, ...]
    refused: tuple[tuple[int, Deny], ...] = ()


def _bad(message: str) -> Deny:
    return Deny(400, "invalid_request", message)


def _count(value: object, where: str) -> int | Deny:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_UNITS:
        return _bad(f"{where} must be an integer from 0 to {MAX_UNITS}.")
    return value


def _units(doc: object) -> tuple[Usage, tuple[tuple[str, int, int], ...]] | Deny:
    if not isinstance(doc, dict) or not doc:
        return _bad("'units' must be a non-empty object such as "
                    '{"text": {"input": 12, "output": 3}}.')
    counts: dict[str, tuple[int, int]] = {}
    for kind, value in doc.items():
        if not isinstance(value, dict):
            return _bad(f"'units.{kind[:64]}' must be an object with 'input' and 'output'.")
        parsed = [_count(value.get(d), f"'units.{kind[:64]}.{d}'") for d in ("input", "output")]
        for p in parsed:
            if isinstance(p, Deny):
                return p
        counts[kind] = (int(parsed[0]), int(parsed[1]))  # type: ignore[arg-type]
    if len(counts) > 32:
        return _bad("'units': at most 32 unit kinds.")
    text_in, text_out = counts.get("text", (0, 0))
    read_in, read_out = counts.get("text_cache_read", (0, 0))
    write_in, write_out = counts.get("text_cache_write", (0, 0))
    # Tollgate's input counts every prompt token, cached reads and cache writes included.
    usage = Usage(input=text_in + read_in + write_in, output=text_out + read_out + write_out,
                  cached_input=read_in, cache_write=write_in)
    unknown = tuple((k, i, o) for k, (i, o) in counts.items() if k not in _KNOWN_UNITS)
    return usage, unknown


def _timestamp(value: object, now: float) -> tuple[float, str] | Deny:
    if value is None or value == "":
        return now, datetime.fromtimestamp(now, UTC).isoformat()
    if not isinstance(value, str):
        return _bad("'event_timestamp' must be an ISO 8601 string.")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return _bad("'event_timestamp' must be an ISO 8601 string.")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    at = parsed.timestamp()
    if not now - MAX_EVENT_AGE_S <= at <= now + MAX_EVENT_AHEAD_S:
        return _bad("'event_timestamp' must lie within the last 7 days (and not in the future).")
    return at, parsed.isoformat()


def _string_list(value: object, what: str, max_count: int, max_chars: int
                 ) -> tuple[str, ...] | Deny:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return _bad(f"'{what}' must be an array of strings.")
    return attribution.header_list(value, what, max_count, max_chars)


def _optional_int(doc: Mapping[str, object], name: str, top: int) -> int | Deny:
    value = doc.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        return _bad(f"'{name}' must be an integer from 0 to {top}.")
    return value


def parse_event(
    doc: object,
    key_id: str,
    now: float,
    header_notes: Annotations = payi.NO_ANNOTATIONS,
    header_limits: tuple[str, ...] = (),
    header_tags: tuple[str, ...] = (),
    header_user: str = "",
) -> IngestEvent | Deny:
    """One event of an ingest body, checked; header values complete what the body lacks."""
    if not isinstance(doc, dict):
        return _bad("An ingest event must be a JSON object.")
    category = doc.get("category")
    if not isinstance(category, str) or not category.strip() or len(category) > 256:
        return _bad("'category' must be a non-empty string such as 'system.openai'.")
    resource = doc.get("resource")
    if not isinstance(resource, str) or not resource.strip() or len(resource) > MAX_MODEL_CHARS:
        return _bad(f"'resource' (the model) must be a non-empty string of at most "
                    f"{MAX_MODEL_CHARS} characters.")
    units = _units(doc.get("units"))
    if isinstance(units, Deny):
        return units
    when = _timestamp(doc.get("event_timestamp"), now)
    if isinstance(when, Deny):
        return when
    latency = _optional_int(doc, "end_to_end_latency_ms", 2**31 - 1)
    if isinstance(latency, Deny):
        return latency
    status = _optional_int(doc, "http_status_code", 599)
    if isinstance(status, Deny):
        return status
    body_notes = payi.check_annotations({
        "use_case_name": doc.get("use_case_name"), "use_case_id": doc.get("use_case_id"),
        "use_case_step": doc.get("use_case_step"),
        "use_case_version": doc.get("use_case_version"),
        "use_case_properties": doc.get("use_case_properties"),
        "request_properties": doc.get("properties"),
        "account_name": doc.get("account_name"), "resource_scope": doc.get("scope"),
    })
    if isinstance(body_notes, Deny):
        return body_notes
    notes = _merge(header_notes, body_notes)
    limits = _string_list(doc.get("limit_ids"), "limit_ids", attribution.MAX_LIMIT_IDS,
                          attribution.MAX_LIMIT_ID_CHARS)
    if isinstance(limits, Deny):
        return limits
    tags = _string_list(doc.get("request_tags"), "request_tags", attribution.MAX_REQUEST_TAGS,
                        attribution.MAX_TAG_CHARS)
    if isinstance(tags, Deny):
        return tags
    user = doc.get("user_id")
    if user is not None and not isinstance(user, str):
        return _bad("'user_id' must be a string.")
    checked_user = attribution.client_user(user or header_user, "'user_id'")
    if isinstance(checked_user, Deny):
        return checked_user
    usage, unknown = units
    return IngestEvent(
        request_id=event_id(key_id, doc),
        category=category, resource=resource, usage=usage, unknown_units=unknown,
        event_time=when[0], event_timestamp=when[1], latency_ms=int(latency),
        http_status=int(status) or 200, notes=notes,
        limit_ids=tuple(dict.fromkeys(header_limits + limits)),
        request_tags=tuple(dict.fromkeys(header_tags + tags)), user=checked_user,
        timed=doc.get("event_timestamp") not in (None, ""),
    )


def first_seen(event: IngestEvent, first_ms: int) -> IngestEvent:
    """An event without its own timestamp, at the time it was first received (a retry is
    planned, and so recorded once, at the same time as the first attempt)."""
    when = first_ms / 1000
    return replace(event, event_time=when,
                   event_timestamp=datetime.fromtimestamp(when, UTC).isoformat())


_ANNOTATION_FIELDS = tuple(f.name for f in fields(Annotations))


def _merge(headers: Annotations, body: Annotations) -> Annotations:
    """Body values win over header values, field by field."""
    changes = {name: getattr(body, name) for name in _ANNOTATION_FIELDS
               if getattr(body, name)}
    return replace(headers, **changes)


def event_id(key_id: str, doc: Mapping[str, object]) -> str:
    """The request id of a reported event: the same key reporting the same event (a retry
    sends the same body) gets the same id, which the settle script records only once (within
    RETRY_WINDOW_S: events without a timestamp are planned at their first arrival for that)."""
    digest = hashlib.sha256(key_id.encode() + b"\0" + orjson.dumps(
        doc, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return "ingest-" + digest[:32]


def parse_ingest(
    body: bytes,
    bulk: bool,
    key_id: str,
    now: float,
    header_notes: Annotations,
    header_limits: tuple[str, ...],
    header_tags: tuple[str, ...],
    header_user: str,
) -> Ingest | Deny:
    """An ingest request body: one event, or for bulk an array of them (items that are
    unusable are refused one by one, the others recorded)."""
    doc = load_body(body)
    if isinstance(doc, Deny):
        return doc
    if not bulk:
        event = parse_event(doc, key_id, now, header_notes, header_limits, header_tags,
                            header_user)
        if isinstance(event, Deny):
            return event
        return Ingest(False, (event,))
    items = doc.get("events") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        return _bad("A bulk ingest body must be a non-empty JSON array of events.")
    if len(items) > MAX_BULK_EVENTS:
        return _bad(f"A bulk ingest may carry at most {MAX_BULK_EVENTS} events.")
    events: list[IngestEvent] = []
    refused: list[tuple[int, Deny]] = []
    for index, item in enumerate(items):
        parsed = parse_event(item, key_id, now, header_notes, header_limits, header_tags,
                             header_user)
        if isinstance(parsed, Deny):
            refused.append((index, parsed))
        else:
            events.append(parsed)
    return Ingest(True, tuple(events), tuple(refused))


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def error_body(deny: Deny) -> dict[str, object]:
    """Pay-i's error model (`APIError` with an `xproxy_error`), plus Tollgate's own `error`."""
    return {
        "message": deny.message,
        "statusCode": deny.status,
        "xproxy_error": {"code": deny.code, "message": deny.message},
        "error": {"message": deny.message, "type": deny.error_type, "code": deny.code},
    }


@value_type
class PricedEvent:
    """An event with its price and the plan whose settlement records it."""

    event: IngestEvent
    cost: Cost
    priced: bool
    model: str  # the model's identity for limits and reports
    user: str
    plan: ReservationPlan
    unknown_limits: tuple[str, ...]
    blocking: dict[str, bool]


def price_event(event: IngestEvent, key: KeyRecord, snapshot: Snapshot,
                hold_seconds: float) -> PricedEvent | Deny:
    """Price an event and plan the settlement that charges its limits (no reservation: the
    call already happened, so nothing is held and nothing refused)."""
    if event.limit_ids and not key.allow_request_limits:
        return Deny(403, "limit_ids_not_allowed", "This API key may not name limits.")
    if event.user and not key.allow_client_user:
        return Deny(403, "client_user_not_allowed", "This API key may not name a user.")
    if not model_allowed(key, event.resource):
        return Deny(403, "model_not_allowed",
                    f"This API key may not use model '{event.resource}'.")
    price = snapshot.price(event.resource)
    cost = price_usage(price, event.usage) if price is not None else Cost()
    model = snapshot.prices.canonical(event.resource)
    user = attribution.effective_user(key.user, key.allow_client_user, event.user, None)
    subject = Subject(
        key=key.name, group=key.group, user=user,
        tags=attribution.limit_tags(key.tags, key.allowed_request_tags, event.request_tags),
        model=model, ip="", requested_model=event.resource, namespace=key.namespace,
        use_cases=attribution.limit_use_cases(key.allowed_use_cases, event.notes.use_case_name,
                                              event.notes.use_case_id),
        account=attribution.limit_account(key.allowed_accounts, event.notes.account_name),
    )
    named = tuple(qualify(ref, key.namespace) for ref in event.limit_ids)
    limits, unknown = applicable(snapshot.limits, subject, named)
    plan = plan_reservation(
        request_id=event.request_id, now=event.event_time, limits=limits, rate_limits=(),
        subject=subject, estimate_nanos=cost.total_nanos, estimate_tokens=event.usage.total,
        hold_seconds=hold_seconds,
    )
    return PricedEvent(event, cost, price is not None, model, user, plan, tuple(unknown),
                       {lim.name: lim.block for lim in limits})


def event_result(p: PricedEvent, statuses: tuple[LimitStatus, ...], duplicate: bool,
                 key_name: str) -> dict[str, object]:
    """The `xproxy_result` of an ingested event."""
    e = p.event
    warnings = [] if p.priced else ["unknown-model-priced-at-zero"]
    result: dict[str, object] = {
        "request_id": e.request_id,
        "model": e.resource,
        "key": key_name,
        "priced": p.priced,
        "resource_id": e.resource,
        "cost": {
            "currency": "usd",
            "input": {"base": nanos_to_usd(p.cost.input_nanos)},
            "output": {"base": nanos_to_usd(p.cost.output_nanos)},
            "total": {"base": nanos_to_usd(p.cost.total_nanos)},
        },
        "cost_nanos": {"input": p.cost.input_nanos, "output": p.cost.output_nanos,
                       "total": p.cost.total_nanos},
        "limits": limits_result(statuses, p.blocking),
        "unknown_limit_ids": list(p.unknown_limits),
        "unknown_units": {k: {"input": i, "output": o} for k, i, o in e.unknown_units},
        "duplicate_request": duplicate,
        "warnings": warnings,
    }
    states = {s.name: (s.state, s.spent_nanos, s.max_nanos) for s in statuses}
    return payi.complete_result(result, e.notes, p.user, e.request_tags, states)
