"""Serialized settlements (journal lines, hold records) survive a layout change."""

from __future__ import annotations

import orjson
import pytest

from extproc.store.quota_store import SETTLE_LAYOUT, SettleCall

pytestmark = pytest.mark.unit


def test_round_trip_keeps_bytes_and_numbers() -> None:
    call = SettleCall(("k1", "k2"), ("rid", 1, 2, 3, b"\x00\xffevent", 10, 0, 0, 0, 0, 0, 0))
    raw = call.to_json()
    assert orjson.loads(raw)["v"] == SETTLE_LAYOUT
    assert SettleCall.from_json(raw) == call


def test_layout_1_lines_are_upgraded() -> None:
    # Written before the settle script took a count of keys to delete (ARGV[12]).
    old = orjson.dumps({"keys": ["d", "h", "hs", "u", "lim"],
                        "args": ["rid", 5, 100, 10, {"b": "AA=="}, 1000, 1, 0, 0, 50, 7,
                                 9000, 8000, 0]})
    call = SettleCall.from_json(old)
    assert call.args[:11] == ("rid", 5, 100, 10, b"\x00", 1000, 1, 0, 0, 50, 7)
    assert call.args[11] == 0  # no keys to delete
    assert call.args[12:] == (9000, 8000, 0)  # the limit's max, threshold, ttl follow
