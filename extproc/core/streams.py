"""Accounting for streamed (SSE) responses, event by event, as they pass through.

`StreamMeter` sees every complete event once, in order, and decides what the client gets:

* usage is read as it goes by, by the provider's `StreamReader` (core/providers/), which also
  says which event is the terminator;
* the text of the answer is counted too, so a stream cut short (client gone, upstream reset)
  is priced on what was actually produced, never at zero;
* when Tollgate turned `stream_options.include_usage` on for a client that had not asked, the
  extra usage chunk is dropped (and the `"usage":null` members the option adds to every chunk),
  so that client's stream looks exactly as it asked;
* the end of the stream (`data: [DONE]` / `event: message_stop`, or the end of the body) is
  held back until the call is priced, so the result can go in front of it.

Only complete events are forwarded: a partial event at a chunk's end waits for the rest, so what
the client receives is the same bytes, possibly re-chunked on event boundaries.
"""

from __future__ import annotations

import orjson

from extproc.core import providers
from extproc.core.providers.base import Endpoint
from extproc.core.sse import SseEvent, SseSplitter
from extproc.core.usage import Usage
from extproc.core.values import value_type

RESULT_COMMENT = b": xproxy_result "
_RESULT_MEMBER = b'"xproxy_result"'


@value_type
class StreamStep:
    """What to send on now, and whether the stream reached its end (then: price, settle and
    append `StreamMeter.closing(...)`)."""

    forward: bytes
    finished: bool


class StreamMeter:
    def __init__(self, endpoint: Endpoint, hide_usage_chunk: bool,
                 proxied: bool = False) -> None:
        self.endpoint = endpoint
        self.hide_usage_chunk = hide_usage_chunk
        # Another Tollgate answers (a credential's baseUrl): its result is not this one's.
        self.proxied = proxied
        self.splitter = SseSplitter()
        # The provider's reader of this endpoint's events (core/providers/).
        self.reader = providers.owner(endpoint).stream_reader(endpoint, hide_usage_chunk)
        self.events = 0
        self.finished = False
        self._terminator = b""

    @property
    def usage(self) -> Usage | None:
        """The usage the stream reported so far, if any."""
        return self.reader.usage

    @property
    def output_chars(self) -> int:
        return self.reader.output_chars

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, chunk: bytes, end_of_stream: bool) -> StreamStep:
        if self.finished:  # anything after the end passes through untouched
            return StreamStep(chunk + (self.splitter.take_rest() if end_of_stream else b""),
                              False)
        out: list[bytes] = []
        for parsed in self.splitter.feed(chunk, final=end_of_stream):
            event = _without_inner_result(parsed) if self.proxied else parsed
            if event is None:
                continue
            self.events += 1
            if self.finished:
                self._terminator += event.raw
                continue
            kept, self.finished = self.reader.observe(event)
            if self.finished:
                self._terminator += event.raw  # the terminator itself waits for the result
            elif kept is not None:
                out.append(kept)
        if end_of_stream and not self.finished:
            self.finished = True
            self._terminator += self.splitter.take_rest()
        return StreamStep(b"".join(out), self.finished)

    def closing(self, result_json: bytes | None) -> bytes:
        """The bytes that end the stream: the held usage chunk (with the result object in it),
        the result as an SSE comment, then the terminator and anything after it."""
        parts = []
        held = self.reader.held_usage_chunk
        if held is not None:
            parts.append(_with_result(held, result_json))
        if result_json is not None and self.reader.result_comment:
            parts.append(RESULT_COMMENT + result_json + b"\n\n")
        parts.append(self._terminator)
        parts.append(self.splitter.take_rest())
        return b"".join(parts)

    # -- when the stream did not finish ----------------------------------------------------

    def usage_so_far(self, prompt_tokens_estimate: int) -> Usage:
        """Best knowledge of a stream cut short: reported usage if any, else the prompt
        estimate and the text seen (~4 characters per token, rounded up)."""
        seen_output = (self.output_chars + 3) // 4
        if self.usage is not None:
            return Usage(
                input=self.usage.input or prompt_tokens_estimate,
                output=max(self.usage.output, seen_output),
                cached_input=self.usage.cached_input,
                cache_write=self.usage.cache_write,
                reasoning=self.usage.reasoning,
                cache_write_1h=self.usage.cache_write_1h,
            )
        return Usage(input=prompt_tokens_estimate, output=seen_output)


def _with_result(raw_event: bytes, result_json: bytes | None) -> bytes:
    """The usage chunk with `"xproxy_result": ...` added to its JSON object."""
    if result_json is None:
        return raw_event
    head, sep, data = raw_event.partition(b"data: ")
    body = data.rstrip()
    if not sep or not body.endswith(b"}"):
        return raw_event
    return head + sep + body[:-1] + b',"xproxy_result":' + result_json + b"}\n\n"


def _without_inner_result(event: SseEvent) -> SseEvent | None:
    """An event of another Tollgate's stream without that gateway's result: its result comment
    dropped (None), its `xproxy_result` member taken out of the chunk that carries it."""
    if event.raw.startswith(RESULT_COMMENT):
        return None
    if _RESULT_MEMBER not in event.data:
        return event
    try:
        doc = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return event
    if not isinstance(doc, dict) or "xproxy_result" not in doc:
        return event
    del doc["xproxy_result"]
    data = orjson.dumps(doc)
    head = f"event: {event.event}\n".encode() if event.event else b""
    return SseEvent(head + b"data: " + data + b"\n\n", event.event, data)
