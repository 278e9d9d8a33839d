"""Serialized settlements (journal lines, hold records) survive a layout change."""

from __future__ import annotations

import orjson
import pytest

from extproc.store.quota_store import SETTLE_LAYOUT, SettleCall

pytestmark = pytest.mark.unit


def test_round_trip_keeps_bytes_and_numbers() -> None:
    call = SettleCall(("k1", "k2"),
                      ("rid", 1, 2, 3, b"\x00\xffevent", 10, 0, 0, 0, 0, 0, 0, 0, 0))
    raw = call.to_json()
    assert orjson.loads(raw)["v"] == SETTLE_LAYOUT
    assert SettleCall.from_json(raw) == call


def test_layout_1_lines_are_upgraded() -> None:
    # Written before the settle script took a count of keys to delete (ARGV[12]), in
    # micro-dollars, with a `done:<id>` marker and a `lim:` limit key.
    old = orjson.dumps({"keys": ["tg:{x}:done:rid", "h", "hs", "u", "tg:{x}:lim:cap:all"],
                        "args": ["rid", 120_000, 100, 10, {"b": "AA=="}, 1000, 1, 0, 0, 50, 7,
                                 9000, 8000, 0]})
    call = SettleCall.from_json(old)
    # amounts times 1000: actual 100 -> 100_000, estimate 50 -> 50_000
    assert call.args[:11] == ("rid", 120_000, 100_000, 10, b"\x00", 1000, 1, 0, 0, 50_000, 7)
    assert call.args[11] == 0  # no keys to delete
    assert call.args[12:14] == (0, 0)  # it had an estimate: a confirmed hold decides; no cancel
    assert call.args[14:] == (9_000_000, 8_000_000, 0)  # the limit's max, threshold, ttl
    assert call.keys[0] == "tg:{x}:unconfirmed:0"  # named, unused: its hold decides
    assert call.keys[4] == "tg:{x}:spend:cap:all"  # the nano-dollar limit state


def test_layout_2_offline_lines_get_a_settled_set_entry() -> None:
    # An offline (fail-open) settlement: nothing was held, so no hold record can decide.
    old = orjson.dumps({"v": 2, "keys": ["tg:{x}:done:rid", "h", "hs", "u", "tg:{x}:lim:c:all"],
                        "args": ["rid", 5, 100, 10, {"b": "AA=="}, 1000, 1, 0, 0, 0, 0, 0,
                                 9000, 8000, 0]})
    call = SettleCall.from_json(old)
    assert call.args[2] == 100_000 and call.args[12] > 0  # remembered in the settled set
    assert call.keys[0] == "tg:{x}:unconfirmed:0"
    assert call.args[14:] == (9_000_000, 8_000_000, 0)


def test_layout_2_usage_only_lines_get_a_short_lived_entry() -> None:
    old = orjson.dumps({"v": 2, "keys": ["tg:{x}:done:rid", "h", "hs", "u"],
                        "args": ["rid", 120_000, 7, 1, {"b": "AA=="}, 1000, 0, 0, 0, 0, 0, 0]})
    call = SettleCall.from_json(old)
    assert call.keys[0] == "tg:{x}:settled:2"  # per-minute bucket (120 s / 60 s)
    assert call.args[2] == 7_000 and 0 < call.args[12] <= 600_000
