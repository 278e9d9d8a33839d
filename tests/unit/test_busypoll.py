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
    async def scenario() -> tuple[int, int, int, float, bool]:
        # A window longer than the setting allows, so that the test holds on a busy machine:
        # each polling turn yields the CPU to whoever else wants it, so under load the loop
        # turns less often (and spends little CPU), but it never waits in its poll.
        poller = busypoll.BusyPoll(asyncio.get_running_loop(), 50_000)
        await asyncio.sleep(0.02)
        before = poller.turns  # nothing read yet: no polling
        poller.kick()
        await asyncio.sleep(0.06)  # asleep in the loop through the 50 ms window
        during = poller.turns
        idle = await _cpu_during_sleep(0.1)  # after the window
        return before, during, poller.turns, idle, poller.polling

    before, during, after, idle, still_polling = asyncio.run(scenario())
    assert before == 0
    assert during > 5  # the loop turned over and over instead of sleeping in its poll
    assert after == during and not still_polling  # and stopped once the window had passed
    assert idle < 0.005  # sleeping: no CPU


def test_start_polls_for_the_setting_through_kick() -> None:
    async def scenario() -> tuple[int, bool]:
        poller = busypoll.start(busypoll.MAX_WINDOW_US)
        assert poller is not None
        try:
            busypoll.kick(1)  # what an Envoy connection's read calls (one call open)
            await asyncio.sleep(0.03)
            return poller.turns, poller.polling
        finally:
            busypoll.stop()

    turns, polling = asyncio.run(scenario())
    assert turns > 0 and not polling


def test_off_nothing_polls() -> None:
    async def scenario() -> float:
        assert busypoll.start(0) is None
        busypoll.kick(1)  # every read calls it: a no-op when off
        busypoll.extend()
        return await _cpu_during_sleep(0.05)

    assert asyncio.run(scenario()) < 0.005


def test_each_read_extends_the_window() -> None:
    async def scenario() -> tuple[list[bool], bool]:
        poller = busypoll.BusyPoll(asyncio.get_running_loop(), 50_000)
        poller.kick()
        still = []
        for _ in range(6):  # a read every 10 ms, 60 ms in all: longer than one window
            await asyncio.sleep(0.01)
            still.append(poller.polling)  # before this read: the last one's window is open
            poller.kick()
        await asyncio.sleep(0.1)
        return still, poller.polling

    still, after = asyncio.run(scenario())
    assert all(still) and not after


def test_a_busy_connection_or_a_redis_reply_does_not_start_polling() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        poller = busypoll.start(busypoll.MAX_WINDOW_US)
        assert poller is not None
        try:
            busypoll.kick(busypoll.QUIET_STREAMS + 1)  # a loaded connection: its loop is busy
            loaded = poller.polling
            busypoll.extend()  # a Redis reply (e.g. a settle batch's) while not polling
            redis = poller.polling
            busypoll.kick(busypoll.QUIET_STREAMS)  # a quiet one: polls
            return loaded, redis, poller.polling
        finally:
            busypoll.stop()

    assert asyncio.run(scenario()) == (False, False, True)


def test_a_redis_reply_extends_a_running_poll() -> None:
    async def scenario() -> list[bool]:
        poller = busypoll.BusyPoll(asyncio.get_running_loop(), 50_000)
        poller.kick()
        still = []
        for _ in range(6):  # replies every 10 ms, 60 ms in all: longer than one window
            await asyncio.sleep(0.01)
            still.append(poller.polling)
            poller.extend()
        await asyncio.sleep(0.1)
        return [*still, poller.polling]

    *during, after = asyncio.run(scenario())
    assert all(during) and not after


@pytest.mark.parametrize("value", ["-1", "10001", "fast"])
def test_a_window_out_of_range_is_refused_at_start(value: str) -> None:
    with pytest.raises(SystemExit, match="TOLLGATE_BUSY_POLL_US"):
        Settings.from_env({"TOLLGATE_BUSY_POLL_US": value})


def test_the_window_is_read_from_the_environment() -> None:
    assert Settings.from_env({"TOLLGATE_BUSY_POLL_US": "800"}).busy_poll_us == 800
    assert Settings.from_env({}).busy_poll_us == 0
