"""Word-list policies on a streamed (SSE) answer: redact or block as the text goes by.

The answer's text arrives in deltas, one per event, and a phrase may straddle any number of
them. `StreamGuard` holds back complete events (never partial ones: `StreamMeter` forwards
whole events only) until the text they carry can no longer be part of a match it has not seen
yet: that is everything but the last `longest phrase` characters. Text before that commit point
is final: each match starting there lies wholly inside the buffer, with its right-hand word
boundary known, so it is counted once, redacted in the events that carry it (the replacement
goes to the event where the match starts, the other pieces are emptied), and those events are
released, re-serialised only when their text changed. Events without text (role, finish, usage)
keep their place in the queue, so the client sees the original order.

A block rule ends the client's stream with one error event; the rest of the provider's stream
is metered (it is billed) but not forwarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.core.policy.engine import RESPONSE, CompiledPolicy, Hit, Refusal
from extproc.core.policy.matching import Match
from extproc.core.sse import SseEvent, SseSplitter


@dataclass(slots=True)
class _Held:
    event: SseEvent
    doc: dict[str, Any] | None  # parsed when it carries text
    path: tuple[Any, ...]  # where the text sits in `doc`
    text: str
    changed: bool = False

    def raw(self) -> bytes:
        if not self.changed or self.doc is None:
            return self.event.raw
        container: Any = self.doc
        for step in self.path[:-1]:
            container = container[step]
        container[self.path[-1]] = self.text
        head = f"event: {self.event.event}\n".encode() if self.event.event else b""
        return head + b"data: " + orjson.dumps(self.doc) + b"\n\n"


def _text_of(endpoint: str, event: SseEvent) -> tuple[dict[str, Any] | None, tuple[Any, ...],
                                                       str, Any]:
    """(doc, path to the delta text, text, channel) of one event; ("" text) when none."""
    if endpoint == "messages":
        if event.event != "content_block_delta":
            return None, (), "", None
        doc = _json(event.data)
        delta = doc.get("delta") if doc else None
        if doc and isinstance(delta, dict) and isinstance(delta.get("text"), str):
            return doc, ("delta", "text"), delta["text"], doc.get("index")
        return None, (), "", None
    if endpoint == "responses":
        if event.event != "response.output_text.delta":
            return None, (), "", None
        doc = _json(event.data)
        if doc and isinstance(doc.get("delta"), str):
            return doc, ("delta",), doc["delta"], (doc.get("item_id"), doc.get("content_index"))
        return None, (), "", None
    if b'"choices"' not in event.data:
        return None, (), "", None
    doc = _json(event.data)
    choices = doc.get("choices") if doc else None
    if not doc or not isinstance(choices, list) or len(choices) != 1:
        return None, (), "", None  # several choices in one chunk: rare; passes unread
    choice = choices[0]
    if not isinstance(choice, dict):
        return None, (), "", None
    delta = choice.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("content"), str):
        return doc, ("choices", 0, "delta", "content"), delta["content"], choice.get("index")
    if isinstance(choice.get("text"), str):  # completions
        return doc, ("choices", 0, "text"), choice["text"], choice.get("index")
    return None, (), "", None


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


@dataclass(slots=True)
class StreamGuard:
    endpoint: str
    policies: Sequence[CompiledPolicy]
    anthropic_style: bool
    held: list[_Held] = field(default_factory=list)
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    blocked: Refusal | None = None
    done: int = 0  # matches starting before this offset of the held text were handled
    splitter: SseSplitter = field(default_factory=SseSplitter)

    @classmethod
    def for_policies(cls, endpoint: str, policies: Sequence[CompiledPolicy],
                     anthropic_style: bool) -> StreamGuard | None:
        active = [p for p in policies if RESPONSE in p.sides]
        return cls(endpoint, active, anthropic_style) if active else None

    @property
    def longest(self) -> int:
        return max(p.sides[RESPONSE].matcher.longest for p in self.policies)

    def hits(self) -> tuple[Hit, ...]:
        return tuple(Hit(policy, rule, action, RESPONSE, count)
                     for (policy, rule, action), count in self.counts.items())

    def feed(self, data: bytes, finished: bool) -> bytes:
        """Complete events in (what `StreamMeter` forwards), events to send now out."""
        if self.blocked is not None:
            return b""
        for event in self.splitter.feed(data):
            doc, path, text, _channel = _text_of(self.endpoint, event)
            self.held.append(_Held(event, doc, path, text))
        out = self._commit(finished)
        if self.blocked is not None:
            return self._error_event()
        return out

    def _commit(self, finished: bool) -> bytes:
        # Texts of all channels (choices, content blocks) are joined in arrival order; a
        # phrase split across two choices' deltas would match, a rare and harmless excess.
        buffer_len = sum(len(h.text) for h in self.held)
        low = self.done
        high = buffer_len if finished else max(low, buffer_len - self.longest)
        if high > low:
            for policy in self.policies:
                low, high = self._apply(policy, low, high)
                if self.blocked is not None:
                    return b""
        # Release every event that ends at or before the commit point.
        out = []
        position = 0
        released = 0
        for held in self.held:
            end = position + len(held.text)
            if end > high and not finished:
                break
            out.append(held.raw())
            position = end
            released += 1
        del self.held[:released]
        self.done = max(0, high - position)
        return b"".join(out)

    def _apply(self, policy: CompiledPolicy, low: int, high: int) -> tuple[int, int]:
        """Count and redact the matches of one policy that start in [low, high); return the
        same two points in the text as it is after the redaction."""
        side = policy.sides[RESPONSE]
        buffer = "".join(h.text for h in self.held)
        matches = [m for m in side.matcher.find(buffer) if low <= m.start < high]
        to_redact: list[Match] = []
        for match in matches:
            owners = side.owners[match.phrase]
            for index in owners:
                rule = policy.rules[index]
                key = (policy.id, rule.name, rule.action)
                self.counts[key] = self.counts.get(key, 0) + 1
                if rule.action == "block":
                    self.blocked = Refusal(policy.id, rule.name,
                                           f"the response matches word list '{rule.name}'")
                    return low, high
            if any(policy.rules[i].action == "redact" for i in owners):
                to_redact.append(match)
        if not to_redact:
            return low, high
        spans = _merge(sorted((m.start, m.end) for m in to_redact))
        self._redact(spans, policy.redaction)
        size = len(policy.redaction)

        def moved(x: int) -> int:
            shift = 0
            for s, e in spans:
                if e <= x:
                    shift += size - (e - s)
                elif s < x:  # inside a redacted span: just after its replacement
                    return s + shift + size
            return x + shift

        return moved(low), moved(high)

    def _redact(self, spans: list[tuple[int, int]], replacement: str) -> None:
        position = 0
        for held in self.held:
            start, end = position, position + len(held.text)
            position = end
            pieces = [(max(s, start) - start, min(e, end) - start, s >= start)
                      for s, e in spans if s < end and e > start]
            if not pieces:
                continue
            text = held.text
            for a, b, owns_start in reversed(pieces):
                text = text[:a] + (replacement if owns_start else "") + text[b:]
            held.text, held.changed = text, True

    def _error_event(self) -> bytes:
        assert self.blocked is not None
        message = (f"Response withheld by policy '{self.blocked.policy}' (rule "
                   f"'{self.blocked.rule}'): {self.blocked.reason}.")
        error = {"message": message, "type": "invalid_request_error",
                 "code": "policy_violation", "policy": self.blocked.policy,
                 "rule": self.blocked.rule}
        self.held.clear()
        if self.anthropic_style:
            return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": error}) \
                + b"\n\n"
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
