"""SSE splitting and stream metering, driven by the golden provider streams in tests/data.

Every expectation is derived from the stream bytes themselves (usage from the usage events, text
from the delta events), so the tests stay true if a golden file is re-recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.core.providers import parse_response_usage
from extproc.core.providers.anthropic import usage_from_anthropic
from extproc.core.providers.openai import usage_from_openai
from extproc.core.request import Endpoint
from extproc.core.sse import SseEvent, SseSplitter, parse_event
from extproc.core.streams import RESULT_COMMENT, StreamMeter
from extproc.core.usage import Usage

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent.parent / "data"

STREAMS = {
    Endpoint.CHAT: "openai_chat",
    Endpoint.MESSAGES: "anthropic_messages",
    Endpoint.RESPONSES: "openai_responses",
}
ENDPOINTS = list(STREAMS)
SPLIT_SIZES = [1, 2, 3, 7, 64, None]  # None: the whole stream in one chunk
METER_SIZES = [1, 3, 5, 13, 101, None]
RESULT = b'{"cost_usd":"0.001234","limits":[]}'
COMMENT = RESULT_COMMENT + RESULT + b"\n\n"


def stream_bytes(endpoint: Endpoint) -> bytes:
    return (DATA / f"{STREAMS[endpoint]}.stream.sse").read_bytes()


def chunks(data: bytes, size: int | None) -> Iterator[bytes]:
    if size is None:
        yield data
        return
    for i in range(0, len(data), size):
        yield data[i : i + size]


def blocks(data: bytes) -> list[bytes]:
    """The golden streams' events, split naively (they use LF and end with a blank line)."""
    assert data.endswith(b"\n\n")
    return [part + b"\n\n" for part in data[:-2].split(b"\n\n")]


def split_all(data: bytes, size: int | None) -> tuple[list[SseEvent], SseSplitter]:
    splitter = SseSplitter()
    events: list[SseEvent] = []
    for piece in chunks(data, size):
        events += splitter.feed(piece)
    return events, splitter


def golden_events(endpoint: Endpoint) -> list[SseEvent]:
    events, splitter = split_all(stream_bytes(endpoint), None)
    assert splitter.pending == b""
    return events


def doc(event: SseEvent) -> dict[str, Any]:
    value = orjson.loads(event.data)
    assert isinstance(value, dict)
    return value


def expected_usage(endpoint: Endpoint, events: list[SseEvent]) -> Usage | None:
    """The usage the stream reports, read straight from its JSON (None if not there yet)."""
    if endpoint is Endpoint.CHAT:
        found = [doc(e)["usage"] for e in events
                 if e.data != b"[DONE]" and isinstance(doc(e).get("usage"), dict)]
        return usage_from_openai(found[-1]) if found else None
    if endpoint is Endpoint.RESPONSES:
        found = [doc(e)["response"]["usage"] for e in events if e.event == "response.completed"]
        return usage_from_openai(found[-1]) if found else None
    starts = [doc(e)["message"]["usage"] for e in events if e.event == "message_start"]
    if not starts:
        return None
    usage = dict(starts[0])
    deltas = [doc(e)["usage"] for e in events if e.event == "message_delta"]
    if deltas:
        usage["output_tokens"] = deltas[-1]["output_tokens"]
    return usage_from_anthropic(usage)


def delta_chars(endpoint: Endpoint, events: list[SseEvent]) -> int:
    """Characters of answer text in the events' deltas."""
    total = 0
    for event in events:
        if endpoint is Endpoint.CHAT:
            if event.data == b"[DONE]":
                continue
            for choice in doc(event)["choices"]:
                total += len(choice["delta"].get("content") or "")
        elif endpoint is Endpoint.MESSAGES:
            if event.event == "content_block_delta":
                total += len(doc(event)["delta"]["text"])
        elif event.event.endswith(".delta"):
            total += len(doc(event)["delta"])
    return total


def terminator_at(endpoint: Endpoint, data: bytes) -> int:
    """Offset where the result comment goes: before the terminator, or at the end."""
    if endpoint is Endpoint.CHAT:
        return data.rindex(b"data: [DONE]")
    if endpoint is Endpoint.MESSAGES:
        return data.rindex(b"event: message_stop")
    return len(data)


def usage_event_raw(data: bytes) -> bytes:
    (raw,) = [b for b in blocks(data) if b'"choices":[]' in b and b'"usage":{' in b]
    return raw


def run(
    meter: StreamMeter, data: bytes, size: int | None, result: bytes | None
) -> tuple[bytes, list[int], list[bytes]]:
    """Feeds `data` the way the exchange does: closing(result) is sent right after the step
    that finished. Returns the client's bytes, the offsets fed when a step said finished, and
    every step's forward."""
    out: list[bytes] = []
    finished_at: list[int] = []
    forwards: list[bytes] = []
    fed = 0
    pieces = list(chunks(data, size))
    for i, piece in enumerate(pieces):
        fed += len(piece)
        step = meter.feed(piece, end_of_stream=i == len(pieces) - 1)
        out.append(step.forward)
        forwards.append(step.forward)
        if step.finished:
            finished_at.append(fed)
            out.append(meter.closing(result))
    return b"".join(out), finished_at, forwards


# ---- SseSplitter / parse_event ----------------------------------------------------------------


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_splitter_reassembles_golden_stream_for_any_chunking(
    endpoint: Endpoint, crlf: bool
) -> None:
    lf_data = stream_bytes(endpoint)
    data = _crlf(lf_data) if crlf else lf_data
    expected = blocks(lf_data)
    counts = set()
    for size in SPLIT_SIZES:
        events, splitter = split_all(data, size)
        assert b"".join(e.raw for e in events) + splitter.pending == data, size
        assert splitter.pending == b""
        counts.add(len(events))
        for event, block in zip(events, expected, strict=True):
            lines = block.rstrip(b"\n").split(b"\n")
            names = [line[len(b"event: "):] for line in lines if line.startswith(b"event: ")]
            datas = [line[len(b"data: "):] for line in lines if line.startswith(b"data: ")]
            assert event.event == (names[0].decode() if names else "")
            assert event.data == b"\n".join(datas)
            assert event.raw == (_crlf(block) if crlf else block)
    assert counts == {len(expected)}


@pytest.mark.parametrize("size", SPLIT_SIZES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_splitter_keeps_an_unterminated_tail_pending(endpoint: Endpoint, size: int | None) -> None:
    data = stream_bytes(endpoint) + b"event: partial\ndata: {\"a\":"
    events, splitter = split_all(data, size)
    assert len(events) == len(blocks(stream_bytes(endpoint)))
    assert b"".join(e.raw for e in events) + splitter.pending == data
    assert splitter.pending == b"event: partial\ndata: {\"a\":"
    assert splitter.take_rest() == b"event: partial\ndata: {\"a\":"
    assert splitter.pending == b""
    assert splitter.take_rest() == b""
    # The splitter is usable again after take_rest.
    assert [e.data for e in splitter.feed(b"data: x\n\n")] == [b"x"]


@pytest.mark.parametrize(
    ("raw", "event", "data"),
    [
        (b"data: hello\n\n", "", b"hello"),
        (b"event: ping\ndata: {}\n\n", "ping", b"{}"),
        (b"data: one\ndata: two\n\n", "", b"one\ntwo"),
        (b"event: e\r\ndata: one\r\ndata: two\r\n\r\n", "e", b"one\ntwo"),
        (b": a comment\ndata: x\n: another\n\n", "", b"x"),
        (b": only a comment\n\n", "", b""),
        (b"data:no-space\n\n", "", b"no-space"),
        (b"data:  two spaces\n\n", "", b" two spaces"),  # only one space is stripped
        (b"data\n\n", "", b""),  # a field without a colon has an empty value
        (b"data: a:b: c\n\n", "", b"a:b: c"),
        (b"id: 7\nretry: 100\ndata: x\n\n", "", b"x"),  # other fields ignored
        (b"data: \n\n", "", b""),
        (b"data: a\ndata:\ndata: b\n\n", "", b"a\n\nb"),
    ],
)
def test_parse_event(raw: bytes, event: str, data: bytes) -> None:
    parsed = parse_event(raw)
    assert parsed == SseEvent(raw, event, data)


@pytest.mark.parametrize("size", SPLIT_SIZES)
def test_splitter_mixed_events_crlf_comments_and_multiline_data(size: int | None) -> None:
    data = (
        b": keep-alive\n\n"
        b"event: a\r\ndata: one\r\ndata: two\r\n\r\n"
        b"data: {\"x\":1}\n\n"
        b"event: b\ndata: first\ndata: second\n\n"
        b"data: tail"
    )
    events, splitter = split_all(data, size)
    assert [(e.event, e.data) for e in events] == [
        ("", b""),
        ("a", b"one\ntwo"),
        ("", b'{"x":1}'),
        ("b", b"first\nsecond"),
    ]
    assert b"".join(e.raw for e in events) + splitter.pending == data
    assert splitter.take_rest() == b"data: tail"
    assert splitter.pending == b""


def test_splitter_terminator_straddling_chunks() -> None:
    for data in (b"data: x\r\n\r\n", b"data: x\n\n"):
        for cut in range(1, len(data)):
            splitter = SseSplitter()
            first = splitter.feed(data[:cut])
            second = splitter.feed(data[cut:])
            assert first == []
            assert [e.raw for e in second] == [data]
            assert splitter.pending == b""


# ---- StreamMeter: usage, finish, result comment ----------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_expected_usage_matches_the_non_streamed_response(endpoint: Endpoint) -> None:
    # Sanity check of the helper: the golden stream and response report the same usage.
    body = (DATA / f"{STREAMS[endpoint]}.response.json").read_bytes()
    assert expected_usage(endpoint, golden_events(endpoint)) == parse_response_usage(
        endpoint, body
    )


@pytest.mark.parametrize("hide", [False, True], ids=["keep", "hide"])
@pytest.mark.parametrize("size", METER_SIZES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_meter_reads_usage_for_any_chunking(
    endpoint: Endpoint, size: int | None, hide: bool
) -> None:
    data = stream_bytes(endpoint)
    meter = StreamMeter(endpoint, hide_usage_chunk=hide)
    run(meter, data, size, RESULT)
    assert meter.finished
    assert meter.usage == expected_usage(endpoint, golden_events(endpoint))
    assert meter.events == len(blocks(data))
    assert meter.output_chars == delta_chars(endpoint, golden_events(endpoint))


@pytest.mark.parametrize("size", METER_SIZES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_meter_inserts_result_comment_before_terminator(
    endpoint: Endpoint, size: int | None
) -> None:
    data = stream_bytes(endpoint)
    meter = StreamMeter(endpoint, hide_usage_chunk=False)
    out, finished_at, _ = run(meter, data, size, RESULT)
    assert finished_at == [len(data)]
    at = terminator_at(endpoint, data)
    expected = data[:at] + COMMENT + data[at:]
    if endpoint is Endpoint.CHAT:
        # The client asked for the usage chunk: it carries the result object too.
        raw = usage_event_raw(data)
        body = raw[len(b"data: "):].rstrip(b"\n")
        with_result = b"data: " + body[:-1] + b',"xproxy_result":' + RESULT + b"}\n\n"
        expected = expected.replace(raw, with_result)
    assert out == expected
    assert out.count(RESULT_COMMENT) == 1


@pytest.mark.parametrize("hide", [False, True], ids=["keep", "hide"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("size", METER_SIZES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_meter_without_result_is_byte_for_byte(
    endpoint: Endpoint, size: int | None, crlf: bool, hide: bool
) -> None:
    data = stream_bytes(endpoint)
    if crlf:
        data = _crlf(data)
    meter = StreamMeter(endpoint, hide_usage_chunk=hide)
    out, finished_at, _ = run(meter, data, size, None)
    assert finished_at == [len(data)]
    if hide and endpoint is Endpoint.CHAT:
        usage_raw = usage_event_raw(stream_bytes(endpoint))
        expected = stream_bytes(endpoint).replace(usage_raw, b"").replace(b',"usage":null', b"")
        assert out == (_crlf(expected) if crlf else expected)
    else:
        assert out == data
    assert meter.usage == expected_usage(endpoint, golden_events(endpoint))


@pytest.mark.parametrize("size", METER_SIZES)
@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.MESSAGES], ids=lambda e: e.value)
def test_meter_finishes_exactly_at_the_terminator(endpoint: Endpoint, size: int | None) -> None:
    data = stream_bytes(endpoint)
    trailer = b": after the end\n\ndata: more\n\n"
    stream = data + trailer
    meter = StreamMeter(endpoint, hide_usage_chunk=False)
    out: list[bytes] = []
    fed = 0
    finished_steps = []
    pieces = list(chunks(stream, size))
    for i, piece in enumerate(pieces):
        fed += len(piece)
        was_finished = meter.finished
        step = meter.feed(piece, end_of_stream=i == len(pieces) - 1)
        out.append(step.forward)
        if was_finished:
            assert step.forward == piece  # after the end: passed through untouched
            assert not step.finished
        if step.finished:
            finished_steps.append(fed)
            out.append(meter.closing(None))
        # finished flips on the step whose chunk completes the terminator, not before
        assert meter.finished == (fed >= len(data))
    ends = [sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]
    assert finished_steps == [next(n for n in ends if n >= len(data))]
    assert b"".join(out) == stream


@pytest.mark.parametrize("size", METER_SIZES)
def test_responses_finishes_only_at_end_of_stream(size: int | None) -> None:
    data = stream_bytes(Endpoint.RESPONSES)
    meter = StreamMeter(Endpoint.RESPONSES, hide_usage_chunk=False)
    forwarded = []
    for piece in chunks(data, size):
        step = meter.feed(piece, end_of_stream=False)
        assert not step.finished
        forwarded.append(step.forward)
    assert not meter.finished
    assert b"".join(forwarded) == data  # nothing held back
    step = meter.feed(b"", end_of_stream=True)
    assert step == type(step)(b"", True)
    assert meter.finished
    assert meter.closing(RESULT) == COMMENT


@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.MESSAGES], ids=lambda e: e.value)
def test_trailer_in_the_terminator_chunk_follows_the_result(endpoint: Endpoint) -> None:
    data = stream_bytes(endpoint)
    trailer = b": trailing comment\n\n: partial"
    meter = StreamMeter(endpoint, hide_usage_chunk=True)
    step = meter.feed(data + trailer, end_of_stream=False)
    assert step.finished
    closing = meter.closing(RESULT)
    assert closing.endswith(data[terminator_at(endpoint, data):] + trailer)
    later = meter.feed(b" comment\n\n: trailing after [DONE]\n\n", end_of_stream=True)
    assert later.forward == b" comment\n\n: trailing after [DONE]\n\n"
    assert not later.finished


def test_trailing_comment_after_done_passes_through() -> None:
    data = stream_bytes(Endpoint.CHAT)
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=False)
    assert meter.feed(data, end_of_stream=False).finished
    meter.closing(RESULT)
    for trailer in (b": trailing\n\n", b"data: {\"usage\":null}\n\n", b"garbage"):
        step = meter.feed(trailer, end_of_stream=False)
        assert step.forward == trailer
        assert not step.finished
    assert meter.feed(b"", end_of_stream=True).forward == b""
    assert meter.usage == expected_usage(Endpoint.CHAT, golden_events(Endpoint.CHAT))


@pytest.mark.parametrize("size", METER_SIZES)
def test_chat_cut_without_done_finishes_at_end_of_stream(size: int | None) -> None:
    data = stream_bytes(Endpoint.CHAT)
    cut = data[: data.rindex(b"data: [DONE]")] + b"data: {\"partial"
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=False)
    out, finished_at, _ = run(meter, cut, size, RESULT)
    assert finished_at == [len(cut)]
    # The held usage chunk (with the result), the comment, then the unterminated tail.
    raw = usage_event_raw(data)
    body = raw[len(b"data: "):].rstrip(b"\n")
    with_result = b"data: " + body[:-1] + b',"xproxy_result":' + RESULT + b"}\n\n"
    assert out == (
        cut[: cut.index(raw)] + with_result + COMMENT + b"data: {\"partial"
    )


# ---- hide_usage_chunk -----------------------------------------------------------------------


@pytest.mark.parametrize("size", METER_SIZES)
def test_hidden_usage_chunk_is_dropped_and_usage_still_read(size: int | None) -> None:
    data = stream_bytes(Endpoint.CHAT)
    usage_raw = usage_event_raw(data)
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=True)
    out, _, forwards = run(meter, data, size, RESULT)
    forwarded = b"".join(forwards)
    assert b'"usage":{' not in out
    assert b'"usage"' not in forwarded
    at = data.rindex(b"data: [DONE]")
    expected = (data[:at] + COMMENT + data[at:]).replace(usage_raw, b"")
    assert out == expected.replace(b',"usage":null', b"")
    assert meter.usage == usage_from_openai(orjson.loads(usage_raw[len(b"data: "):])["usage"])
    # Every forwarded chunk is still valid JSON.
    events, splitter = split_all(forwarded, None)
    assert splitter.pending == b""
    for event in events:
        assert "usage" not in doc(event)


def _synthetic_chat(include_usage: bool) -> bytes:
    chunk_docs: list[bytes] = [
        b'{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],'
        b'"usage":null}',
        b'{"usage":null,"id":"c1","choices":[{"index":0,"delta":{"content":"Hello"}}]}',
        b'{"id":"c1","usage":null,"choices":[{"index":0,"delta":{"content":" world"}}]}',
        b'{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}',
    ]
    if include_usage:
        chunk_docs.append(
            b'{"id":"c1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,'
            b'"total_tokens":15}}'
        )
    return b"".join(b"data: " + d + b"\n\n" for d in chunk_docs) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 4, 9, None])
def test_hide_strips_usage_null_members(size: int | None) -> None:
    data = _synthetic_chat(include_usage=True)
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=True)
    out, finished_at, _ = run(meter, data, size, None)
    assert finished_at == [len(data)]
    assert b"usage" not in out
    events, splitter = split_all(out, None)
    assert splitter.pending == b""
    assert events[-1].data == b"[DONE]"
    originals = [doc(e) for e in golden_like(data)[:-2]]
    for event, original in zip(events[:-1], originals, strict=True):
        parsed = doc(event)  # still valid JSON
        assert parsed == {k: v for k, v in original.items() if k != "usage"}
    assert meter.usage == Usage(input=12, output=3)


def golden_like(data: bytes) -> list[SseEvent]:
    events, _ = split_all(data, None)
    return events


@pytest.mark.parametrize("size", [1, 4, 9, None])
def test_keep_leaves_usage_null_members(size: int | None) -> None:
    data = _synthetic_chat(include_usage=False)
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=False)
    out, _, _ = run(meter, data, size, None)
    assert out == data
    assert meter.usage is None


@pytest.mark.parametrize("size", [1, 4, 9, None])
def test_kept_usage_chunk_carries_the_result(size: int | None) -> None:
    data = _synthetic_chat(include_usage=True)
    usage_raw = golden_like(data)[-2].raw
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=False)
    body_until_done = data[: data.rindex(b"data: [DONE]")]
    forwarded = b"".join(meter.feed(p, False).forward for p in chunks(body_until_done, size))
    assert forwarded == body_until_done.replace(usage_raw, b"")  # held back
    step = meter.feed(b"data: [DONE]\n\n", end_of_stream=True)
    assert step.finished and step.forward == b""
    closing = meter.closing(RESULT)
    events, splitter = split_all(closing, None)
    assert splitter.pending == b""
    assert [e.raw for e in events[1:]] == [COMMENT, b"data: [DONE]\n\n"]
    assert events[0].raw.startswith(b"data: ")
    with_result = doc(events[0])
    assert with_result.pop("xproxy_result") == orjson.loads(RESULT)
    assert with_result == orjson.loads(usage_raw[len(b"data: "):])
    assert meter.usage == Usage(input=12, output=3)


def test_held_usage_chunk_without_result_is_unchanged() -> None:
    data = _synthetic_chat(include_usage=True)
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=False)
    out, _, _ = run(meter, data, 7, None)
    assert out == data


# ---- usage_so_far -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, None])
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_usage_so_far_on_first_half(endpoint: Endpoint, size: int | None) -> None:
    events = golden_events(endpoint)
    half = events[: len(events) // 2]
    meter = StreamMeter(endpoint, hide_usage_chunk=False)
    for piece in chunks(b"".join(e.raw for e in half), size):
        assert not meter.feed(piece, end_of_stream=False).finished
    seen = math.ceil(delta_chars(endpoint, half) / 4)
    assert meter.output_chars == delta_chars(endpoint, half)
    reported = expected_usage(endpoint, half)
    if endpoint is Endpoint.MESSAGES:
        # message_start already carries the input (and a provisional output) count.
        assert reported is not None and meter.usage == reported
        assert meter.usage_so_far(999) == Usage(
            input=reported.input,
            output=max(reported.output, seen),
            cached_input=reported.cached_input,
            cache_write=reported.cache_write,
        )
    else:
        assert reported is None and meter.usage is None
        assert meter.usage_so_far(999) == Usage(input=999, output=seen)
        assert meter.usage_so_far(0) == Usage(input=0, output=seen)


def test_usage_so_far_without_usage_uses_estimate_and_text() -> None:
    # An Anthropic stream whose message_start has no usage: nothing reported at all.
    text = "x" * 9  # 9 characters -> 3 tokens (rounded up)
    data = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m"}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"' + text.encode() + b'"}}\n\n'
    )
    meter = StreamMeter(Endpoint.MESSAGES, hide_usage_chunk=False)
    meter.feed(data, end_of_stream=False)
    assert meter.usage is None
    assert meter.usage_so_far(40) == Usage(input=40, output=3)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.value)
def test_usage_so_far_after_usage_keeps_reported_numbers(endpoint: Endpoint) -> None:
    data = stream_bytes(endpoint)
    events = golden_events(endpoint)
    meter = StreamMeter(endpoint, hide_usage_chunk=True)
    meter.feed(data, end_of_stream=True)
    reported = expected_usage(endpoint, events)
    assert reported is not None
    seen = math.ceil(delta_chars(endpoint, events) / 4)
    got = meter.usage_so_far(7)
    assert got == Usage(
        input=reported.input,
        output=max(reported.output, seen),
        cached_input=reported.cached_input,
        cache_write=reported.cache_write,
        reasoning=reported.reasoning,
    )
    assert got.input != 7


def test_usage_so_far_output_never_below_text_seen() -> None:
    long_text = "y" * 41  # 41 characters -> 11 tokens, more than the 2 reported
    data = (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"' + long_text.encode()
        + b'"}}]}\n\n'
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    )
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=True)
    meter.feed(data, end_of_stream=False)
    assert meter.usage == Usage(input=5, output=2)
    assert meter.usage_so_far(100) == Usage(input=5, output=11)


def test_usage_so_far_zero_reported_input_falls_back_to_estimate() -> None:
    data = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":0,"completion_tokens":4}}\n\n'
    meter = StreamMeter(Endpoint.CHAT, hide_usage_chunk=False)
    meter.feed(data, end_of_stream=False)
    assert meter.usage_so_far(33) == Usage(input=33, output=4)


_LINE = st.sampled_from([b"data: x", b"data:y", b"data", b"event: e", b": note", b"data: {\"a\":1}",
                         b"id: 7", b""])
_END = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(st.lists(st.tuples(st.lists(st.tuples(_LINE, _END), max_size=4), _END), max_size=6),
       st.integers(min_value=1, max_value=9))
def test_one_event_chunks_parse_like_any_chunking(
        events: list[tuple[list[tuple[bytes, bytes]], bytes]], size: int) -> None:
    """The one-event-per-chunk fast path gives what splitting arbitrary chunks gives."""
    raws = [b"".join(line + end for line, end in lines) + end for lines, end in events]
    whole = SseSplitter()
    by_event = [e for raw in raws for e in whole.feed(raw)] + whole.feed(b"", final=True)
    data = b"".join(raws)
    by_piece, splitter = split_all(data, size)
    by_piece += splitter.feed(b"", final=True)
    assert [(e.raw, e.event, e.data) for e in by_event] == [
        (e.raw, e.event, e.data) for e in by_piece]
    assert whole.take_rest() == splitter.take_rest()
