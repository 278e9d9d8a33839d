"""The dashboard page (/dashboard) drawn from its summary (server/dashboard.py): plain HTML with
inline SVG charts, rendered on the server. The page runs no script and loads nothing from
anywhere (a Content-Security-Policy says so), so it works where production has no internet.

Pure: a summary dict in, HTML out. The template (extproc/data/dashboard.html.j2) escapes every
value (Jinja2 autoescape): key and model names come from clients.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import cache
from typing import Any

import jinja2

from extproc.core.pricing import format_nanos

# Series colours (Tableau 10, colour-blind friendly); the last one is "other".
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
STATE_COLOURS = {"ok": "#59a14f", "exceeded": "#edc948", "overrun": "#e15759",
                 "blocked": "#8b1a1a"}
CHART_W, CHART_H, AXIS_W, AXIS_H, TOP = 880, 220, 90, 40, 12
GAUGE_W, GAUGE_H = 260, 16


def usd_short(nanos: int) -> str:
    """A readable amount for axes and tooltips ($0.0123); tables show the exact decimal."""
    if nanos == 0:
        return "$0"
    dollars = nanos / 1e9
    if abs(dollars) >= 100:
        return f"${dollars:,.0f}"
    if abs(dollars) >= 1:
        return f"${dollars:,.2f}"
    # Four significant digits, never an exponent: $0.00002640.
    digits = min(9, 3 - math.floor(math.log10(abs(dollars))))
    return f"${dollars:.{digits}f}"


def _nice_ceiling(value: int) -> int:
    """The axis maximum: 1, 2 or 5 times a power of ten, at least `value` (nano-dollars)."""
    if value <= 0:
        return 1
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= value:
                return m * step
        step *= 10


def stacked_bars(starts: list[str], series: list[dict[str, Any]], bucket_hours: int
                 ) -> dict[str, Any]:
    """Geometry of a stacked bar chart: one bar per time bucket, one segment per series
    (`{"name", "cost_nanos": [per bucket]}`), in SVG user units."""
    count = max(len(starts), 1)
    totals = [sum(s["cost_nanos"][i] for s in series) for i in range(len(starts))]
    top = _nice_ceiling(max(totals, default=0))
    slot = CHART_W / count
    bar_w = max(slot * 0.8, 1.0)
    rects = []
    for i, start in enumerate(starts):
        y = float(TOP + CHART_H)
        for n, s in enumerate(series):
            value = s["cost_nanos"][i]
            if value <= 0:
                continue
            h = value / top * CHART_H
            y -= h
            rects.append({
                "x": round(AXIS_W + i * slot + (slot - bar_w) / 2, 2), "y": round(y, 2),
                "w": round(bar_w, 2), "h": round(max(h, 0.5), 2),
                "colour": PALETTE[min(n, len(PALETTE) - 1)], "series": s["name"],
                "nanos": value,
                "title": f"{s['name']}: {usd_short(value)} ({format_nanos(value)} USD), "
                         f"{_label(start, bucket_hours)} UTC",
            })
    every = max(1, count // 8)
    ticks = [{"x": round(AXIS_W + i * slot + slot / 2, 2), "text": _label(start, bucket_hours)}
             for i, start in enumerate(starts) if i % every == 0]
    grid = [{"y": round(TOP + CHART_H - f * CHART_H, 2), "text": usd_short(int(top * f))}
            for f in (0.0, 0.5, 1.0)]
    return {"width": AXIS_W + CHART_W + 10, "height": TOP + CHART_H + AXIS_H, "rects": rects,
            "ticks": ticks, "grid": grid, "left": AXIS_W, "right": AXIS_W + CHART_W,
            "bottom": TOP + CHART_H,
            "legend": [{"name": s["name"], "colour": PALETTE[min(n, len(PALETTE) - 1)],
                        "nanos": sum(s["cost_nanos"])} for n, s in enumerate(series)]}


def _label(iso: str, bucket_hours: int) -> str:
    when = datetime.fromisoformat(iso).astimezone(UTC)
    return when.strftime("%m-%d") if bucket_hours >= 24 else when.strftime("%m-%d %H:00")


def gauge(spent: int, held: int, maximum: int, threshold: int, state: str) -> dict[str, Any]:
    """A limit's bar: spent and held as parts of max, the threshold as a tick. Past max the
    bar is full (the numbers beside it say by how much)."""
    scale = GAUGE_W / maximum if maximum > 0 else 0.0
    spent_w = min(spent * scale, GAUGE_W) if maximum > 0 else (GAUGE_W if spent else 0)
    held_w = min(held * scale, GAUGE_W - spent_w) if maximum > 0 else 0
    return {"width": GAUGE_W, "height": GAUGE_H, "spent_w": round(spent_w, 2),
            "held_w": round(held_w, 2),
            "threshold_x": round(min(threshold * scale, GAUGE_W), 2) if maximum > 0 else None,
            "colour": STATE_COLOURS.get(state, "#888888"),
            "percent": f"{(spent + held) / maximum * 100:.1f}%" if maximum > 0 else "-"}


def meter(value: int, bound: int | None) -> dict[str, Any]:
    """A small bar of a value against its bound (a rate limit's rpm); none without a bound."""
    if not bound:
        return {"width": 0, "fill": 0, "colour": "#888888", "percent": ""}
    share = value / bound
    colour = (STATE_COLOURS["ok"] if share < 0.8 else
              STATE_COLOURS["exceeded"] if share < 1 else STATE_COLOURS["overrun"])
    return {"width": 120, "fill": round(min(share, 1.0) * 120, 2), "colour": colour,
            "percent": f"{share * 100:.0f}%"}


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("extproc", "data"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(stacked_bars=stacked_bars, gauge=gauge, meter=meter,
                       usd_short=usd_short)
    return env


def render_page(summary: dict[str, Any], ranges: tuple[str, ...]) -> str:
    return _environment().get_template("dashboard.html.j2").render(
        s=summary, ranges=ranges)


def render_login(message: str = "") -> str:
    return _environment().get_template("dashboard_login.html.j2").render(message=message)
