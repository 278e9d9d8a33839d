"""Accounting for streamed (SSE) responses, event by event, as they pass through.

`StreamMeter` sees every complete event once, in order, and decides what the client gets:

* usage is read as it goes by (OpenAI: the final usage chunk, or `usage` on `response.completed`
  for Responses; Anthropic: input from `message_start`, output from the last `message_delta`);
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

from dataclasses import dataclass
from typing import Any

import orjson

from extproc.core.request import Endpoint
from extproc.core.sse import SseEvent, SseSplitter
from extproc.core.usage import Usage, usage_from_anthropic, usage_from_openai

RESULT_COMMENT = b": xproxy_result "


@dataclass(frozen=True, slots=True)
class StreamStep:
    """What to send on now, and whether the stream reached its end (then: price, settle and
    append `StreamMeter.closing(...)`)."""

    forward: bytes
    finished: bool


class StreamMeter:
    def __init__(self, endpoint: Endpoint, hide_usage_chunk: bool) -> None:
        self.endpoint = endpoint
        self.hide_usage_chunk = hide_usage_chunk
        self.splitter = SseSplitter()
        self.usage: Usage | None = None
        self.output_chars = 0
        self.events = 0
        self.finished = False
        self._anthropic: dict[str, Any] = {}
        self._held_usage_chunk: bytes | None = None  # client asked for it: result goes in it
        self._terminator = b""

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, chunk: bytes, end_of_stream: bool) -> StreamStep:
        if self.finished:  # anything after the end passes through untouched
            return StreamStep(chunk + (self.splitter.take_rest() if end_of_stream else b""),
                              False)
        out: list[bytes] = []
        for event in self.splitter.feed(chunk, final=end_of_stream):
            self.events += 1
            if self.finished:
                self._terminator += event.raw
                continue
            kept = self._observe(event)
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
        if self._held_usage_chunk is not None:
            parts.append(_with_result(self._held_usage_chunk, result_json))
        if result_json is not None:
            parts.append(RESULT_COMMENT + result_json + b"\n\n")
        parts.append(self._terminator)
        parts.append(self.splitter.take_rest())
        return b"".join(parts)

    # -- reading events --------------------------------------------------------------------

    def _observe(self, event: SseEvent) -> bytes | None:
        if self.endpoint is Endpoint.MESSAGES:
            return self._anthropic_event(event)
        if self.endpoint is Endpoint.RESPONSES:
            return self._responses_event(event)
        return self._openai_chunk(event)

    def _openai_chunk(self, event: SseEvent) -> bytes | None:
        data = event.data
        if data.strip() == b"[DONE]":
            self.finished = True
            return None
        doc = _json(data)
        if doc is None:
            return event.raw
        usage = doc.get("usage")
        for choice in doc.get("choices") or ():
            if isinstance(choice, dict):
                delta = choice.get("delta")
                self.output_chars += _text_len(delta if delta is not None else choice)
        if isinstance(usage, dict):
            self.usage = usage_from_openai(usage)
            if not doc.get("choices"):
                if self.hide_usage_chunk:
                    return None  # the chunk only exists because Tollgate asked for it
                self._held_usage_chunk = event.raw
                return None
        if self.hide_usage_chunk and b'"usage":null' in event.raw:
            return event.raw.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
        return event.raw

    def _responses_event(self, event: SseEvent) -> bytes:
        name = event.event
        if name == "response.output_text.delta" or name.endswith(".delta"):
            doc = _json(event.data)
            if doc is not None and isinstance(doc.get("delta"), str):
                self.output_chars += len(doc["delta"])
        elif name in ("response.completed", "response.incomplete", "response.failed"):
            doc = _json(event.data)
            response = doc.get("response") if doc else None
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self.usage = usage_from_openai(response["usage"])
        return event.raw

    def _anthropic_event(self, event: SseEvent) -> bytes | None:
        name = event.event
        if name == "message_stop":
            self.finished = True
            return None
        if name in ("message_start", "message_delta", "content_block_delta"):
            doc = _json(event.data)
            if doc is None:
                return event.raw
            if name == "content_block_delta":
                self.output_chars += _text_len(doc.get("delta"))
            else:
                message = doc.get("message") if name == "message_start" else doc
                usage = message.get("usage") if isinstance(message, dict) else None
                if isinstance(usage, dict):
                    # Later events carry cumulative counts: newer values replace older ones.
                    self._anthropic.update({k: v for k, v in usage.items() if v is not None})
                    self.usage = usage_from_anthropic(self._anthropic)
        return event.raw

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


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _text_len(delta: Any) -> int:
    """Characters of generated text in a delta: content, text, reasoning, tool arguments."""
    if not isinstance(delta, dict):
        return 0
    total = 0
    for key in ("content", "text", "reasoning_content", "thinking", "partial_json", "refusal"):
        value = delta.get(key)
        if isinstance(value, str):
            total += len(value)
    for call in delta.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            args = call["function"].get("arguments")
            if isinstance(args, str):
                total += len(args)
    return total


def _with_result(raw_event: bytes, result_json: bytes | None) -> bytes:
    """The usage chunk with `"xproxy_result": ...` added to its JSON object."""
    if result_json is None:
        return raw_event
    head, sep, data = raw_event.partition(b"data: ")
    body = data.rstrip()
    if not sep or not body.endswith(b"}"):
        return raw_event
    return head + sep + body[:-1] + b',"xproxy_result":' + result_json + b"}\n\n"
