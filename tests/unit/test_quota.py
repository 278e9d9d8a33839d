"""Spend limits and rate limits as plain data: matching, planning, and reading the store's replies.

Script replies are built by hand following the layouts documented at the top of
`extproc/store/lua/reserve.lua` and `settle.lua`; nothing here talks to Redis.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from extproc.core.quota import (
    BUCKET_MS,
    WINDOW_MS,
    CredentialCharge,
    LeaseCharge,
    LimitSpec,
    LimitStatus,
    LocalWindows,
    RateLimitSpec,
    ReservationPlan,
    Selector,
    Subject,
    WindowCharge,
    WindowStatus,
    applicable,
    interpret_reservation,
    interpret_settlement,
    limit_headers,
    limits_result,
    plan_reservation,
    project_settlement,
    rate_limit_headers,
    scope_id,
    state_of,
)

pytestmark = pytest.mark.unit

USD = 1_000_000_000  # nano-dollars
RETENTION_MS = 35 * 86_400_000
SUBJECT = Subject(
    key="k1", group="g1", user="u1", tags=("a", "b"), model="gpt-4o-mini", ip="10.0.0.1"
)


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-11-14T13:45:30.250")
NOW_MS = 1_794_663_930_250


def limit(
    name: str,
    *,
    block: bool = True,
    max_nanos: int = 10 * USD,
    threshold_nanos: int | None = None,
    period: str = "month",
    zone: str = "UTC",
    strict: bool = True,
    fail_open: bool = False,
    selector: Selector = Selector(),  # noqa: B008 - frozen, safe as a default
) -> LimitSpec:
    return LimitSpec(
        name=name, block=block, max_nanos=max_nanos,
        threshold_nanos=max_nanos if threshold_nanos is None else threshold_nanos,
        period=period, time_zone=zone, strict=strict, fail_open=fail_open, selector=selector,
    )


def rate_limit(
    name: str,
    *,
    per: str = "key",
    rpm: int | None = None,
    tpm: int | None = None,
    concurrent: int | None = None,
    selector: Selector = Selector(),  # noqa: B008
) -> RateLimitSpec:
    return RateLimitSpec(name, per, selector, rpm, tpm, concurrent)


def plan(
    limits: tuple[LimitSpec, ...] = (),
    rate_limits: tuple[RateLimitSpec, ...] = (),
    *,
    now: float = NOW,
    subject: Subject = SUBJECT,
    estimate_nanos: int = 1_500,
    estimate_tokens: int = 350,
    hold_seconds: float = 600.0,
) -> ReservationPlan:
    return plan_reservation(
        request_id="req-1", now=now, limits=limits, rate_limits=rate_limits, subject=subject,
        estimate_nanos=estimate_nanos, estimate_tokens=estimate_tokens,
        hold_seconds=hold_seconds,
    )


# ---- Selector.matches ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        (Selector(), True),  # empty: every request
        (Selector(keys=("k1",)), True),
        (Selector(keys=("k2",)), False),
        (Selector(keys=("k2", "k1")), True),  # OR within one list
        (Selector(groups=("g1",)), True),
        (Selector(groups=("g2", "g3")), False),
        (Selector(users=("u1",)), True),
        (Selector(users=("u2",)), False),
        (Selector(keys=("k1",), groups=("g1",), users=("u1",)), True),  # AND across lists
        (Selector(keys=("k1",), groups=("g2",)), False),
        (Selector(keys=("k1",), users=("u2",)), False),
        (Selector(keys=("k9",), groups=("g1",)), False),
        (Selector(tags=("b",)), True),  # tags: any in common
        (Selector(tags=("b", "c")), True),
        (Selector(tags=("c",)), False),
        (Selector(tags=("c", "d")), False),
        (Selector(models=("gpt-4o-mini",)), True),
        (Selector(models=("gpt-4o*",)), True),  # globs
        (Selector(models=("gpt-?o-mini",)), True),
        (Selector(models=("gpt-4o",)), False),  # an exact name is not a prefix
        (Selector(models=("claude-*",)), False),
        (Selector(models=("claude-*", "*-mini")), True),
        (Selector(models=("GPT-4O*",)), False),  # case-sensitive
        (Selector(models=("gpt-4o*",), tags=("z",)), False),
        (Selector(keys=("k1",), groups=("g1",), users=("u1",), tags=("a",),
                  models=("gpt-*",)), True),
    ],
)
def test_selector_matches(selector: Selector, matches: bool) -> None:
    assert selector.matches(SUBJECT) is matches


@pytest.mark.parametrize(
    ("selector", "matches"),
    [(Selector(), True), (Selector(tags=("a",)), False), (Selector(users=("u1",)), False)],
)
def test_selector_on_a_bare_subject(selector: Selector, matches: bool) -> None:
    bare = Subject(key="k1", group="", user="", tags=(), model="m", ip="")
    assert selector.matches(bare) is matches


# ---- applicable ------------------------------------------------------------------------------

ZETA = limit("zeta", selector=Selector(keys=("k1",)))
ALPHA = limit("alpha")  # empty selector: everything
MID = limit("mid", selector=Selector(keys=("other",)))
BETA = limit("beta", selector=Selector(models=("claude-*",)))
ALL_LIMITS = (ZETA, ALPHA, MID, BETA)


@pytest.mark.parametrize(
    ("named", "chosen", "unknown"),
    [
        ((), ["alpha", "zeta"], []),
        (("mid",), ["alpha", "mid", "zeta"], []),
        # named and also matched by selector: listed once
        (("zeta", "alpha"), ["alpha", "zeta"], []),
        (("mid", "mid", "beta"), ["alpha", "beta", "mid", "zeta"], []),
        (("nope",), ["alpha", "zeta"], ["nope"]),
        (("nope", "mid", "gone"), ["alpha", "mid", "zeta"], ["nope", "gone"]),
        # the same unknown id named twice (e.g. in both limit-ids headers) is reported once
        (("nope", "nope", "mid"), ["alpha", "mid", "zeta"], ["nope"]),
    ],
)
def test_applicable(named: tuple[str, ...], chosen: list[str], unknown: list[str]) -> None:
    limits, missing = applicable(ALL_LIMITS, SUBJECT, named)
    assert [lim.name for lim in limits] == chosen
    assert missing == unknown
    assert all(isinstance(lim, LimitSpec) for lim in limits)


def test_applicable_with_no_limits() -> None:
    assert applicable((), SUBJECT, ("x",)) == ([], ["x"])
    assert applicable((), SUBJECT, ()) == ([], [])


# ---- scope_id --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per", "expected"),
    [("key", "k1"), ("user", "u1"), ("group", "g1"), ("model", "gpt-4o-mini"),
     ("ip", "10.0.0.1"), ("global", "all")],
)
def test_scope_id_per(per: str, expected: str) -> None:
    assert scope_id(rate_limit("r", per=per, rpm=1), SUBJECT) == expected


def _with(field: str, value: str) -> Subject:
    changes: dict[str, Any] = {field: value}
    return replace(SUBJECT, **changes)


def _digest(raw: str) -> str:
    return "h-" + hashlib.sha256(raw.encode()).hexdigest()[:24]


@pytest.mark.parametrize(
    ("per", "field", "raw", "safe"),
    [
        ("user", "user", "team:alice", False),
        ("user", "user", "{tenant}", False),
        ("user", "user", "x" * 300, False),
        ("user", "user", "x" * 129, False),
        ("user", "user", "a b", False),
        ("user", "user", "ünïcode", False),
        ("model", "model", "ft:gpt-4o:org:1", False),
        ("ip", "ip", "2001:db8::1", False),
        ("group", "group", "g}{", False),
        ("user", "user", "x" * 128, True),
        ("user", "user", "alice@example.com", True),
        ("model", "model", "meta/llama-3.1+fast_v2", True),
    ],
)
def test_scope_id_unsafe_identities_are_digested(
    per: str, field: str, raw: str, safe: bool
) -> None:
    subject = _with(field, raw)
    rl = rate_limit("r", per=per, rpm=1)
    got = scope_id(rl, subject)
    if safe:
        assert got == raw
        return
    assert got == _digest(raw)
    assert re.fullmatch(r"h-[0-9a-f]{24}", got)
    assert scope_id(rl, _with(field, raw)) == got  # deterministic
    assert scope_id(rl, _with(field, raw + "!")) != got
    assert not set(got) & set(":{} ")


def test_scope_id_a_request_without_user_counts_as_its_keys_user() -> None:
    rl = rate_limit("r", per="user", rpm=1)
    assert scope_id(rl, replace(SUBJECT, user="")) == "key/k1"
    assert scope_id(rl, replace(SUBJECT, user="", key="k2")) == "key/k2"


# ---- plan_reservation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "zone", "period_id", "end"),
    [
        ("none", "UTC", "all", None),
        ("hour", "UTC", "hour:2026-11-14T13", "2026-11-14T14:00"),
        ("day", "UTC", "day:2026-11-14", "2026-11-15T00:00"),
        ("day", "America/New_York", "day:2026-11-14", "2026-11-15T05:00"),
        ("week", "UTC", "week:2026-W46", "2026-11-16T00:00"),
        ("month", "UTC", "month:2026-11", "2026-12-01T00:00"),
        ("month", "Asia/Tokyo", "month:2026-11", "2026-11-30T15:00"),
    ],
)
def test_limit_charges_carry_period_and_ttl(
    period: str, zone: str, period_id: str, end: str | None
) -> None:
    spec = limit("l", period=period, zone=zone)
    (charge,) = plan((spec,)).limits
    assert charge.limit is spec
    assert charge.period_id == period_id
    if end is None:
        assert charge.ttl_ms == 0  # the state never expires
        return
    end_ms = int(ts(end) * 1000)
    assert charge.ttl_ms == end_ms - NOW_MS + RETENTION_MS
    # the state key outlives the period by the retention, for reporting
    assert NOW_MS + charge.ttl_ms >= end_ms + RETENTION_MS


def test_limit_charges_keep_the_given_order() -> None:
    specs = (limit("b", period="day"), limit("a", period="none"), limit("c", period="hour"))
    assert [c.limit.name for c in plan(specs).limits] == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("rl", "windows", "leases"),
    [
        (rate_limit("r", rpm=10), [("requests", 10, 1)], []),
        (rate_limit("r", tpm=1000), [("tokens", 1000, 350)], []),
        (rate_limit("r", concurrent=2), [], [2]),
        (rate_limit("r", rpm=10, tpm=1000, concurrent=2),
         [("requests", 10, 1), ("tokens", 1000, 350)], [2]),
        # a selector that does not match: nothing
        (rate_limit("r", rpm=10, tpm=1000, concurrent=2, selector=Selector(keys=("k2",))),
         [], []),
        (rate_limit("r", rpm=10, selector=Selector(models=("gpt-4o*",))),
         [("requests", 10, 1)], []),
    ],
)
def test_rate_limit_charges(
    rl: RateLimitSpec, windows: list[tuple[str, int, int]], leases: list[int]
) -> None:
    p = plan((), (rl,))
    assert p.windows == tuple(
        WindowCharge("r", "key", "k1", metric, lim, amount) for metric, lim, amount in windows
    )
    assert p.leases == tuple(LeaseCharge("r", "key", "k1", lim) for lim in leases)
    assert p.token_windows == tuple(w for w in p.windows if w.metric == "tokens")
    assert p.empty is (not windows and not leases)


def test_rate_limit_identities_follow_per() -> None:
    rls = (
        rate_limit("per-user", per="user", rpm=5),
        rate_limit("skipped", per="key", rpm=5, selector=Selector(groups=("nope",))),
        rate_limit("everyone", per="global", tpm=100, concurrent=9),
    )
    p = plan((), rls, estimate_tokens=70)
    assert p.windows == (
        WindowCharge("per-user", "user", "u1", "requests", 5, 1),
        WindowCharge("everyone", "global", "all", "tokens", 100, 70),
    )
    assert p.leases == (LeaseCharge("everyone", "global", "all", 9),)


@pytest.mark.parametrize(
    ("hold_seconds", "deadline_ms"),
    [(600.0, NOW_MS + 600_000), (0.5, NOW_MS + 500), (0.0, NOW_MS), (30, NOW_MS + 30_000)],
)
def test_plan_deadlines_and_estimates(hold_seconds: float, deadline_ms: int) -> None:
    p = plan((limit("l"),), hold_seconds=hold_seconds, estimate_nanos=4_321,
             estimate_tokens=77)
    assert p.request_id == "req-1"
    assert p.now_ms == NOW_MS
    assert p.hold_deadline_ms == deadline_ms
    assert p.lease_deadline_ms == deadline_ms
    assert (p.estimate_nanos, p.estimate_tokens) == (4_321, 77)
    assert p.bucket == NOW_MS // BUCKET_MS
    assert not p.empty


def test_empty_plan() -> None:
    p = plan((), (rate_limit("r", rpm=1, selector=Selector(keys=("k2",))),))
    assert p.empty
    assert (p.limits, p.windows, p.leases, p.token_windows) == ((), (), (), ())


# ---- interpret_reservation -------------------------------------------------------------------

A_BLOCK = limit("a-block", max_nanos=10 * USD, threshold_nanos=8 * USD)
B_ALLOW = limit("b-allow", block=False, max_nanos=5 * USD, threshold_nanos=4 * USD)
C_BLOCK = limit("c-block", max_nanos=2 * USD, threshold_nanos=2 * USD, period="day")
RL = rate_limit("rl", rpm=10, tpm=1000, concurrent=2)
PLAN = plan((A_BLOCK, B_ALLOW, C_BLOCK), (RL,))
ZERO_LIMITS = ((0, 0), (0, 0), (0, 0))
WINDOWS = ((3, 40_000), (350, 40_000))


def reply(
    allowed: int,
    kind: int = 0,
    index: int = 0,
    retry: int = 0,
    limits: tuple[tuple[int, int], ...] = ZERO_LIMITS,
    windows: tuple[tuple[int, int], ...] = WINDOWS,
) -> list[int]:
    """{allowed, kind, index, retry ms, per limit: spent, held, per window: used, reset ms}"""
    out = [allowed, kind, index, retry]
    for pair in (*limits, *windows):
        out.extend(pair)
    return out


def test_allowed_reply() -> None:
    limits = ((1 * USD, 2 * USD), (4 * USD, 0), (3 * USD, 1_500))
    reservation = interpret_reservation(PLAN, reply(1, limits=limits))
    assert reservation.denial is None
    assert reservation.blocked_limit is None
    assert reservation.plan is PLAN
    assert reservation.limits == (
        LimitStatus("a-block", "ok", 1 * USD, 2 * USD, 10 * USD, "month:2026-11"),
        LimitStatus("b-allow", "exceeded", 4 * USD, 0, 5 * USD, "month:2026-11"),
        LimitStatus("c-block", "overrun", 3 * USD, 1_500, 2 * USD, "day:2026-11-14"),
    )
    assert reservation.windows == (
        WindowStatus(PLAN.windows[0], 3, 40_000),
        WindowStatus(PLAN.windows[1], 350, 40_000),
    )
    assert [w.remaining for w in reservation.windows] == [7, 650]


def test_reply_values_may_arrive_as_strings() -> None:
    raw = [str(v) for v in reply(1, limits=((1, 2), (3, 4), (5, 6)))]
    reservation = interpret_reservation(PLAN, raw)  # type: ignore[arg-type]
    assert [(s.spent_nanos, s.held_nanos) for s in reservation.limits] == [(1, 2), (3, 4),
                                                                             (5, 6)]


@pytest.mark.parametrize(
    ("spent", "state"),
    [
        (0, "ok"),
        (8 * USD - 1, "ok"),
        (8 * USD, "exceeded"),  # at the threshold
        (10 * USD, "exceeded"),  # at max: exceeded, not overrun
        (10 * USD + 1, "overrun"),
    ],
)
def test_reservation_states_from_spent(spent: int, state: str) -> None:
    limits = ((spent, 5 * USD), (0, 0), (0, 0))
    reservation = interpret_reservation(PLAN, reply(1, limits=limits))
    assert reservation.limits[0].state == state  # held does not count towards the state


@pytest.mark.parametrize(
    ("index", "name", "wait"),
    [
        (1, "a-block", "1419270"),  # month: 2026-11-14T13:45:30.250 -> 2026-12-01, rounded up
        (3, "c-block", "36870"),  # day: -> 2026-11-15T00:00
    ],
)
def test_denied_by_limit(index: int, name: str, wait: str) -> None:
    limits = ((9 * USD, 2 * USD), (1 * USD, 0), (1 * USD, 999_000))
    reservation = interpret_reservation(PLAN, reply(0, 1, index, -1, limits=limits))
    assert reservation.blocked_limit == name
    deny = reservation.denial
    assert deny is not None
    assert (deny.status, deny.code) == (429, "limit_exceeded")
    # Retrying cannot help before the period ends: the SDKs are told not to, and when it ends.
    assert deny.headers == (("x-should-retry", "false"), ("retry-after", wait))
    assert orjson.loads(deny.body()) == {
        "error": {
            "message": f"Limit exceeded: {name}",
            "type": "LimitExceeded",
            "code": 429,
            "limit_id": name,
        }
    }
    states = {s.name: s.state for s in reservation.limits}
    assert states[name] == "blocked"
    others = {n: st for n, st in states.items() if n != name}
    assert "blocked" not in others.values()
    assert states["b-allow"] == "ok"
    assert len(reservation.windows) == 2


@pytest.mark.parametrize(
    ("index", "retry_ms", "retry_after", "metric", "limit_value"),
    [
        (1, 1, "1", "requests", 10),
        (1, 999, "1", "requests", 10),
        (1, 1_000, "1", "requests", 10),
        (1, 1_001, "2", "requests", 10),
        (2, 0, "1", "tokens", 1000),  # never 0: a client would retry at once
        (2, 12_345, "13", "tokens", 1000),
        (2, 60_000, "60", "tokens", 1000),
        (2, -1, None, "tokens", 1000),  # this request alone is larger than the limit
    ],
)
def test_denied_by_window(
    index: int, retry_ms: int, retry_after: str | None, metric: str, limit_value: int
) -> None:
    reservation = interpret_reservation(PLAN, reply(0, 2, index, retry_ms))
    deny = reservation.denial
    assert deny is not None
    assert reservation.blocked_limit is None
    assert (deny.status, deny.code, deny.error_type) == (
        429, "rate_limit_exceeded", "rate_limit_error"
    )
    assert f"Rate limit reached for {metric} per minute (rl, per key): limit {limit_value}." in (
        deny.message
    )
    if retry_after is None:
        assert deny.headers == ()
        assert "larger than the limit" in deny.message
    else:
        assert deny.headers == (("retry-after", retry_after),)
        assert "larger than the limit" not in deny.message
    assert all(s.state != "blocked" for s in reservation.limits)


@pytest.mark.parametrize(
    ("retry_ms", "retry_after"), [(0, "1"), (1, "1"), (2_500, "3"), (-1, "1"), (600_000, "600")]
)
def test_denied_by_lease(retry_ms: int, retry_after: str) -> None:
    reservation = interpret_reservation(PLAN, reply(0, 3, 1, retry_ms))
    deny = reservation.denial
    assert deny is not None
    assert (deny.status, deny.code) == (429, "rate_limit_exceeded")
    assert deny.message == "Too many concurrent requests (rl, per key): limit 2."
    assert deny.headers == (("retry-after", retry_after),)
    assert int(retry_after) >= 1
    assert reservation.blocked_limit is None


def test_the_second_lease_is_named_when_it_refuses() -> None:
    two = plan((), (rate_limit("per-key", concurrent=5),
                    rate_limit("everyone", per="global", concurrent=1)))
    deny = interpret_reservation(two, [0, 3, 2, 100]).denial
    assert deny is not None
    assert deny.message == "Too many concurrent requests (everyone, per global): limit 1."


# ---- interpret_settlement, state_of ----------------------------------------------------------


@pytest.mark.parametrize("settled", [1, 0])
def test_interpret_settlement(settled: int) -> None:
    # {settled, per limit: spent, held, state code (0 ok, 1 exceeded, 2 overrun)}
    raw = [settled, 1 * USD, 0, 0, 4 * USD, 3_000, 1, 3 * USD, 0, 2]
    assert interpret_settlement(PLAN, raw) == (
        LimitStatus("a-block", "ok", 1 * USD, 0, 10 * USD, "month:2026-11"),
        LimitStatus("b-allow", "exceeded", 4 * USD, 3_000, 5 * USD, "month:2026-11"),
        LimitStatus("c-block", "overrun", 3 * USD, 0, 2 * USD, "day:2026-11-14"),
    )


def test_interpret_settlement_without_limits() -> None:
    assert interpret_settlement(plan((), (RL,)), [1]) == ()


@pytest.mark.parametrize(
    ("spent", "max_nanos", "threshold_nanos", "state"),
    [
        (0, 100, 80, "ok"),
        (79, 100, 80, "ok"),
        (80, 100, 80, "exceeded"),  # spent == threshold
        (99, 100, 80, "exceeded"),
        (100, 100, 80, "exceeded"),  # spent == max
        (101, 100, 80, "overrun"),  # max + 1
        (99, 100, 100, "ok"),
        (100, 100, 100, "exceeded"),
        (101, 100, 100, "overrun"),
        (0, 0, 0, "exceeded"),
        (1, 0, 0, "overrun"),
    ],
)
def test_state_of(spent: int, max_nanos: int, threshold_nanos: int, state: str) -> None:
    spec = limit("l", max_nanos=max_nanos, threshold_nanos=threshold_nanos)
    assert state_of(spent, spec) == state


# ---- what the client sees --------------------------------------------------------------------


def window(metric: str, lim: int, used: int, reset_ms: int, name: str = "r") -> WindowStatus:
    return WindowStatus(WindowCharge(name, "key", "k1", metric, lim, 1), used, reset_ms)


@pytest.mark.parametrize(
    ("reset_ms", "formatted"),
    [
        (0, "0ms"),
        (-5, "0ms"),
        (1, "1ms"),
        (250, "250ms"),
        (999, "999ms"),
        (1_000, "1s"),
        (1_001, "2s"),  # rounded up: never earlier than the real reset
        (6_500, "7s"),
        (59_000, "59s"),
        (59_001, "1m0s"),
        (60_000, "1m0s"),
        (65_000, "1m5s"),
        (360_000, "6m0s"),
    ],
)
def test_reset_format(reset_ms: int, formatted: str) -> None:
    headers = dict(rate_limit_headers([window("requests", 10, 3, reset_ms)]))
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": formatted,
    }


def test_rate_limit_headers_pick_the_tightest_window_per_metric() -> None:
    windows = [
        window("requests", 10, 3, 250, "loose"),
        window("requests", 100, 99, 65_000, "tight"),  # 1 left
        window("tokens", 1000, 1200, 1_000, "over"),  # over the limit: 0 left, not negative
        window("tokens", 50_000, 10, 30_000, "big"),
    ]
    assert rate_limit_headers(windows) == (
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "1"),
        ("x-ratelimit-reset-requests", "1m5s"),
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "1s"),
    )


def test_rate_limit_headers_ties_report_the_later_reset() -> None:
    windows = [window("tokens", 10, 8, 1_000), window("tokens", 20, 18, 30_000)]
    headers = dict(rate_limit_headers(windows))
    assert headers["x-ratelimit-reset-tokens"] == "30s"
    assert headers["x-ratelimit-limit-tokens"] == "20"


def test_rate_limit_headers_only_for_metrics_present() -> None:
    assert rate_limit_headers([]) == ()
    names = [name for name, _ in rate_limit_headers([window("tokens", 10, 1, 5)])]
    assert names == ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                     "x-ratelimit-reset-tokens"]


STATUSES = (
    LimitStatus("a-block", "ok", 1_250_000_000, 250_000_000, 10 * USD, "month:2026-11"),
    LimitStatus("b-allow", "overrun", 6 * USD, 0, 5 * USD, "day:2026-11-14"),
    LimitStatus("c-block", "blocked", 1_999_999_000, 500_000_000, 2 * USD, "all"),
)


@pytest.mark.parametrize(
    ("spent", "held", "max_nanos", "remaining"),
    [(0, 0, 100, 100), (30, 20, 100, 50), (100, 0, 100, 0), (90, 20, 100, 0), (200, 5, 100, 0)],
)
def test_remaining_is_never_negative(spent: int, held: int, max_nanos: int,
                                     remaining: int) -> None:
    assert LimitStatus("l", "ok", spent, held, max_nanos, "all").remaining_nanos == remaining


def test_limit_headers() -> None:
    assert limit_headers(()) == ()
    assert limit_headers(STATUSES) == ((
        "x-tollgate-limits",
        "a-block;state=ok;remaining=8.500000000;max=10.000000000, "
        "b-allow;state=overrun;remaining=0.000000000;max=5.000000000, "
        "c-block;state=blocked;remaining=0.000000000;max=2.000000000",
    ),)


def test_limits_result() -> None:
    assert limits_result(()) == {}
    # The Pay-i SDK reads `{limit_id: {state}}`; Pay-i documents `limit_type`, `current`,
    # `max` and `remaining` per limit. `limit_type` only when the caller knows the types.
    assert limits_result(STATUSES, {"a-block": True, "b-allow": False}) == {
        "a-block": {"state": "ok", "limit_type": "block", "current": 1.25,
                    "period": "month:2026-11", "spent": 1.25, "held": 0.25,
                    "max": 10.0, "remaining": 8.5},
        "b-allow": {"state": "overrun", "limit_type": "allow", "current": 6.0,
                    "period": "day:2026-11-14", "spent": 6.0, "held": 0.0,
                    "max": 5.0, "remaining": 0.0},
        "c-block": {"state": "blocked", "current": 1.999999, "period": "all",
                    "spent": 1.999999, "held": 0.5, "max": 2.0, "remaining": 0.0},
    }


# ---- credential pools in the reservation reply ----------------------------------------------

POOL = (
    CredentialCharge("azure-east", "p1", "KEY_1", "gpt-4o", True, 60, 10_000),
    CredentialCharge("azure-east", "p2", "KEY_2", "gpt-4o", True, None, None),
)


def pool_plan() -> ReservationPlan:
    return plan_reservation(
        request_id="req-1", now=NOW, limits=(), rate_limits=(), subject=SUBJECT,
        estimate_nanos=1, estimate_tokens=350, hold_seconds=600, credentials=POOL)


def test_an_admitted_reservation_names_its_credential_and_its_usage() -> None:
    r = interpret_reservation(pool_plan(), [1, 0, 0, 0, 2, 7, 4_200])
    assert r.denial is None and r.credential == POOL[1]
    assert (r.credential_requests, r.credential_tokens) == (7, 4_200)
    # A reply without the credential part (no pool): no credential, nothing used.
    bare = interpret_reservation(plan((), ()), [1, 0, 0, 0])
    assert bare.credential is None and (bare.credential_requests, bare.credential_tokens) == (0, 0)


@pytest.mark.parametrize(("retry_ms", "retry_after"),
                         [(1, "1"), (999, "1"), (1000, "1"), (1001, "2"), (29_500, "30"),
                          (0, "1"), (-1, "1")])
def test_no_credential_left_is_a_503_saying_when_to_retry(retry_ms: int,
                                                          retry_after: str) -> None:
    r = interpret_reservation(pool_plan(), [0, 4, 0, retry_ms, 0, 0, 0])
    assert r.denial is not None and r.credential is None
    assert (r.denial.status, r.denial.code) == (503, "no_credential_available")
    assert r.denial.message == ("Every credential of upstream 'azure-east' is cooling down or "
                                "at its rate cap; retry shortly.")
    assert r.denial.headers == (("retry-after", retry_after),)
    assert r.plan == pool_plan() and r.limits == () and r.windows == ()


# ---- project_settlement (what a response reports) -------------------------------------------


def test_projected_states_release_the_hold_and_add_the_actual_cost() -> None:
    budget = limit("budget", max_nanos=10 * USD, threshold_nanos=8 * USD)
    tracker = limit("tracker", block=False, max_nanos=5 * USD, threshold_nanos=4 * USD)
    p = plan((budget, tracker), estimate_nanos=2 * USD)
    seen_at_reserve = (
        # spent before this request, held including its own estimate (and another's 1 USD)
        LimitStatus("budget", "ok", 7 * USD, 3 * USD, 10 * USD, "month:2026-11"),
        LimitStatus("tracker", "exceeded", 4 * USD, 2 * USD, 5 * USD, "month:2026-11"),
    )
    projected = project_settlement(seen_at_reserve, p, 1_500_000_000, [budget, tracker])
    assert projected == (
        LimitStatus("budget", "exceeded", 8_500_000_000, 1 * USD, 10 * USD, "month:2026-11"),
        LimitStatus("tracker", "overrun", 5_500_000_000, 0, 5 * USD, "month:2026-11"),
    )


def test_projected_states_never_hold_less_than_nothing() -> None:
    budget = limit("budget", max_nanos=10 * USD)
    p = plan((budget,), estimate_nanos=2 * USD)
    # Held was reset by hand meanwhile: releasing this request's estimate stops at zero.
    seen = (LimitStatus("budget", "ok", 1 * USD, 500_000, 10 * USD, "month:2026-11"),)
    (status,) = project_settlement(seen, p, 0, [budget])
    assert (status.spent_nanos, status.held_nanos, status.state) == (1 * USD, 0, "ok")
    # A limit that vanished from the configuration keeps the state it was reported with.
    (kept,) = project_settlement(
        (replace(seen[0], name="gone", state="exceeded"),), p, 0, [budget])
    assert kept.state == "exceeded"


# ---- LocalWindows (Redis unreachable) --------------------------------------------------------

T0 = ts("2026-11-14T13:45:00")  # the start of a 5 s bucket
RPM3 = rate_limit("rpm3", rpm=3)
TPM = rate_limit("tpm", tpm=1000)


def local_plan(
    now: float, *, key: str = "k1", tokens: int = 0,
    rate_limits: tuple[RateLimitSpec, ...] = (RPM3,),
) -> ReservationPlan:
    return plan((), rate_limits, now=now, subject=replace(SUBJECT, key=key),
                estimate_tokens=tokens)


def _refused(local: LocalWindows, p: ReservationPlan, metric: str = "requests") -> None:
    deny = local.admit(p)
    assert deny is not None
    assert (deny.status, deny.code) == (429, "rate_limit_exceeded")
    assert deny.message.startswith(f"Rate limit reached for {metric} per minute")
    assert deny.headers == (("retry-after", str(BUCKET_MS // 1000)),)


def test_local_admits_up_to_the_limit_then_refuses() -> None:
    local = LocalWindows()
    for offset in (0.0, 0.1, 4.9):
        assert local.admit(local_plan(T0 + offset)) is None
    _refused(local, local_plan(T0 + 4.9))
    _refused(local, local_plan(T0 + 30))


def test_local_window_frees_up_after_it_passes() -> None:
    local = LocalWindows()
    for _ in range(3):
        assert local.admit(local_plan(T0)) is None
    # rolling and conservative: the current bucket plus 12 older ones are counted in full
    _refused(local, local_plan(T0 + WINDOW_MS / 1000))
    _refused(local, local_plan(T0 + (WINDOW_MS + BUCKET_MS) / 1000 - 0.001))
    # the bucket of the first three has left the window
    later = T0 + (WINDOW_MS + BUCKET_MS) / 1000
    for _ in range(3):
        assert local.admit(local_plan(later)) is None
    _refused(local, local_plan(later))


def test_local_window_is_rolling_not_fixed() -> None:
    local = LocalWindows()
    assert local.admit(local_plan(T0)) is None
    assert local.admit(local_plan(T0 + 30)) is None
    assert local.admit(local_plan(T0 + 30)) is None
    _refused(local, local_plan(T0 + 60))  # no burst at a minute edge
    # only the request made at T0 has left: one slot, not three
    assert local.admit(local_plan(T0 + 65)) is None
    _refused(local, local_plan(T0 + 65))
    # and the two made at T0 + 30 leave at T0 + 95
    _refused(local, local_plan(T0 + 94.999))
    assert local.admit(local_plan(T0 + 95)) is None


def test_local_identities_do_not_interfere() -> None:
    local = LocalWindows()
    for _ in range(3):
        assert local.admit(local_plan(T0, key="k1")) is None
    _refused(local, local_plan(T0, key="k1"))
    for _ in range(3):
        assert local.admit(local_plan(T0, key="k2")) is None
    _refused(local, local_plan(T0, key="k2"))
    # another rate limit with the same identity counts on its own
    other = rate_limit("other", rpm=1)
    assert local.admit(local_plan(T0, key="k1", rate_limits=(other,))) is None
    _refused(local, local_plan(T0, key="k1", rate_limits=(other,)))


def test_local_tokens_window_counts_the_estimate() -> None:
    local = LocalWindows()
    assert local.admit(local_plan(T0, tokens=400, rate_limits=(TPM,))) is None
    assert local.admit(local_plan(T0, tokens=600, rate_limits=(TPM,))) is None
    _refused(local, local_plan(T0, tokens=1, rate_limits=(TPM,)), "tokens")
    assert local.admit(local_plan(T0, tokens=0, rate_limits=(TPM,))) is None
    # a request larger than the limit on its own is always refused
    _refused(LocalWindows(), local_plan(T0, tokens=1001, rate_limits=(TPM,)), "tokens")


def test_local_refusal_charges_nothing() -> None:
    both = (rate_limit("both", rpm=2, tpm=1000),)
    local = LocalWindows()
    assert local.admit(local_plan(T0, tokens=900, rate_limits=both)) is None
    # refused by tokens: the requests window must not be charged either
    _refused(local, local_plan(T0, tokens=200, rate_limits=both), "tokens")
    assert local.admit(local_plan(T0, tokens=100, rate_limits=both)) is None
    _refused(local, local_plan(T0, tokens=0, rate_limits=both), "requests")


def test_local_leases_fail_open() -> None:
    local = LocalWindows()
    only_leases = (rate_limit("c", concurrent=1),)
    for _ in range(5):
        assert local.admit(local_plan(T0, rate_limits=only_leases)) is None


def test_denied_by_a_limit_that_never_resets_says_do_not_retry_and_no_when() -> None:
    forever = limit("forever", max_nanos=1 * USD, period="none")
    plan_ = plan((forever,))
    reservation = interpret_reservation(plan_, reply(0, 1, 1, -1, limits=((USD, 0),),
                                                     windows=()))
    assert reservation.denial is not None
    assert reservation.denial.headers == (("x-should-retry", "false"),)
