"""Passthrough streams (TOLLGATE_STREAM_PASSTHROUGH; README, "Streaming").

A streamed response normally flows chunk by chunk through the listener's ext_proc filter:
Envoy forwards each chunk only with the extproc's reply, so every chunk waits one round trip
(a few hundred µs here; bench/README.md, "Streaming: what each chunk waits"). For a stream
that needs no rewriting (core/exchange.py `_unchanged_stream`) the listener's filter instead
leaves the response body alone and marks the response `x-tollgate-stream: passthrough`; that
header creates the observer filter (envoyconf `_stream_observer_filter`, observability mode),
which sends the extproc the response headers and a copy of every chunk without waiting for
anything. The extproc meters the copy and settles the call at its end.

The board hands the call (its Exchange) from the listener's stream to the observer's. It is
process memory, as the failover board is (server/failover.py): both streams leave one Envoy
worker thread over one HTTP/2 connection, so they reach this process, the observer's within
milliseconds. A call no observer claims within `CLAIM_TIMEOUT_S` (an Envoy configuration
without the observer filter) is settled at its estimate, never left held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from extproc.core.exchange import Exchange

log = logging.getLogger(__name__)

CLAIM_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Waiting:
    exchange: Exchange
    started: float  # time.monotonic() at the listener stream's start
    timer: asyncio.TimerHandle  # the claim timeout


@dataclass(slots=True)
class ObserverBoard:
    # Settles and logs a call no observer claimed (the processor's end of a call).
    unclaimed: Callable[[Exchange, float], None] = field(default=lambda exchange, started: None)
    timeout_s: float = CLAIM_TIMEOUT_S
    waiting: dict[str, Waiting] = field(default_factory=dict)  # by request id

    def expect(self, exchange: Exchange, started: float) -> None:
        """The listener's filter let `exchange`'s stream through: its observer comes next.
        Registered before the reply that lets the stream through is sent."""
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire,
                                                      exchange.request_id)
        self.waiting[exchange.request_id] = Waiting(exchange, started, timer)

    def take(self, request_id: str) -> Waiting | None:
        """The observer's stream claims its call, once. An unknown id (a provider that sent
        the marker header itself, a call already expired) claims nothing."""
        entry = self.waiting.pop(request_id, None)
        if entry is not None:
            entry.timer.cancel()
        return entry

    def drain(self) -> list[Waiting]:
        """Every call still waiting (the worker is stopping), taken off the board."""
        entries = list(self.waiting.values())
        self.waiting.clear()
        for entry in entries:
            entry.timer.cancel()
        return entries

    def _expire(self, request_id: str) -> None:
        entry = self.waiting.pop(request_id, None)
        if entry is None:
            return
        log.warning("request %s: its stream passed through but no observer came for %.0f s "
                    "(is the observer filter in Envoy's configuration? `tollgate envoy-config` "
                    "has it); charged at its estimate", request_id, time.monotonic()
                    - entry.started)
        self.unclaimed(entry.exchange, entry.started)
