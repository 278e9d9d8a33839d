"""Property tests (hypothesis) for the pure core where hand-picked cases cannot cover the space:
SSE splitting and stream metering under any chunking and any mix of line endings, request
parsing of arbitrary JSON, and the result-object splice.

Example counts are modest so the suite stays fast; a failure prints the smallest input found.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.core.decisions import Deny
from extproc.core.request import Endpoint, RequestFacts, Route, parse_request
from extproc.core.result import RESULT_FIELD, splice_result
from extproc.core.sse import SseSplitter
from extproc.core.streams import StreamMeter

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent.parent / "data"
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

LINE_ENDS = (b"\n", b"\r\n", b"\r")


def with_line_ends(lines: list[bytes], ends: list[bytes]) -> bytes:
    """`lines` joined, each followed by its line end. A lone CR directly followed by an LF would
    read as one CRLF (SSE says so), so an LF after a CR becomes a CRLF."""
    out, previous = [], b""
    for line, end in zip(lines, ends, strict=True):
        if not line and previous == b"\r" and end == b"\n":
            end = b"\r\n"
        out += [line, end]
        previous = end
    return b"".join(out)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---- SSE splitting ----------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
               max_size=12).map(lambda s: s.encode())
FIELD = st.one_of(
    st.tuples(st.just(b"data"), TEXT),
    st.tuples(st.just(b"event"), TEXT.filter(lambda t: not t.startswith(b" "))),
    st.tuples(st.just(b""), TEXT),  # a comment line
    st.tuples(st.just(b"id"), TEXT),
)
EVENTS = st.lists(st.lists(FIELD, min_size=1, max_size=4), max_size=6)


@FAST
@given(events=EVENTS, data=st.data())
def test_sse_events_are_the_same_under_any_chunking_and_line_ends(
    events: list[list[tuple[bytes, bytes]]], data: st.DataObject
) -> None:
    lines: list[bytes] = []
    expected: list[tuple[str, bytes]] = []
    for fields in events:
        name, payload = "", []
        for field, value in fields:
            lines.append(field + b": " + value if field else b":" + value)
            if field == b"data":
                payload.append(value)
            elif field == b"event":
                name = value.decode()
        lines.append(b"")  # the empty line that ends the event
        expected.append((name, b"\n".join(payload)))
    tail = data.draw(st.sampled_from([b"", b"data: unfinished"]), label="tail")
    ends = data.draw(st.lists(st.sampled_from(LINE_ENDS), min_size=len(lines),
                              max_size=len(lines)), label="line ends")
    stream = with_line_ends(lines, ends) + tail
    pieces = cut(stream, data.draw(st.lists(st.integers(0, 10_000), max_size=12), label="cuts"))

    splitter = SseSplitter()
    seen = [event for i, piece in enumerate(pieces)
            for event in splitter.feed(piece, final=i == len(pieces) - 1)]
    assert [(e.event, e.data) for e in seen] == expected
    assert b"".join(e.raw for e in seen) + splitter.pending == stream  # not a byte lost
    assert splitter.take_rest() == tail


# ---- stream metering --------------------------------------------------------------------------

GOLDEN_STREAMS = {
    Endpoint.CHAT: "openai_chat",
    Endpoint.MESSAGES: "anthropic_messages",
    Endpoint.RESPONSES: "openai_responses",
}
RESULT = b'{"cost":"0.000123"}'


def meter(endpoint: Endpoint, pieces: list[bytes], hide: bool) -> tuple[Any, int, bytes]:
    m = StreamMeter(endpoint, hide_usage_chunk=hide)
    out = b""
    for i, piece in enumerate(pieces):
        step = m.feed(piece, end_of_stream=i == len(pieces) - 1)
        out += step.forward
        if step.finished:
            out += m.closing(RESULT)
            break
    return m.usage, m.output_chars, out


def events_of(stream: bytes) -> list[tuple[str, bytes]]:
    """The (event, data) pairs a client's SSE parser sees in `stream`."""
    splitter = SseSplitter()
    events = splitter.feed(stream, final=True)
    assert splitter.pending == b""
    return [(e.event, e.data) for e in events]


@FAST
@given(endpoint=st.sampled_from(list(GOLDEN_STREAMS)), hide=st.booleans(), data=st.data())
def test_stream_metering_is_the_same_under_any_chunking_and_line_ends(
    endpoint: Endpoint, hide: bool, data: st.DataObject
) -> None:
    golden = (DATA / f"{GOLDEN_STREAMS[endpoint]}.stream.sse").read_bytes()
    lines = golden.split(b"\n")[:-1]  # every line of the golden file ends in LF
    ends = data.draw(st.lists(st.sampled_from(LINE_ENDS), min_size=len(lines),
                              max_size=len(lines)), label="line ends")
    stream = with_line_ends(lines, ends)
    pieces = cut(stream, data.draw(st.lists(st.integers(0, 10_000), max_size=25), label="cuts"))

    usage, chars, out = meter(endpoint, pieces, hide)
    golden_usage, golden_chars, golden_out = meter(endpoint, [golden], hide)
    assert usage == golden_usage and usage is not None
    assert chars == golden_chars > 0
    # The client receives the same events (line ends aside) and the result, exactly once.
    assert events_of(out) == events_of(golden_out)
    assert out.count(RESULT) == golden_out.count(RESULT) >= 1


# ---- request parsing --------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8),
                    st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
FIELDS = ["model", "messages", "prompt", "input", "instructions", "system", "max_tokens",
          "max_completion_tokens", "max_output_tokens", "stream", "stream_options", "user",
          "metadata", "previous_response_id", "content", "text", "type"]
REQUEST = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8)
ROUTES = st.one_of(st.builds(Route, st.sampled_from(list(Endpoint))),
                   st.builds(Route, st.sampled_from(list(Endpoint)), st.just("my-deployment")))


def check_outcome(outcome: RequestFacts | Deny) -> None:
    if isinstance(outcome, Deny):
        assert 400 <= outcome.status < 500
        assert orjson.loads(outcome.body())["error"]["message"]  # a clear JSON error
    else:
        assert isinstance(outcome, RequestFacts)
        assert outcome.prompt_chars >= 0 and outcome.prompt_tokens_estimate >= 0


@FAST
@given(route=ROUTES, doc=st.one_of(REQUEST, JSON))
@example(route=Route(Endpoint.CHAT), doc={"model": "m", "messages": [[[[[]]]]]})
def test_parse_request_answers_any_json_with_facts_or_a_4xx(route: Route, doc: Any) -> None:
    check_outcome(parse_request(route, json.dumps(doc).encode()))


@FAST
@given(route=ROUTES, body=st.binary(max_size=64))
def test_parse_request_answers_any_bytes_with_facts_or_a_4xx(route: Route, body: bytes) -> None:
    check_outcome(parse_request(route, body))


@pytest.mark.parametrize("depth", [100, 999, 1023])
def test_parse_request_refuses_deep_nesting_cleanly(depth: int) -> None:
    """orjson accepts 1024 levels; counting prompt text must not overflow Python's stack."""
    body = b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}"
    check_outcome(parse_request(Route(Endpoint.CHAT), body))


# ---- the result-object splice -----------------------------------------------------------------

RESULTS = st.dictionaries(st.text(max_size=6), JSON, max_size=4)
LAYOUTS = st.sampled_from([
    lambda d: orjson.dumps(d),
    lambda d: json.dumps(d).encode(),
    lambda d: json.dumps(d, indent=2).encode() + b"\n",
    lambda d: b"  " + json.dumps(d, separators=(" , ", " : ")).encode() + b" \r\n",
])


@FAST
@given(body_doc=st.dictionaries(st.text(max_size=8).filter(lambda k: k != RESULT_FIELD), JSON,
                                max_size=6),
       result=RESULTS, layout=LAYOUTS)
def test_result_splice_round_trips(body_doc: dict[str, Any], result: dict[str, Any],
                                   layout: Any) -> None:
    body = layout(body_doc)
    spliced = splice_result(body, result)
    assert spliced is not None
    assert json.loads(spliced) == {**body_doc, RESULT_FIELD: result}
    # The provider's bytes are kept as they were, up to their closing brace.
    head = body.rstrip()[:-1].rstrip()
    assert spliced.startswith(head)


@FAST
@given(doc=JSON.filter(lambda d: not isinstance(d, dict)), result=RESULTS)
def test_result_splice_leaves_non_objects_alone(doc: Any, result: dict[str, Any]) -> None:
    assert splice_result(json.dumps(doc).encode(), result) is None
