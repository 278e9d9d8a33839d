"""The dashboard's page and switches without a server: chart geometry, escaping of names that
clients choose, the gauges, and the settings that turn it on (server/dashboard*.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from extproc.server.dashboard import startup_problem
from extproc.server.dashboard_view import gauge, render_login, render_page, stacked_bars
from extproc.settings import Settings

pytestmark = pytest.mark.unit

STARTS = ["2026-12-02T10:00:00Z", "2026-12-02T11:00:00Z", "2026-12-02T12:00:00Z"]


def summary(model: str = "gpt-4o") -> dict[str, Any]:
    row = {"requests": 3, "cost_usd": "0.000455000", "cost_nanos": 455_000,
           "input_tokens": 62, "output_tokens": 30, "tokens": 92}
    return {
        "range": "24h", "from": STARTS[0], "to": STARTS[-1], "generated_at": STARTS[-1],
        "total": row,
        "usage": {"by_key": [{"key": "team-a", **row}], "more_key": 0,
                  "by_model": [{"model": model, **row}], "more_model": 0},
        "series": {"starts": STARTS, "bucket_hours": 1,
                   "by_key": [{"name": "team-a", "cost_nanos": [0, 455_000, 0]}],
                   "by_model": [{"name": model, "cost_nanos": [0, 455_000, 0]}]},
        "limits": [{"id": "monthly", "type": "Block", "period": "month:2026-12",
                    "max_nanos": 5_000_000_000, "spent_nanos": 6_000_000_000, "held_nanos": 0,
                    "threshold_nanos": 4_000_000_000, "max": "5.000000000",
                    "spent": "6.000000000", "held": "0.000000000", "remaining": "0.000000000",
                    "state": "blocked", "requests": {}}],
        "more_limits": 0,
        "rate_limits": [{"id": "per-key", "per": "key", "window": "minute",
                         "requests_per_window": 10, "tokens_per_window": None,
                         "concurrent": 4, "identities": 1,
                         "in_flight": 2, "truncated": False,
                         "busiest": [{"identity": "team-a", "requests": 12, "tokens": 0}]}],
        "cooldowns": [{"upstream": "openai", "credential": "c1", "model": "gpt-4o",
                       "until": STARTS[-1], "seconds_left": 12}],
    }


def test_bars_stack_every_series_and_scale_to_the_largest_bucket() -> None:
    series = [{"name": "a", "cost_nanos": [100, 0, 300]},
              {"name": "b", "cost_nanos": [100, 50, 0]}]
    chart = stacked_bars(STARTS, series, 1)
    drawn = {(r["series"], r["nanos"]) for r in chart["rects"]}
    assert drawn == {("a", 100), ("a", 300), ("b", 100), ("b", 50)}  # no empty segments
    tallest = max(r["h"] for r in chart["rects"])
    (a300,) = [r for r in chart["rects"] if r["nanos"] == 300]
    assert a300["h"] == tallest and a300["y"] >= 0  # the axis top (500) is above the 300 bar
    assert chart["grid"][-1]["text"] == "$0.000000500"  # nano-dollars: 9 places at most
    assert [lg["nanos"] for lg in chart["legend"]] == [400, 150]


def test_client_chosen_names_are_escaped() -> None:
    page = render_page(summary(model='<script>alert("x")</script>'), ("24h", "7d", "30d"))
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


def test_the_page_shows_the_summary_numbers() -> None:
    page = render_page(summary(), ("24h", "7d", "30d"))
    assert re.search(r'data-field="cost_usd">0\.000455000<', page)
    assert 'data-limit="monthly"' in page and ">blocked<" in page
    assert 'data-identity="team-a"' in page and "12</span> of 10 requests" in page
    assert 'data-upstream="openai"' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_a_gauge_is_full_past_max_and_marks_the_threshold() -> None:
    over = gauge(spent=6, held=1, maximum=5, threshold=4, state="overrun")
    assert over["spent_w"] == over["width"] and over["held_w"] == 0
    half = gauge(spent=2, held=1, maximum=4, threshold=3, state="ok")
    assert half["spent_w"] == half["width"] / 2 and half["held_w"] == half["width"] / 4
    assert half["threshold_x"] == half["width"] * 3 / 4 and half["percent"] == "75.0%"


def test_the_login_page_posts_the_token() -> None:
    page = render_login("That is not the admin token.")
    assert 'action="/dashboard/login"' in page and 'type="password"' in page
    assert "That is not the admin token." in page


def test_the_dashboard_is_off_unless_asked_and_never_without_a_token() -> None:
    assert Settings.from_env({}).dashboard is False
    assert startup_problem(Settings.from_env({})) is None
    on = Settings.from_env({"TOLLGATE_DASHBOARD": "1"})
    assert "needs TOLLGATE_ADMIN_TOKEN" in (startup_problem(on) or "")
    short = Settings.from_env({"TOLLGATE_DASHBOARD": "1", "TOLLGATE_ADMIN_TOKEN": "abc"})
    assert "shorter than 16" in (startup_problem(short) or "")
    good = Settings.from_env({"TOLLGATE_DASHBOARD": "true",
                              "TOLLGATE_ADMIN_TOKEN": "0123456789abcdef0123"})
    assert startup_problem(good) is None
    assert "0123456789abcdef0123" not in repr(good)


def test_the_summary_rows_are_the_reports_rows() -> None:
    """One pass by (key, model) per bar, added up, gives exactly what `tollgate usage --by key`
    (and `--by model`) computes over the same hours: tags and limits (list dimensions) do not
    double anything."""
    import random

    import orjson

    from extproc.server.dashboard import usage_summary
    from extproc.store.rollup import aggregate, documents

    rng = random.Random(7)
    hours = list(range(490_000, 490_030))
    hashes: list[dict[bytes, bytes]] = []
    for _hour in hours:
        cells: dict[bytes, bytes] = {}
        for _ in range(rng.randrange(0, 12)):
            dims = orjson.dumps([rng.choice(["a", "b", "c", ""]), "", "", rng.choice(
                ["gpt-4o", "m2", "m3"]), "openai", rng.sample(["t1", "t2", "t3"], 2), "",
                rng.sample(["l1", "l2"], rng.randrange(3))])
            for letter in b"cnio":
                field = bytes([letter]) + dims
                cells[field] = str(int(cells.get(field, b"0")) + rng.randrange(1, 10**6)).encode()
        hashes.append(cells)
    for bucket_hours in (1, 6, 24):
        summary = usage_summary(hours, hashes, bucket_hours)
        for dim in ("key", "model"):
            assert summary["usage"][f"by_{dim}"] == documents(aggregate(hashes, (dim,)))
            drawn = sum(sum(s["cost_nanos"]) for s in summary["series"][f"by_{dim}"])
            assert drawn == documents(aggregate(hashes, ()))[0]["cost_nanos"]
        assert summary["total"] == documents(aggregate(hashes, ()))[0]
