"""Word-list policies on a streamed (SSE) answer: redact or block as the text goes by.

The answer's text arrives in deltas, and a phrase may straddle any number of them. Each channel
(chat/completions choice index, Anthropic content block, Responses output item) is its own text
with its own commit point; one chunk may carry deltas of several choices (n > 1), each read.
Below, "the held text" is that of one channel. `StreamGuard` holds back complete events (never
partial ones: `StreamMeter` forwards whole events only) until the text they carry can no longer
be part of a match it has not seen yet: that is everything but the last `longest phrase`
characters (whitespace runs counting as one, as the matcher squeezes them). Text before that
commit point is final: each match starting there lies wholly inside the buffer, with its right-
hand word boundary known, so it is counted once, redacted in the events that carry it (the
replacement goes to the event where the match starts, the other pieces are emptied), and those
events are released (an event once every text it carries is committed), re-serialised only when
their text changed. Events without text (role, finish, usage) keep their place in the queue, so
the client sees the original order.

A block rule ends the client's stream with one error event; the rest of the provider's stream
is metered (it is billed) but not forwarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.core.policy.engine import RESPONSE, CompiledPolicy, Hit, Refusal
from extproc.core.policy.matching import Match, tail_start
from extproc.core.sse import SseEvent, SseSplitter


@dataclass(slots=True)
class _Piece:
    path: tuple[Any, ...]  # where the text sits in the event's document
    text: str
    channel: Any  # choice index, content block, output item: each is its own text


@dataclass(slots=True)
class _Held:
    event: SseEvent
    doc: dict[str, Any] | None  # parsed when it carries text
    pieces: list[_Piece]
    changed: bool = False

    def raw(self) -> bytes:
        if not self.changed or self.doc is None:
            return self.event.raw
        for piece in self.pieces:
            container: Any = self.doc
            for step in piece.path[:-1]:
                container = container[step]
            container[piece.path[-1]] = piece.text
        head = f"event: {self.event.event}\n".encode() if self.event.event else b""
        return head + b"data: " + orjson.dumps(self.doc) + b"\n\n"


def _text_of(endpoint: str, event: SseEvent) -> tuple[dict[str, Any] | None, list[_Piece]]:
    """(doc, the delta texts it carries, one per channel) of one event; no pieces when none."""
    if endpoint == "messages":
        if event.event != "content_block_delta":
            return None, []
        doc = _json(event.data)
        delta = doc.get("delta") if doc else None
        if doc and isinstance(delta, dict) and isinstance(delta.get("text"), str):
            return doc, [_Piece(("delta", "text"), delta["text"], doc.get("index"))]
        return None, []
    if endpoint == "responses":
        if event.event != "response.output_text.delta":
            return None, []
        doc = _json(event.data)
        if doc and isinstance(doc.get("delta"), str):
            channel = (doc.get("item_id"), doc.get("content_index"))
            return doc, [_Piece(("delta",), doc["delta"], channel)]
        return None, []
    if b'"choices"' not in event.data:
        return None, []
    doc = _json(event.data)
    choices = doc.get("choices") if doc else None
    if not doc or not isinstance(choices, list):
        return None, []
    pieces = []
    for position, choice in enumerate(choices):  # n > 1: every choice is read
        if not isinstance(choice, dict):
            continue
        channel = choice.get("index", position)
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            pieces.append(_Piece(("choices", position, "delta", "content"), delta["content"],
                                 channel))
        elif isinstance(choice.get("text"), str):  # completions
            pieces.append(_Piece(("choices", position, "text"), choice["text"], channel))
    return (doc, pieces) if pieces else (None, [])


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
    # Per channel: matches starting before this offset of its held text were handled.
    done: dict[Any, int] = field(default_factory=dict)
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
            doc, pieces = _text_of(self.endpoint, event)
            self.held.append(_Held(event, doc, pieces))
        out = self._commit(finished)
        if self.blocked is not None:
            return self._error_event()
        return out

    def _pieces(self, channel: Any) -> list[tuple[_Held, _Piece]]:
        return [(h, p) for h in self.held for p in h.pieces if p.channel == channel]

    def _commit(self, finished: bool) -> bytes:
        # Each channel (choice, content block, output item) is its own text, with its own
        # commit point: a phrase split across deltas of one choice matches, one split across
        # two choices does not, and a redaction rewrites the choice that carried the match.
        channels: list[Any] = []
        for held in self.held:
            for piece in held.pieces:
                if piece.channel not in channels:
                    channels.append(piece.channel)
        highs: dict[Any, int] = {}
        for channel in channels:
            buffer = "".join(p.text for _, p in self._pieces(channel))
            low = self.done.get(channel, 0)
            high = len(buffer) if finished else max(low, tail_start(buffer, self.longest))
            if high > low:
                for policy in self.policies:
                    low, high = self._apply(policy, channel, low, high)
                    if self.blocked is not None:
                        return b""
            highs[channel] = high
        # Release every event whose texts all end at or before their channel's commit point.
        out = []
        positions: dict[Any, int] = {}
        released = 0
        for held in self.held:
            ends = dict(positions)
            for piece in held.pieces:
                ends[piece.channel] = ends.get(piece.channel, 0) + len(piece.text)
            if not finished and any(ends[p.channel] > highs[p.channel] for p in held.pieces):
                break
            out.append(held.raw())
            positions = ends
            released += 1
        del self.held[:released]
        self.done = {c: max(0, highs[c] - positions.get(c, 0)) for c in channels
                     if any(p.channel == c for h in self.held for p in h.pieces)}
        return b"".join(out)

    def _apply(self, policy: CompiledPolicy, channel: Any, low: int,
               high: int) -> tuple[int, int]:
        """Count and redact the matches of one policy that start in [low, high) of one
        channel's text; return the same two points in the text as it is after the redaction."""
        side = policy.sides[RESPONSE]
        pieces = self._pieces(channel)
        buffer = "".join(p.text for _, p in pieces)
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
        _redact(pieces, spans, policy.redaction)
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


def _redact(pieces: list[tuple[_Held, _Piece]], spans: list[tuple[int, int]],
            replacement: str) -> None:
    position = 0
    for held, piece in pieces:
        start, end = position, position + len(piece.text)
        position = end
        cuts = [(max(s, start) - start, min(e, end) - start, s >= start)
                for s, e in spans if s < end and e > start]
        if not cuts:
            continue
        text = piece.text
        for a, b, owns_start in reversed(cuts):
            text = text[:a] + (replacement if owns_start else "") + text[b:]
        piece.text, held.changed = text, True


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
