"""Calendar periods of spend limits: ids (part of the Redis key) and ends, in UTC and across DST.

Every expected value below is written out by hand; instants are given in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from extproc.core.periods import PERIODS, period_bounds

pytestmark = pytest.mark.unit

NY = "America/New_York"
HOUR = 3600.0


def ts(iso: str) -> float:
    """Unix seconds of an ISO 8601 UTC instant written without the zone (`2026-11-14T13:45`)."""
    return datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


def test_every_period_a_limit_may_name_has_an_id_and_an_end() -> None:
    """`Limit.spec.period` accepts exactly PERIODS: each must give its own id and an end."""
    now = ts("2026-11-14T13:45:30")
    bounds = {period: period_bounds(period, "UTC", now) for period in PERIODS}
    assert bounds == {
        "none": ("all", None),
        "hour": ("hour:2026-11-14T13", ts("2026-11-14T14:00")),
        "day": ("day:2026-11-14", ts("2026-11-15T00:00")),
        "week": ("week:2026-W46", ts("2026-11-16T00:00")),
        "month": ("month:2026-11", ts("2026-12-01T00:00")),
    }


@pytest.mark.parametrize("zone", ["UTC", NY, "Asia/Tokyo"])
@pytest.mark.parametrize("now", ["1970-01-01T00:00:00", "2026-11-14T13:45:30", "2099-12-31T23:59"])
def test_none_never_ends(zone: str, now: str) -> None:
    assert period_bounds("none", zone, ts(now)) == ("all", None)


@pytest.mark.parametrize(
    ("period", "zone", "now", "period_id", "end"),
    [
        # 2026-11-14 is a Saturday in ISO week 46 (Monday 2026-11-09)
        ("hour", "UTC", "2026-11-14T13:45:30", "hour:2026-11-14T13", "2026-11-14T14:00"),
        ("day", "UTC", "2026-11-14T13:45:30", "day:2026-11-14", "2026-11-15T00:00"),
        ("week", "UTC", "2026-11-14T13:45:30", "week:2026-W46", "2026-11-16T00:00"),
        ("month", "UTC", "2026-11-14T13:45:30", "month:2026-11", "2026-12-01T00:00"),
        # the first instant of a period belongs to it
        ("hour", "UTC", "2026-11-14T13:00:00", "hour:2026-11-14T13", "2026-11-14T14:00"),
        ("day", "UTC", "2026-11-14T00:00:00", "day:2026-11-14", "2026-11-15T00:00"),
        ("week", "UTC", "2026-11-09T00:00:00", "week:2026-W46", "2026-11-16T00:00"),
        ("month", "UTC", "2026-11-01T00:00:00", "month:2026-11", "2026-12-01T00:00"),
        # the same instant in New York (UTC-5 in November): still the 14th, 08:45 local
        ("hour", NY, "2026-11-14T13:45:30", "hour:2026-11-14T08", "2026-11-14T14:00"),
        ("day", NY, "2026-11-14T13:45:30", "day:2026-11-14", "2026-11-15T05:00"),
        ("week", NY, "2026-11-14T13:45:30", "week:2026-W46", "2026-11-16T05:00"),
        ("month", NY, "2026-11-14T13:45:30", "month:2026-11", "2026-12-01T05:00"),
        # 02:00 UTC on the 1st is still the previous day and month in New York
        ("day", NY, "2026-12-01T02:00:00", "day:2026-11-30", "2026-12-01T05:00"),
        ("month", NY, "2026-12-01T02:00:00", "month:2026-11", "2026-12-01T05:00"),
        # and 15:00 UTC on Dec 31 is already next year in Tokyo (UTC+9, no DST)
        ("month", "Asia/Tokyo", "2026-12-31T15:00:00", "month:2027-01", "2027-01-31T15:00"),
        ("day", "Asia/Tokyo", "2026-12-31T15:00:00", "day:2027-01-01", "2027-01-01T15:00"),
        # month end December -> January
        ("month", "UTC", "2026-12-31T23:59:59", "month:2026-12", "2027-01-01T00:00"),
        ("month", "UTC", "2027-01-01T00:00:00", "month:2027-01", "2027-02-01T00:00"),
        ("month", NY, "2026-12-15T12:00:00", "month:2026-12", "2027-01-01T05:00"),
        # leap February 2028 has 29 days; February 2027 has 28
        ("month", "UTC", "2028-02-15T12:00:00", "month:2028-02", "2028-03-01T00:00"),
        ("day", "UTC", "2028-02-29T12:00:00", "day:2028-02-29", "2028-03-01T00:00"),
        ("month", "UTC", "2027-02-15T12:00:00", "month:2027-02", "2027-03-01T00:00"),
        ("day", "UTC", "2027-02-28T12:00:00", "day:2027-02-28", "2027-03-01T00:00"),
        # ISO weeks around the new year: 2026 has 53 ISO weeks; Thu 2026-12-31 and
        # Fri 2027-01-01 are both in 2026-W53; 2027-W01 starts on Monday 2027-01-04
        ("week", "UTC", "2026-12-31T12:00:00", "week:2026-W53", "2027-01-04T00:00"),
        ("week", "UTC", "2027-01-01T12:00:00", "week:2026-W53", "2027-01-04T00:00"),
        ("week", "UTC", "2027-01-03T23:59:59", "week:2026-W53", "2027-01-04T00:00"),
        ("week", "UTC", "2027-01-04T00:00:00", "week:2027-W01", "2027-01-11T00:00"),
        # ... and the other way round: Monday 2025-12-29 is already in 2026-W01
        ("week", "UTC", "2025-12-29T00:00:00", "week:2026-W01", "2026-01-05T00:00"),
        ("week", "UTC", "2025-12-28T23:59:59", "week:2025-W52", "2025-12-29T00:00"),
    ],
)
def test_period_bounds(period: str, zone: str, now: str, period_id: str, end: str) -> None:
    assert period_bounds(period, zone, ts(now)) == (period_id, ts(end))


# ---- daylight saving time (America/New_York) -------------------------------------------------
# 2026-03-08: 02:00 EST (07:00 UTC) jumps to 03:00 EDT; the local day has 23 hours.
# 2026-11-01: 02:00 EDT (06:00 UTC) falls back to 01:00 EST; the local day has 25 hours.


@pytest.mark.parametrize(
    ("period", "now", "period_id", "start", "end", "hours"),
    [
        ("day", "2026-03-08T12:00:00", "day:2026-03-08", "2026-03-08T05:00", "2026-03-09T04:00",
         23),
        ("day", "2026-03-07T12:00:00", "day:2026-03-07", "2026-03-07T05:00", "2026-03-08T05:00",
         24),
        ("day", "2026-11-01T12:00:00", "day:2026-11-01", "2026-11-01T04:00", "2026-11-02T05:00",
         25),
        ("day", "2026-11-02T12:00:00", "day:2026-11-02", "2026-11-02T05:00", "2026-11-03T05:00",
         24),
        # weeks containing a change: 7 * 24 - 1 and 7 * 24 + 1 hours
        ("week", "2026-03-05T12:00:00", "week:2026-W10", "2026-03-02T05:00", "2026-03-09T04:00",
         167),
        ("week", "2026-10-29T12:00:00", "week:2026-W44", "2026-10-26T04:00", "2026-11-02T05:00",
         169),
        # March 2026 loses an hour, November 2026 gains one
        ("month", "2026-03-15T12:00:00", "month:2026-03", "2026-03-01T05:00", "2026-04-01T04:00",
         31 * 24 - 1),
        ("month", "2026-11-15T12:00:00", "month:2026-11", "2026-11-01T04:00", "2026-12-01T05:00",
         30 * 24 + 1),
        # 01:xx EST jumps straight to 03:00 EDT: the 01 hour ends at 07:00 UTC, no 02 hour
        ("hour", "2026-03-08T06:30:00", "hour:2026-03-08T01", "2026-03-08T06:00",
         "2026-03-08T07:00", 1),
        ("hour", "2026-03-08T07:30:00", "hour:2026-03-08T03", "2026-03-08T07:00",
         "2026-03-08T08:00", 1),
        # the repeated 01 hour (01:xx EDT, then 01:xx EST) is one period id lasting two hours
        ("hour", "2026-11-01T05:30:00", "hour:2026-11-01T01", "2026-11-01T05:00",
         "2026-11-01T07:00", 2),
        ("hour", "2026-11-01T06:30:00", "hour:2026-11-01T01", "2026-11-01T05:00",
         "2026-11-01T07:00", 2),
        ("hour", "2026-11-01T07:30:00", "hour:2026-11-01T02", "2026-11-01T07:00",
         "2026-11-01T08:00", 1),
    ],
)
def test_dst_periods_in_new_york(
    period: str, now: str, period_id: str, start: str, end: str, hours: int
) -> None:
    assert period_bounds(period, NY, ts(now)) == (period_id, ts(end))
    # the period starts where the one before it ends
    assert period_bounds(period, NY, ts(start) - 1)[1] == ts(start)
    assert period_bounds(period, NY, ts(start))[0] == period_id
    assert ts(end) - ts(start) == hours * HOUR


@pytest.mark.parametrize(
    ("period", "zone", "boundary", "before", "after"),
    [
        ("hour", "UTC", "2026-11-14T14:00:00", "hour:2026-11-14T13", "hour:2026-11-14T14"),
        ("hour", "UTC", "2027-01-01T00:00:00", "hour:2026-12-31T23", "hour:2027-01-01T00"),
        ("day", "UTC", "2026-11-15T00:00:00", "day:2026-11-14", "day:2026-11-15"),
        ("day", "UTC", "2028-03-01T00:00:00", "day:2028-02-29", "day:2028-03-01"),
        ("week", "UTC", "2027-01-04T00:00:00", "week:2026-W53", "week:2027-W01"),
        ("week", "UTC", "2025-12-29T00:00:00", "week:2025-W52", "week:2026-W01"),
        ("month", "UTC", "2027-01-01T00:00:00", "month:2026-12", "month:2027-01"),
        ("month", "UTC", "2028-03-01T00:00:00", "month:2028-02", "month:2028-03"),
        ("month", "UTC", "2028-02-01T00:00:00", "month:2028-01", "month:2028-02"),
        ("month", "Asia/Tokyo", "2026-12-31T15:00:00", "month:2026-12", "month:2027-01"),
        # New York, across and around the DST changes
        ("hour", NY, "2026-03-08T07:00:00", "hour:2026-03-08T01", "hour:2026-03-08T03"),
        ("hour", NY, "2026-11-01T05:00:00", "hour:2026-11-01T00", "hour:2026-11-01T01"),
        ("hour", NY, "2026-11-01T07:00:00", "hour:2026-11-01T01", "hour:2026-11-01T02"),
        ("day", NY, "2026-03-08T05:00:00", "day:2026-03-07", "day:2026-03-08"),
        ("day", NY, "2026-03-09T04:00:00", "day:2026-03-08", "day:2026-03-09"),
        ("day", NY, "2026-11-01T04:00:00", "day:2026-10-31", "day:2026-11-01"),
        ("day", NY, "2026-11-02T05:00:00", "day:2026-11-01", "day:2026-11-02"),
        ("week", NY, "2026-11-02T05:00:00", "week:2026-W44", "week:2026-W45"),
        ("week", NY, "2026-03-09T04:00:00", "week:2026-W10", "week:2026-W11"),
        ("month", NY, "2026-12-01T05:00:00", "month:2026-11", "month:2026-12"),
        ("month", NY, "2026-04-01T04:00:00", "month:2026-03", "month:2026-04"),
        ("month", NY, "2027-01-01T05:00:00", "month:2026-12", "month:2027-01"),
    ],
)
def test_ids_change_exactly_at_the_boundary(
    period: str, zone: str, boundary: str, before: str, after: str
) -> None:
    edge = ts(boundary)
    id_before, end_before = period_bounds(period, zone, edge - 1)
    id_at, _ = period_bounds(period, zone, edge)
    id_after, end_after = period_bounds(period, zone, edge + 1)
    assert (id_before, id_at, id_after) == (before, after, after)
    assert end_before == edge  # the earlier period ends at the boundary ...
    assert end_after is not None and end_after > edge  # ... and the later one after it
    # a fraction of a second before the edge is still the earlier period
    assert period_bounds(period, zone, edge - 0.001)[0] == before


@pytest.mark.parametrize("period", ["hour", "day", "week", "month"])
@pytest.mark.parametrize("zone", ["UTC", NY, "Asia/Tokyo", "Australia/Lord_Howe"])
def test_end_is_always_after_now(period: str, zone: str) -> None:
    # every 113 minutes through 2026: the end is in the future and is the next period's first
    # instant (Lord Howe changes its clocks by 30 minutes, at 02:00 local)
    now = ts("2026-01-01T00:00:00")
    stop = ts("2027-01-01T00:00:00")
    while now < stop:
        period_id, end = period_bounds(period, zone, now)
        assert end is not None and end > now
        assert period_bounds(period, zone, end - 0.001)[0] == period_id
        assert period_bounds(period, zone, end)[0] != period_id
        now += 113 * 60


@pytest.mark.parametrize("period", ["year", "minute", "", "Month", "DAY", "all"])
def test_unknown_period_raises(period: str) -> None:
    with pytest.raises(ValueError, match="unknown period"):
        period_bounds(period, "UTC", ts("2026-11-14T13:45:30"))
