"""Incremental Server-Sent Events splitting: bytes in, complete events out.

Provider streams arrive in arbitrary chunks; an event may straddle any number of them. The
splitter keeps only the incomplete tail of the stream and remembers how far it has already
scanned, so a long event arriving in tiny pieces costs linear, not quadratic, time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SseEvent:
    raw: bytes  # the event's exact bytes, blank-line terminator included
    event: str  # the `event:` field, "" when absent
    data: bytes  # the `data:` lines joined with "\n"


def parse_event(raw: bytes) -> SseEvent:
    name = ""
    data: list[bytes] = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
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

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer + chunk
        events: list[SseEvent] = []
        start = 0
        # A terminator may straddle the previous chunk's end: step back 3 bytes.
        search = max(0, self._scanned - 3)
        while True:
            lf = buffer.find(b"\n\n", search)
            crlf = buffer.find(b"\r\n\r\n", search)
            if lf < 0 and crlf < 0:
                break
            end = crlf + 4 if crlf >= 0 and (lf < 0 or crlf < lf) else lf + 2
            events.append(parse_event(buffer[start:end]))
            start = search = end
        self._buffer = buffer[start:]
        self._scanned = len(self._buffer)
        return events

    def take_rest(self) -> bytes:
        rest, self._buffer, self._scanned = self._buffer, b"", 0
        return rest
