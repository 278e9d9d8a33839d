"""Busy polling (opt-in, `TOLLGATE_BUSY_POLL_US`): after a worker reads from Envoy or Redis, its
event loop keeps polling its sockets instead of sleeping, for that many microseconds, while
it serves few calls at once (under load the loop is busy anyway).

Why: at low concurrency each request is a chain of hand-overs between processes (Envoy, the
worker, Redis: about ten per request on the full limits path), and every hand-over to a process
that sleeps pays for waking it up, its CPU's way out of idle included. On a VM that is tens of
microseconds a time, most of the latency Tollgate adds at one request at a time
(docs/performance.md, "Busy polling"). A worker that is still polling when the next message
comes saves its side of that.

What it costs: CPU. While calls come one or two at a time the worker's CPU stays busy (up to
one core per worker); within the window after the last read it never sleeps. Idle, it costs
nothing: polling stops one window after the last read. Each polling turn yields the CPU
(`sched_yield`) so that a process waiting for this CPU (Envoy, Redis) runs first. Under load it
does not start at all (`QUIET_STREAMS`): the loop is busy anyway, and polling in its short gaps
cost up to 10 % of the throughput on the 2-core test machine when it did. Off by default; for
nodes with CPU to spare for latency. Native gRPC transport only (grpc.aio reads in its own
threads).
"""

from __future__ import annotations

import asyncio
import os
import time

MAX_WINDOW_US = 10_000  # a longer window only burns more CPU between bursts
# Polling starts only while an Envoy connection has at most this many calls open: one request
# at a time (plus the one whose stream is closing). With more, the loop has work queued
# anyway, and polling in its short gaps cost throughput (bench/README.md, "Busy polling").
QUIET_STREAMS = 2

_active: BusyPoll | None = None


class BusyPoll:
    """Keeps `loop` from sleeping until `window_s` after the last `kick`: a callback that
    re-schedules itself makes the loop poll its sockets without a timeout each turn."""

    __slots__ = ("last", "loop", "polling", "turns", "window_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, window_us: int) -> None:
        self.loop = loop
        self.window_s = window_us / 1e6
        self.last = 0.0
        self.polling = False
        self.turns = 0  # polling turns so far (tests, and a sign that it runs)

    def kick(self) -> None:
        self.last = time.perf_counter()
        if not self.polling:
            self.polling = True
            self.loop.call_soon(self._turn)

    def extend(self) -> None:
        if self.polling:
            self.last = time.perf_counter()

    def _turn(self) -> None:
        if time.perf_counter() - self.last >= self.window_s:
            self.polling = False
            return
        self.turns += 1
        os.sched_yield()  # whoever else wants this CPU runs first
        self.loop.call_soon(self._turn)


def window_us(value: str | int) -> int:
    """The window as the setting gives it (`TOLLGATE_BUSY_POLL_US`, the operator's pod
    annotation): a whole number of microseconds from 0 to `MAX_WINDOW_US`, else ValueError.
    The one rule for every place that takes it."""
    window = int(value)  # "1.5" and "fast" raise here
    if not 0 <= window <= MAX_WINDOW_US:
        raise ValueError(f"busy poll window must be 0-{MAX_WINDOW_US} us, not {window}")
    return window


def start(window: int) -> BusyPoll | None:
    """Busy polling for this process's running loop; None (off) for a window of 0."""
    global _active
    window = window_us(window)
    _active = BusyPoll(asyncio.get_running_loop(), window) if window else None
    return _active


def stop() -> None:
    global _active
    _active = None


def kick(open_streams: int) -> None:
    """An Envoy connection with `open_streams` calls has read something: poll on for the
    window, if the connection is quiet enough for polling to pay (`QUIET_STREAMS`)."""
    if _active is not None and open_streams <= QUIET_STREAMS:
        _active.kick()


def extend() -> None:
    """Redis has answered: poll on for the window if polling already (a Redis reply never
    starts it: under load, settle batches would)."""
    if _active is not None:
        _active.extend()
