"""Incremental Server-Sent Events splitting: bytes in, complete events out.

Provider streams arrive in arbitrary chunks; an event may straddle any number of them. The
splitter keeps only the incomplete tail of the stream and remembers how far it has already
scanned, so a long event arriving in tiny pieces costs linear, not quadratic, time.

Lines end in CRLF, LF or a lone CR, mixed freely (the SSE specification allows all three); an
event ends at an empty line.
"""

from __future__ import annotations

import re

from extproc.core.values import value_type

_LINE_END = re.compile(rb"\r\n|\r|\n")
# Two line ends in a row: the end of an event's last line, then an empty line. A CR followed
# by LF is one line end, never a line end and an empty line.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


@value_type
class SseEvent:
    raw: bytes  # the event's exact bytes, blank-line terminator included
    event: str  # the `event:` field, "" when absent
    data: bytes  # the `data:` lines joined with "\n"


def parse_event(raw: bytes) -> SseEvent:
    # Nearly every event of a provider's stream is one `data:` line ended by LF LF: read it
    # without splitting into lines (this runs once per event of every stream).
    if (raw.startswith(b"data:") and raw.endswith(b"\n\n") and raw.find(b"\n") == len(raw) - 2
            and b"\r" not in raw):
        value = raw[5:-2]
        return SseEvent(raw, "", value[1:] if value.startswith(b" ") else value)
    name = ""
    data: list[bytes] = []
    for line in _LINE_END.split(raw):
        if not line or line.startswith(b":"):
            continue  # blank separator or comment
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return SseEvent(raw, name, b"\n".join(data))


class SseSplitter:
    def __init__(self) -> None:
        self._buffer = b""
        self._scanned = 0  # bytes of the buffer known to hold no event terminator

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a complete event."""
        return self._buffer

    def feed(self, chunk: bytes, final: bool = False) -> list[SseEvent]:
        """Complete events in `chunk` and what came before it. `final`: nothing follows."""
        if (not self._buffer and chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2
                and b"\r" not in chunk):
            # The usual chunk: exactly one whole event (its only blank line is at its end).
            self._scanned = 0
            return [parse_event(chunk)]
        buffer = self._buffer + chunk
        events: list[SseEvent] = []
        start = 0
        # A terminator may straddle the previous chunk's end: step back 3 bytes.
        search = max(0, self._scanned - 3)
        while True:
            found = _EVENT_END.search(buffer, search)
            if found is None:
                break
            end = found.end()
            if end == len(buffer) and buffer.endswith(b"\r") and not final:
                break  # the CR may be the first half of a CRLF still on its way
            events.append(parse_event(buffer[start:end]))
            start = search = end
        self._buffer = buffer[start:]
        self._scanned = len(self._buffer)
        return events

    def take_rest(self) -> bytes:
        rest, self._buffer, self._scanned = self._buffer, b"", 0
        return rest
