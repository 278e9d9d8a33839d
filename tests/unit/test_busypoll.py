"""Busy polling (extproc/busypoll.py): after a read the loop polls instead of sleeping for the
window, then sleeps again; off, nothing polls. CPU time is what a user would notice either way
(lower latency bought with CPU while traffic flows, none when idle), so the tests measure it
with wide margins: only polling vs. sleeping is told apart, never a speed."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc import busypoll
from extproc.settings import Settings

pytestmark = pytest.mark.unit


async def _cpu_during_sleep(seconds: float) -> float:
    before = time.process_time()
    await asyncio.sleep(seconds)
    return time.process_time() - before


def test_a_read_keeps_the_loop_polling_for_the_window_then_it_sleeps() -> None:
    async def scenario() -> tuple[float, float, int, bool]:
        poller = busypoll.start(busypoll.MAX_WINDOW_US)  # 10 ms
        assert poller is not None
        try:
            await _cpu_during_sleep(0.05)  # settle: nothing kicked yet, so no polling
            busypoll.kick()
            # 20 ms asleep in the loop right after a read: polling for the first 10 ms of it.
            polled = await _cpu_during_sleep(0.02)
            turns = poller.turns
            idle = await _cpu_during_sleep(0.1)  # long after the window
            return polled, idle, turns, poller.polling
        finally:
            busypoll.stop()

    polled, idle, turns, still_polling = asyncio.run(scenario())
    assert turns > 10  # the loop turned over and over instead of sleeping
    assert polled > 0.002  # up to 10 ms of CPU for the 10 ms window (less if others ran)
    assert idle < 0.005  # and none once the window has passed
    assert not still_polling


def test_off_nothing_polls() -> None:
    async def scenario() -> float:
        assert busypoll.start(0) is None
        busypoll.kick()  # every read calls it: a no-op when off
        return await _cpu_during_sleep(0.05)

    assert asyncio.run(scenario()) < 0.005


def test_each_read_extends_the_window() -> None:
    async def scenario() -> tuple[bool, bool]:
        poller = busypoll.start(5_000)
        assert poller is not None
        try:
            busypoll.kick()
            for _ in range(4):  # reads every 3 ms: each inside the last one's 5 ms window
                await asyncio.sleep(0.003)
                busypoll.kick()
            during = poller.polling
            await asyncio.sleep(0.03)
            return during, poller.polling
        finally:
            busypoll.stop()

    during, after = asyncio.run(scenario())
    assert during and not after


@pytest.mark.parametrize("value", ["-1", "10001", "fast"])
def test_a_window_out_of_range_is_refused_at_start(value: str) -> None:
    with pytest.raises(SystemExit, match="TOLLGATE_BUSY_POLL_US"):
        Settings.from_env({"TOLLGATE_BUSY_POLL_US": value})


def test_the_window_is_read_from_the_environment() -> None:
    assert Settings.from_env({"TOLLGATE_BUSY_POLL_US": "800"}).busy_poll_us == 800
    assert Settings.from_env({}).busy_poll_us == 0
