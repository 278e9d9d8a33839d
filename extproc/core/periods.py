"""Calendar periods for spend limits.

A period is part of the Redis key (`...:month:2026-11`), so a new period is a new key that starts
at zero: no reset job. Periods are aligned to the calendar in the limit's time zone (months are
real months, weeks start on Monday, ISO week numbering).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

PERIODS = ("none", "hour", "day", "week", "month")


_cache: dict[tuple[str, str], tuple[float, float, str]] = {}


def period_bounds(period: str, time_zone: str, now: float) -> tuple[str, float | None]:
    """(period id, end of the period as unix seconds) for `now` (unix seconds).

    `none` never ends: its id is `all` and its end None. Results are remembered per period and
    zone until the period ends: calendar arithmetic in a time zone is the slow part of planning
    a reservation, and the answer only changes at a boundary.
    """
    cached = _cache.get((period, time_zone))
    if cached is not None and cached[0] <= now < cached[1]:
        return cached[2], cached[1]
    period_id, end = _compute(period, time_zone, now)
    if end is not None:
        start = now  # conservative: valid from the first time it was computed
        if len(_cache) > 1000:
            _cache.clear()
        _cache[(period, time_zone)] = (start, end, period_id)
    return period_id, end


def _compute(period: str, time_zone: str, now: float) -> tuple[str, float | None]:
    if period == "none":
        return "all", None
    local = datetime.fromtimestamp(now, ZoneInfo(time_zone))
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        return f"hour:{start:%Y-%m-%dT%H}", _end(start, hours=1)
    if period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return f"day:{start:%Y-%m-%d}", _end(start, days=1)
    if period == "week":
        start = (local - timedelta(days=local.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        year, week, _ = start.isocalendar()
        return f"week:{year}-W{week:02d}", _end(start, days=7)
    if period == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
            month=start.month + 1
        )
        return f"month:{start:%Y-%m}", _wall(nxt)
    raise ValueError(f"unknown period {period!r}")


def _end(start: datetime, **delta: int) -> float:
    # Add in wall-clock terms and re-localise, so a day across a DST change is 23 or 25 hours.
    return _wall(start.replace(tzinfo=None) + timedelta(**delta), start.tzinfo)


def _wall(local: datetime, tz: object = None) -> float:
    zone = tz if tz is not None else local.tzinfo
    naive = local.replace(tzinfo=None)
    return naive.replace(tzinfo=zone).timestamp()  # type: ignore[arg-type]
