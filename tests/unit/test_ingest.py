"""The ingest API's core: event checks, unit mapping, idempotent ids, limits and results."""

from __future__ import annotations

import orjson
import pytest

from extproc.core.decisions import Deny
from extproc.core.ingest import (
    MAX_BULK_EVENTS,
    Ingest,
    IngestEvent,
    event_id,
    ingest_kind,
    parse_event,
    parse_ingest,
)
from extproc.core.payi import NO_ANNOTATIONS, Annotations

pytestmark = pytest.mark.unit

NOW = 1_796_000_000.0
GOOD = {"category": "system.openai", "resource": "gpt-4o",
        "units": {"text": {"input": 100, "output": 20}, "text_cache_read": {"input": 30},
                  "text_cache_write": {"input": 5}, "image": {"input": 2, "output": 0}}}


def test_paths() -> None:
    assert ingest_kind("/api/v1/ingest") is False
    assert ingest_kind("/api/v1/ingest/bulk?x=1") is True
    assert ingest_kind("/api/v1/ingestx") is None and ingest_kind("/v1/chat/completions") is None


def test_units_map_to_tokens_and_unknown_kinds_are_reported() -> None:
    event = parse_event(GOOD, "k", NOW)
    assert isinstance(event, IngestEvent)
    assert (event.usage.input, event.usage.output) == (135, 20)
    assert (event.usage.cached_input, event.usage.cache_write) == (30, 5)
    assert event.unknown_units == (("image", 2, 0),)
    assert event.event_time == NOW and event.http_status == 200


def test_the_same_event_from_the_same_key_has_the_same_id() -> None:
    again = orjson.loads(orjson.dumps(GOOD))
    assert event_id("k", GOOD) == event_id("k", again)
    assert event_id("k", GOOD) != event_id("other", GOOD)
    assert event_id("k", GOOD) != event_id("k", {**GOOD, "resource": "gpt-4o-mini"})


def test_body_annotations_win_over_headers() -> None:
    event = parse_event({**GOOD, "use_case_name": "body"}, "k", NOW,
                        Annotations(use_case_name="header", account_name="acme"),
                        ("lim",), ("t",), "hu")
    assert isinstance(event, IngestEvent)
    assert event.notes.use_case_name == "body" and event.notes.account_name == "acme"
    assert event.limit_ids == ("lim",) and event.request_tags == ("t",) and event.user == "hu"


@pytest.mark.parametrize(("doc", "fragment"), [
    ({**GOOD, "category": ""}, "category"),
    ({**GOOD, "resource": 5}, "resource"),
    ({**GOOD, "units": {}}, "units"),
    ({**GOOD, "units": {"text": 3}}, "units.text"),
    ({**GOOD, "units": {"text": {"input": True}}}, "integer"),
    ({**GOOD, "event_timestamp": "2020-01-01T00:00:00Z"}, "7 days"),
    ({**GOOD, "use_case_name": "x" * 300}, "at most"),
    ({**GOOD, "limit_ids": "a"}, "array"),
    ({**GOOD, "http_status_code": 999}, "http_status_code"),
])
def test_bad_events_are_400_naming_the_field(doc: dict[str, object], fragment: str) -> None:
    refused = parse_event(doc, "k", NOW)
    assert isinstance(refused, Deny) and refused.status == 400
    assert fragment in refused.message


def test_bulk_keeps_good_events_and_lists_bad_ones() -> None:
    body = orjson.dumps([GOOD, {"category": "x"}, {**GOOD, "resource": "gpt-4o-mini"}])
    parsed = parse_ingest(body, True, "k", NOW, NO_ANNOTATIONS, (), (), "")
    assert isinstance(parsed, Ingest)
    assert [e.resource for e in parsed.events] == ["gpt-4o", "gpt-4o-mini"]
    assert [i for i, _ in parsed.refused] == [1]
    too_many = parse_ingest(orjson.dumps([GOOD] * (MAX_BULK_EVENTS + 1)), True, "k", NOW,
                            NO_ANNOTATIONS, (), (), "")
    assert isinstance(too_many, Deny)
    assert isinstance(parse_ingest(b"{}", True, "k", NOW, NO_ANNOTATIONS, (), (), ""), Deny)


def test_an_event_without_a_timestamp_is_recorded_at_its_first_arrival() -> None:
    from extproc.core.ingest import first_seen

    late = parse_event(GOOD, "k", NOW + 5 * 3600)  # a retry, five hours after the first try
    assert isinstance(late, IngestEvent) and not late.timed
    at_first = first_seen(late, int(NOW * 1000))
    assert at_first.event_time == NOW
    assert at_first.event_timestamp == parse_event(GOOD, "k", NOW).event_timestamp  # type: ignore[union-attr]
    assert at_first.request_id == late.request_id
    timed = parse_event({**GOOD, "event_timestamp": "2026-11-29T08:00:00Z"}, "k", NOW)
    assert isinstance(timed, IngestEvent) and timed.timed
