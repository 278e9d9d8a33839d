"""The board that hands a passthrough stream's call to its observer (server/observer.py)."""

from __future__ import annotations

import asyncio

from extproc import envoyconf
from extproc.core import exchange as exchange_module
from extproc.core.exchange import Exchange, Options
from extproc.server.observer import ObserverBoard


def test_the_marker_envoy_matches_is_the_one_the_exchange_sets() -> None:
    assert envoyconf.STREAM_MODE_HEADER == exchange_module.STREAM_MODE_HEADER
    assert envoyconf.STREAM_PASSTHROUGH == exchange_module.STREAM_PASSTHROUGH


def test_a_call_is_taken_once_by_its_request_id() -> None:
    async def run() -> None:
        unclaimed: list[Exchange] = []
        board = ObserverBoard(unclaimed=lambda e, _s: unclaimed.append(e), timeout_s=0.05)
        call = Exchange("req-1", Options())
        board.expect(call, 1.0)
        assert board.take("req-2") is None  # another call's id claims nothing
        waiting = board.take("req-1")
        assert waiting is not None and waiting.exchange is call and waiting.started == 1.0
        assert board.take("req-1") is None  # once
        await asyncio.sleep(0.1)
        assert unclaimed == []  # taken in time: never expires

    asyncio.run(run())


def test_a_call_no_observer_takes_is_handed_back_once_after_the_timeout() -> None:
    async def run() -> None:
        unclaimed: list[tuple[Exchange, float]] = []
        board = ObserverBoard(unclaimed=lambda e, s: unclaimed.append((e, s)), timeout_s=0.05)
        call = Exchange("req-1", Options())
        board.expect(call, 2.0)
        await asyncio.sleep(0.02)
        assert unclaimed == []
        await asyncio.sleep(0.1)
        assert unclaimed == [(call, 2.0)]  # handed back once
        assert board.take("req-1") is None  # an observer arriving late finds nothing

    asyncio.run(run())


def test_an_unobserved_call_never_admitted_settles_nothing() -> None:
    call = Exchange("req-1", Options())
    assert call.settlement_unobserved() is None  # never admitted: nothing to settle


def test_a_stopping_worker_takes_every_waiting_call_off_the_board() -> None:
    async def run() -> None:
        unclaimed: list[Exchange] = []
        board = ObserverBoard(unclaimed=lambda e, _s: unclaimed.append(e), timeout_s=0.05)
        calls = [Exchange(f"req-{i}", Options()) for i in range(3)]
        for call in calls:
            board.expect(call, 0.0)
        assert [w.exchange for w in board.drain()] == calls
        assert board.take("req-0") is None
        await asyncio.sleep(0.1)
        assert unclaimed == []  # handed out by drain, not expired a second time

    asyncio.run(run())
