"""How busy this worker's event loop is, for admission control.

Envoy gives every ext_proc message `message_timeout` (1 s) to be answered, and answers a bare
error when it runs out. A worker past its CPU capacity does not fail fast by itself: messages
queue behind each other in the event loop until they time out, and every request in the queue
fails, not just the excess. The lag of the loop (how late a timer fires) is how long a message
that arrives now waits before its handler runs; while it is above `max_lag_s`, new requests are
refused at once with a JSON 503 (cheap: one message, no Redis), so the requests already admitted
still finish in time.

A timer chain rather than a thread: a thread would need the GIL to measure, and measures the
wrong thing when the loop holds it.
"""

from __future__ import annotations

import asyncio
import time


class LoopLag:
    def __init__(self, max_lag_s: float, interval_s: float = 0.025) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = interval_s
        self.lag_s = 0.0  # the lateness of the last tick
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    @property
    def overloaded(self) -> bool:
        if self._handle is not None and self.max_lag_s > 0:
            # A tick that is already late counts as well: the loop may not have run it yet.
            return max(self.lag_s, time.monotonic() - self._due) > self.max_lag_s
        return False

    def start(self) -> None:
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = time.monotonic() + self.interval_s
        self._handle = loop.call_later(self.interval_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lag_s = max(0.0, time.monotonic() - self._due)
        self._schedule(loop)
