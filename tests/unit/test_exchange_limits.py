"""Spend limits and rate limits driven through the Exchange phases, with hand-built store replies.

The snapshot is the shipped builtin.yaml plus the keys, limits and rate limits below. The store is
never called: reservation and settlement replies are written by hand in the layouts documented at
the top of `extproc/store/lua/reserve.lua` and `settle.lua`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import orjson
import pytest

from extproc.core.decisions import BodyMode, Continue, Decision, Deny
from extproc.core.exchange import (
    REQUEST_ID_HEADER,
    ROUTING_HEADER,
    Exchange,
    Options,
    Reply,
    Reserve,
    Settlement,
)
from extproc.core.keys import find_key, hash_key
from extproc.core.quota import (
    LimitStatus,
    LocalWindows,
    Reservation,
    ReservationPlan,
    interpret_reservation,
    limit_headers,
    limits_result,
    rate_limit_headers,
)
from extproc.core.resources import Resource, validate_document
from extproc.core.snapshot import Snapshot, build_snapshot

pytestmark = pytest.mark.unit

SECRETS = {"OPENAI_API_KEY": "sk-up", "ANTHROPIC_API_KEY": "sk-ant"}
NOW = datetime(2026, 11, 14, 13, 45, 30, tzinfo=UTC).timestamp()
REQUEST_ID = "req-lim"
USD = 1_000_000_000  # nano-dollars

CAPPED = "tg-" + "c" * 43  # Block + Allow limit + rate limit
ALLOW_ONLY = "tg-" + "a" * 43  # Allow limit + rate limit
OPEN = "tg-" + "o" * 43  # a Block limit that fails open
FREE = "tg-" + "f" * 43  # nothing applies
NAMER = "tg-" + "n" * 43  # may name limits in x-tollgate-limit-ids
TAGGER = "tg-" + "t" * 43  # may select limits with request tags team-*
CASEY = "tg-" + "k" * 43  # may select limits with use cases summarise* and account acme
PROXY = "tg-" + "p" * 43  # a backend naming its end users (allowClientUser)
USERED = "tg-" + "u" * 43  # a key with a user, under a per-user rate limit

CHAT_PATH = "/v1/chat/completions"
DEFAULT = Options()


def _resource(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    return validate_document(
        {"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": {"name": name},
         "spec": spec}
    )


STORED = [
    _resource("VirtualKey", "capped", {"keySha256": hash_key(CAPPED), "tags": ["team-a"],
                                       "group": "eng", "user": "alice"}),
    _resource("VirtualKey", "allow-only", {"keySha256": hash_key(ALLOW_ONLY),
                                           "tags": ["team-a"]}),
    _resource("VirtualKey", "open", {"keySha256": hash_key(OPEN)}),
    _resource("VirtualKey", "free", {"keySha256": hash_key(FREE)}),
    _resource("VirtualKey", "namer", {"keySha256": hash_key(NAMER),
                                      "allowRequestLimits": True}),
    _resource("VirtualKey", "tagger", {"keySha256": hash_key(TAGGER),
                                       "allowedRequestTags": ["team-*"]}),
    _resource("VirtualKey", "casey", {"keySha256": hash_key(CASEY),
                                      "allowedUseCases": ["summarise*"],
                                      "allowedAccounts": ["acme"]}),
    _resource("Limit", "summaries", {"type": "Block", "max": 3,
                                     "selector": {"useCases": ["summarise"]}}),
    _resource("Limit", "acme-monthly", {"type": "Allow", "max": 3, "period": "month",
                                        "selector": {"accounts": ["acme"]}}),
    _resource("RateLimit", "per-use-case", {"per": "key", "requestsPerMinute": 9,
                                            "selector": {"useCases": ["summarise-v2"]}}),
    _resource("VirtualKey", "proxy", {"keySha256": hash_key(PROXY), "user": "svc",
                                      "allowClientUser": True}),
    _resource("VirtualKey", "usered", {"keySha256": hash_key(USERED), "user": "bob"}),
    _resource("RateLimit", "per-user", {
        "per": "user", "selector": {"keys": ["proxy", "usered"]}, "requestsPerMinute": 5,
    }),
    _resource("Upstream", "fast", {
        "provider": "openai", "cluster": "openai-fast", "models": ["fast"], "priority": 10,
        "aliases": {"fast": "gpt-4o-mini"},
        "credentials": [{"name": "d", "secretRef": "OPENAI_API_KEY"}],
    }),
    _resource("Limit", "block-monthly", {
        "type": "Block", "max": 10, "threshold": 0.8, "period": "month",
        "selector": {"keys": ["capped"]},
    }),
    _resource("Limit", "allow-daily", {
        "type": "Allow", "max": 5, "period": "day", "timeZone": "America/New_York",
        "selector": {"tags": ["team-a"]},
    }),
    _resource("Limit", "open-block", {
        "type": "Block", "max": 1, "failOpen": True, "selector": {"keys": ["open"]},
    }),
    _resource("Limit", "spare", {  # selects nobody: applies only when named
        "type": "Block", "max": 100, "selector": {"keys": ["nobody"]},
    }),
    _resource("RateLimit", "team-rl", {
        "per": "key", "selector": {"tags": ["team-a"]}, "requestsPerMinute": 2,
        "tokensPerMinute": 100_000, "concurrent": 3,
    }),
]


@pytest.fixture(scope="module")
def snapshot(builtin_resources: list[Resource]) -> Snapshot:
    return build_snapshot(1, builtin_resources, STORED, SECRETS.get)


def headers_for(
    key: str, path: str = CHAT_PATH, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    headers = {":path": path, ":method": "POST", "content-type": "application/json",
               "authorization": f"Bearer {key}"}
    headers.update(extra or {})
    return headers


def open_exchange(
    snapshot: Snapshot, headers: Mapping[str, str], options: Options = DEFAULT
) -> tuple[Exchange, Decision | Reply]:
    exchange = Exchange(REQUEST_ID, options)
    presented = find_key(headers)
    record = snapshot.keys_by_hash.get(hash_key(presented.value)) if presented else None
    return exchange, exchange.on_request_headers(headers, presented, record, snapshot, False, NOW)


def send(
    snapshot: Snapshot,
    key: str,
    body: dict[str, Any],
    *,
    path: str = CHAT_PATH,
    extra: Mapping[str, str] | None = None,
    options: Options = DEFAULT,
) -> tuple[Exchange, Decision | Reserve]:
    exchange, first = open_exchange(snapshot, headers_for(key, path, extra), options)
    assert isinstance(first, Continue), first
    return exchange, exchange.on_request_body(orjson.dumps(body), snapshot, NOW)


def chat(model: str = "gpt-4o", chars: int = 40, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "x" * chars}], **extra}


def reserve_for(snapshot: Snapshot, key: str = CAPPED, **extra: Any) -> tuple[Exchange, Reserve]:
    exchange, decision = send(snapshot, key, chat(max_tokens=100, **extra))
    assert isinstance(decision, Reserve), decision
    return exchange, decision


def reply_for(
    plan: ReservationPlan,
    allowed: int = 1,
    kind: int = 0,
    index: int = 0,
    retry: int = 0,
    spent: Mapping[str, int] | None = None,
    used: tuple[int, ...] | None = None,
) -> list[int]:
    """A reserve.lua reply: allowed, kind, index, retry ms, per limit spent/held, per window
    used/reset ms. Held is the estimate once reserved (0 on a denial)."""
    out = [allowed, kind, index, retry]
    for charge in plan.limits:
        out += [(spent or {}).get(charge.limit.name, 0), plan.estimate_nanos if allowed else 0]
    for i, window in enumerate(plan.windows):
        out += [used[i] if used else window.amount, 30_000]
    return out


def reserved(
    snapshot: Snapshot, key: str = CAPPED, **reply: Any
) -> tuple[Exchange, Reserve, Reservation, Decision]:
    exchange, reserve = reserve_for(snapshot, key)
    reservation = interpret_reservation(reserve.plan, reply_for(reserve.plan, **reply))
    return exchange, reserve, reservation, exchange.on_reserved(reserve, reservation)


# ---- request body: the plan ------------------------------------------------------------------


def strict_bound(body: dict[str, Any], input_usd: float, output_usd: float, out: int,
                 window: int | None = None) -> int:
    """docs/budgets.md, worked by hand, in nano-dollars: prompt <= body bytes + 64 (capped by
    the context window); $ per 1M tokens * 1000 = n$ per token; the total rounded up once."""
    prompt = len(orjson.dumps(body)) + 64
    if window is not None:
        prompt = min(prompt, window)
    exact = prompt * Fraction(str(input_usd)) * 1000 + out * Fraction(str(output_usd)) * 1000
    return math.ceil(exact)


@pytest.mark.parametrize(
    ("path", "body", "options", "tokens", "nanos"),
    [
        # gpt-4o {input: 2.50, output: 10.00}; 40 chars -> 10 tokens for rate windows
        (CHAT_PATH, chat(max_tokens=100), DEFAULT, 110,
         strict_bound(chat(max_tokens=100), 2.5, 10, 100)),
        (CHAT_PATH, chat(max_completion_tokens=50, max_tokens=999), DEFAULT, 60,
         strict_bound(chat(max_completion_tokens=50, max_tokens=999), 2.5, 10, 50)),
        # no cap in the request: the model's maximum output (gpt-4o: 16384), not 4096; rate
        # windows keep counting the configured default
        (CHAT_PATH, chat(), DEFAULT, 10 + 4096, strict_bound(chat(), 2.5, 10, 16_384)),
        (CHAT_PATH, chat(), Options(default_max_output_tokens=200), 10 + 200,
         strict_bound(chat(), 2.5, 10, 16_384)),
        # n choices each write up to the cap
        (CHAT_PATH, chat(max_tokens=100, n=3), DEFAULT, 310,
         strict_bound(chat(max_tokens=100, n=3), 2.5, 10, 300)),
        # the alias target is priced: gpt-4o-mini {0.15, 0.60}
        (CHAT_PATH, chat("fast", max_tokens=100), DEFAULT, 110,
         strict_bound(chat("fast", max_tokens=100), 0.15, 0.6, 100)),
        # embeddings have no output; the prompt is capped by the context window (8191)
        ("/v1/embeddings", {"model": "text-embedding-3-large", "input": "x" * 4000}, DEFAULT,
         1000, strict_bound({"model": "text-embedding-3-large", "input": "x" * 4000}, 0.13, 0,
                            0)),
        ("/v1/embeddings", {"model": "text-embedding-3-large", "input": "x" * 40000}, DEFAULT,
         10000, 8191 * 130),  # 0.13 $ per 1M tokens = 130 n$ per token
        # claude-sonnet-4-5: every prompt token at the highest input rate, a one-hour cache
        # write (6.00), output 15.00
        ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 100, "system": "y" * 8,
                          "messages": [{"role": "user", "content": "x" * 40}]}, DEFAULT, 112,
         strict_bound({"model": "claude-sonnet-4-5", "max_tokens": 100, "system": "y" * 8,
                       "messages": [{"role": "user", "content": "x" * 40}]}, 6, 15, 100)),
    ],
)
def test_reserve_plan_estimate_is_the_strict_bound(
    snapshot: Snapshot,
    path: str,
    body: dict[str, Any],
    options: Options,
    tokens: int,
    nanos: int,
) -> None:
    exchange, decision = send(snapshot, CAPPED, body, path=path, options=options)
    assert isinstance(decision, Reserve), decision
    plan = decision.plan
    assert plan.estimate_nanos == nanos
    assert plan.estimate_tokens == tokens
    assert exchange.plan is plan
    assert plan.request_id == REQUEST_ID


def test_reserve_plan_contents(snapshot: Snapshot) -> None:
    exchange, reserve = reserve_for(snapshot)
    plan = reserve.plan
    # sorted by name; periods in each limit's zone
    assert [(c.limit.name, c.limit.block, c.period_id) for c in plan.limits] == [
        ("allow-daily", False, "day:2026-11-14"),
        ("block-monthly", True, "month:2026-11"),
    ]
    assert [(w.rate_limit, w.scope, w.ident, w.metric, w.limit, w.amount)
            for w in plan.windows] == [
        ("team-rl", "key", "capped", "requests", 2, 1),
        ("team-rl", "key", "capped", "tokens", 100_000, 110),
    ]
    assert [(lease.rate_limit, lease.ident, lease.limit) for lease in plan.leases] == [
        ("team-rl", "capped", 3)
    ]
    assert plan.now_ms == int(NOW * 1000)
    assert plan.hold_deadline_ms == plan.now_ms + int(DEFAULT.hold_seconds * 1000)
    assert exchange.unknown_limits == ()
    # the decision to carry out once admitted: the same as for a key without limits
    _, free = send(snapshot, FREE, chat(max_tokens=100))
    assert isinstance(free, Continue)
    assert reserve.proceed == free
    assert dict(reserve.proceed.headers.set) == {ROUTING_HEADER: "openai",
                                                 "authorization": "Bearer sk-up"}
    assert reserve.proceed.clear_route_cache is True


def test_no_limits_is_a_plain_continue(snapshot: Snapshot) -> None:
    exchange, decision = send(snapshot, FREE, chat(max_tokens=100))
    assert isinstance(decision, Continue)
    assert not isinstance(decision, Reserve)
    assert exchange.plan is not None and exchange.plan.empty


def test_allow_only_key_reserves_without_block_limits(snapshot: Snapshot) -> None:
    _, reserve = reserve_for(snapshot, ALLOW_ONLY)
    assert [c.limit.name for c in reserve.plan.limits] == ["allow-daily"]
    assert [w.ident for w in reserve.plan.windows] == ["allow-only", "allow-only"]


def test_request_tags_bring_limits_in_only_for_keys_allowed_to_use_them(
    snapshot: Snapshot,
) -> None:
    _, decision = send(snapshot, TAGGER, chat(max_tokens=100),
                       extra={"x-tollgate-tags": "team-a, other"})
    assert isinstance(decision, Reserve)
    assert [c.limit.name for c in decision.plan.limits] == ["allow-daily"]
    assert {w.rate_limit for w in decision.plan.windows} == {"team-rl"}
    # An unrelated key naming the same tag is recorded with it, but selects nothing.
    exchange, decision = send(snapshot, FREE, chat(max_tokens=100),
                              extra={"x-tollgate-tags": "team-a, other"})
    assert not isinstance(decision, Reserve)
    assert exchange.request_tags == ("team-a", "other")


@pytest.mark.parametrize(
    ("key", "headers", "limits", "rate_limits"),
    [
        (CASEY, {"xproxy-usecase-name": "summarise"}, ["summaries"], set()),
        (CASEY, {"x-tollgate-use-case-id": "summarise"}, ["summaries"], set()),  # the id too
        (CASEY, {"xproxy-account-name": "acme"}, ["acme-monthly"], set()),
        (CASEY, {"x-tollgate-use-case-name": "summarise-v2", "xproxy-usecase-id": "summarise",
                 "x-tollgate-account-name": "acme"},
         ["acme-monthly", "summaries"], {"per-use-case"}),
        (CASEY, {"xproxy-usecase-name": "translate", "xproxy-account-name": "globex"}, [],
         set()),  # not among the key's allowed patterns: recorded, selects nothing
        (FREE, {"xproxy-usecase-name": "summarise", "xproxy-account-name": "acme"}, [],
         set()),  # a key without the permission cannot reach those budgets
    ],
)
def test_use_case_and_account_select_limits_only_as_the_key_allows(
    snapshot: Snapshot, key: str, headers: dict[str, str], limits: list[str],
    rate_limits: set[str],
) -> None:
    exchange, decision = send(snapshot, key, chat(max_tokens=100), extra=headers)
    if not limits and not rate_limits:
        assert not isinstance(decision, Reserve)
    else:
        assert isinstance(decision, Reserve)
        assert [c.limit.name for c in decision.plan.limits] == limits
        assert {w.rate_limit for w in decision.plan.windows} == rate_limits
    # Recorded either way (usage event, reports, xproxy_result).
    claimed = exchange.annotations
    assert (claimed.use_case_name or claimed.use_case_id or claimed.account_name)


@pytest.mark.parametrize(
    ("key", "headers", "body_user", "expected"),
    [
        (USERED, {}, "mallory", "bob"),  # the key's user, whatever the body says
        (FREE, {}, "mallory", ""),  # a key without a user stays without one
        (PROXY, {}, "end-user-1", "end-user-1"),  # allowed: the body names the user
        (PROXY, {"x-tollgate-user": "end-user-2"}, "end-user-1", "end-user-2"),  # header first
        (PROXY, {"xproxy-user-id": "end-user-3"}, None, "end-user-3"),
        (PROXY, {}, None, "svc"),  # allowed, but nobody named one: the key's
    ],
)
def test_user_comes_from_the_key_unless_the_key_allows_client_users(
    snapshot: Snapshot, key: str, headers: dict[str, str], body_user: str | None,
    expected: str,
) -> None:
    body = chat(max_tokens=100, **({"user": body_user} if body_user else {}))
    exchange, _ = send(snapshot, key, body, extra=headers)
    assert exchange.user == expected


def test_rotating_body_users_share_one_per_user_window_unless_allowed(
    snapshot: Snapshot,
) -> None:
    idents = set()
    for n in range(3):
        _, decision = send(snapshot, USERED, chat(max_tokens=10, user=f"u{n}"))
        assert isinstance(decision, Reserve)
        idents |= {w.ident for w in decision.plan.windows if w.rate_limit == "per-user"}
    assert idents == {"bob"}
    for n in range(3):  # a key allowed to name users gets one window per user
        _, decision = send(snapshot, PROXY, chat(max_tokens=10, user=f"u{n}"))
        assert isinstance(decision, Reserve)
        idents |= {w.ident for w in decision.plan.windows if w.rate_limit == "per-user"}
    assert idents == {"bob", "u0", "u1", "u2"}


def test_user_header_needs_allow_client_user(snapshot: Snapshot) -> None:
    _, decision = open_exchange(snapshot, headers_for(USERED, extra={"x-tollgate-user": "eve"}))
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (403, "client_user_not_allowed")


@pytest.mark.parametrize(
    ("key", "extra", "fragment"),
    [
        (PROXY, {"x-tollgate-user": "u" * 257}, "at most 256 characters"),
        (FREE, {"x-tollgate-tags": ",".join(f"t{n}" for n in range(33))}, "at most 32"),
        (FREE, {"x-tollgate-tags": "t" * 129}, "at most 128 characters"),
        (NAMER, {"x-tollgate-limit-ids": ",".join(f"l{n}" for n in range(17))}, "at most 16"),
        (NAMER, {"x-tollgate-limit-ids": "l" * 254}, "at most 253 characters"),
    ],
)
def test_client_strings_beyond_their_bounds_are_400(
    snapshot: Snapshot, key: str, extra: dict[str, str], fragment: str
) -> None:
    _, decision = open_exchange(snapshot, headers_for(key, extra=extra))
    assert isinstance(decision, Deny)
    assert decision.status == 400 and fragment in decision.message


def test_client_strings_at_their_bounds_pass(snapshot: Snapshot) -> None:
    extra = {"x-tollgate-user": "u" * 256,
             "x-tollgate-tags": ",".join(f"t{n:03d}" + "x" * 124 for n in range(32))}
    exchange, decision = open_exchange(snapshot, headers_for(PROXY, extra=extra))
    assert isinstance(decision, Continue)
    assert len(exchange.request_tags) == 32


def test_client_ip_is_the_address_envoy_gives_never_a_header(snapshot: Snapshot) -> None:
    exchange = Exchange(REQUEST_ID, DEFAULT)
    headers = headers_for(FREE, extra={"x-forwarded-for": "6.6.6.6",
                                       "x-envoy-external-address": "7.7.7.7"})
    presented = find_key(headers)
    record = snapshot.keys_by_hash[hash_key(FREE)]
    exchange.on_request_headers(headers, presented, record, snapshot, False, NOW,
                                client_ip="10.1.2.3")
    assert exchange.client_ip == "10.1.2.3"


# ---- named limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"x-tollgate-limit-ids": "spare"},
        {"xproxy-limit-ids": "spare"},
        {"x-tollgate-limit-ids": "block-monthly, nope"},
    ],
)
@pytest.mark.parametrize("key", [CAPPED, FREE, ALLOW_ONLY])
def test_naming_limits_needs_allow_request_limits(
    snapshot: Snapshot, key: str, extra: dict[str, str]
) -> None:
    _, decision = open_exchange(snapshot, headers_for(key, extra=extra))
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (403, "limit_ids_not_allowed")


@pytest.mark.parametrize("value", ["", " , ", ","])
def test_empty_limit_ids_header_is_not_a_request_for_limits(
    snapshot: Snapshot, value: str
) -> None:
    _, decision = open_exchange(snapshot, headers_for(FREE, extra={"x-tollgate-limit-ids": value}))
    assert isinstance(decision, Continue)


def test_named_limits_are_added_and_unknown_ones_reported(snapshot: Snapshot) -> None:
    extra = {"x-tollgate-limit-ids": "spare, nope", "xproxy-limit-ids": "nope,spare"}
    exchange, first = open_exchange(snapshot, headers_for(NAMER, extra=extra))
    assert isinstance(first, Continue)
    assert "x-tollgate-limit-ids" in first.headers.remove  # never forwarded upstream
    decision = exchange.on_request_body(orjson.dumps(chat(max_tokens=100)), snapshot, NOW)
    assert isinstance(decision, Reserve)
    assert [c.limit.name for c in decision.plan.limits] == ["spare"]
    assert decision.plan.windows == ()
    assert exchange.unknown_limits == ("nope",)


def test_only_unknown_names_reserve_nothing(snapshot: Snapshot) -> None:
    exchange, decision = send(snapshot, NAMER, chat(max_tokens=100),
                              extra={"x-tollgate-limit-ids": "nope"})
    assert isinstance(decision, Continue)
    assert exchange.unknown_limits == ("nope",)


# ---- on_reserved -----------------------------------------------------------------------------


def test_reserved_proceeds(snapshot: Snapshot) -> None:
    exchange, reserve, reservation, decision = reserved(snapshot, spent={"block-monthly": USD})
    assert decision is reserve.proceed
    assert exchange.reservation is reservation
    assert exchange.limit_statuses == reservation.limits
    assert exchange.holds_reservation
    assert not exchange.offline


def test_denied_by_block_limit(snapshot: Snapshot) -> None:
    spent = {"block-monthly": 9_999_000_000, "allow-daily": 5 * USD}  # at max: exceeded
    exchange, _, reservation, decision = reserved(snapshot, allowed=0, kind=1, index=2,
                                                  retry=-1, spent=spent)
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (429, "limit_exceeded")
    assert not exchange.holds_reservation
    doc = orjson.loads(decision.body(exchange.anthropic_style))
    assert doc["error"] == {"message": "Limit exceeded: block-monthly", "type": "LimitExceeded",
                            "code": 429, "limit_id": "block-monthly"}
    result = doc["xproxy_result"]
    assert result["request_id"] == REQUEST_ID
    assert result["blocked_limit_ids"] == ["block-monthly"]
    assert result["unknown_limit_ids"] == []
    assert {name: v["state"] for name, v in result["limits"].items()} == {
        "allow-daily": "exceeded", "block-monthly": "blocked"
    }
    assert result["limits"]["block-monthly"]["spent"] == 9.999
    headers = dict(decision.headers)
    # Not before the month ends (2026-12-01, 16 d 10 h 14 min 30 s away), so no SDK retries.
    assert headers["retry-after"] == "1419270"
    assert headers["x-should-retry"] == "false"
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert headers["x-tollgate-limits"] == limit_headers(reservation.limits)[0][1]
    assert "block-monthly;state=blocked;remaining=0.001000000;max=10.000000000" in (
        headers["x-tollgate-limits"]
    )
    assert decision.headers == (
        ("x-should-retry", "false"), ("retry-after", "1419270"),
        *rate_limit_headers(reservation.windows), *limit_headers(reservation.limits),
    )


def test_denied_by_rate_window(snapshot: Snapshot) -> None:
    exchange, _, _, decision = reserved(snapshot, allowed=0, kind=2, index=1, retry=1_500,
                                        used=(2, 50))
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (429, "rate_limit_exceeded")
    headers = dict(decision.headers)
    assert headers["retry-after"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-remaining-tokens"] == str(100_000 - 50)
    assert headers["x-ratelimit-reset-requests"] == "30s"
    assert "x-tollgate-limits" in headers
    doc = orjson.loads(decision.body())
    assert doc["xproxy_result"]["blocked_limit_ids"] == []
    assert doc["error"]["code"] == "rate_limit_exceeded"
    assert not exchange.holds_reservation


# ---- on_reserve_failed (the store is unreachable) --------------------------------------------


def test_block_limit_fails_closed(snapshot: Snapshot) -> None:
    exchange, reserve = reserve_for(snapshot, CAPPED)
    decision = exchange.on_reserve_failed(reserve, LocalWindows())
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (503, "limits_unavailable")
    assert decision.headers == (("retry-after", "1"),)
    assert orjson.loads(decision.body())["error"]["limit_ids"] == ["block-monthly"]
    assert not exchange.offline
    assert not exchange.holds_reservation


@pytest.mark.parametrize("key", [ALLOW_ONLY, OPEN])
def test_allow_limits_rate_limits_and_fail_open_blocks_are_admitted(
    snapshot: Snapshot, key: str
) -> None:
    exchange, reserve = reserve_for(snapshot, key)
    assert reserve.plan.limits  # something was to be reserved
    decision = exchange.on_reserve_failed(reserve, LocalWindows())
    assert decision is reserve.proceed
    assert exchange.offline is True
    assert exchange.holds_reservation


def test_local_windows_refuse_once_full(snapshot: Snapshot) -> None:
    local = LocalWindows()  # one per replica, shared by its streams
    for _ in range(2):  # team-rl: 2 requests per minute
        exchange, reserve = reserve_for(snapshot, ALLOW_ONLY)
        assert exchange.on_reserve_failed(reserve, local) is reserve.proceed
    exchange, reserve = reserve_for(snapshot, ALLOW_ONLY)
    decision = exchange.on_reserve_failed(reserve, local)
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (429, "rate_limit_exceeded")
    assert dict(decision.headers)["retry-after"] == "5"
    assert not exchange.offline
    # another key's window is its own (the open key has no rate limit at all)
    exchange, reserve = reserve_for(snapshot, OPEN)
    assert exchange.on_reserve_failed(reserve, local) is reserve.proceed


# ---- response headers ------------------------------------------------------------------------

# gpt-4o, max_tokens 100. Without a strict Block limit: the closer estimate, 10 prompt tokens
# (10 * 2.5 + 100 * 10 micro-dollars, in nano-dollars); with one: the strict bound (body bytes).
ESTIMATE = 1_025_000
STRICT_ESTIMATE = strict_bound(chat(max_tokens=100), 2.5, 10, 100)


@pytest.mark.parametrize(
    ("status", "content_type", "due", "buffered"),
    [
        ("500", "application/json", Settlement(0, 0, 500, "upstream_error"), False),
        ("503", "text/plain", Settlement(0, 0, 503, "upstream_error"), False),
        ("429", "application/json", Settlement(0, 0, 429, "upstream_error"), False),
        ("400", "application/json", Settlement(0, 0, 400, "upstream_error"), False),
        ("200", "text/plain", Settlement(STRICT_ESTIMATE, 110, 200, "unpriced_response"), False),
        ("200", "", Settlement(STRICT_ESTIMATE, 110, 200, "unpriced_response"), False),
        ("200", "application/json", None, True),
        ("201", "application/json; charset=utf-8", None, True),
    ],
)
def test_response_headers_decide_the_settlement(
    snapshot: Snapshot, status: str, content_type: str, due: Settlement | None, buffered: bool
) -> None:
    exchange, _, reservation, _ = reserved(snapshot)
    exchange.admitted = True
    decision = exchange.on_response_headers({":status": status, "content-type": content_type})
    assert exchange.due == due
    assert decision.response_body_mode is (BodyMode.BUFFERED if buffered else None)
    assert decision.headers.set == (
        (REQUEST_ID_HEADER, REQUEST_ID), *rate_limit_headers(reservation.windows)
    )
    assert dict(decision.headers.set)["x-ratelimit-remaining-requests"] == "1"


def test_response_headers_without_a_reservation(snapshot: Snapshot) -> None:
    exchange, reserve = reserve_for(snapshot, ALLOW_ONLY)
    exchange.on_reserve_failed(reserve, LocalWindows())
    decision = exchange.on_response_headers({":status": "200", "content-type": "text/plain"})
    assert decision.headers.set == ((REQUEST_ID_HEADER, REQUEST_ID),)  # nothing to report
    assert exchange.due == Settlement(ESTIMATE, 110, 200, "unpriced_response")


# ---- response body ---------------------------------------------------------------------------

RESPONSE = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o", "choices": [],
    "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
})
PRICED = Settlement(225_000, 30, 200, "priced")  # (10 * 2.5 + 20 * 10) micro-dollars


def priced_exchange(
    snapshot: Snapshot, options: Options = DEFAULT
) -> tuple[Exchange, Reservation]:
    exchange, reserve = send(snapshot, CAPPED, chat(max_tokens=100), options=options)
    assert isinstance(reserve, Reserve)
    reservation = interpret_reservation(
        reserve.plan, reply_for(reserve.plan, spent={"block-monthly": 8 * USD})
    )
    exchange.on_reserved(reserve, reservation)
    exchange.admitted = True
    head = exchange.on_response_headers({":status": "200", "content-type": "application/json"})
    assert head.response_body_mode is BodyMode.BUFFERED
    assert exchange.due is None  # the body phase prices
    assert exchange.on_response_body(RESPONSE) == PRICED
    assert exchange.due == PRICED
    return exchange, reservation


SETTLED = (
    LimitStatus("allow-daily", "ok", 225_000, 0, 5 * USD, "day:2026-11-14"),
    LimitStatus("block-monthly", "exceeded", 8 * USD + 225_000, 0, 10 * USD, "month:2026-11"),
)


def test_response_body_reports_settled_states(snapshot: Snapshot) -> None:
    exchange, _ = priced_exchange(snapshot)
    assert exchange.take_due() == PRICED
    reply = exchange.response_body_reply(RESPONSE, SETTLED)
    headers = dict(reply.headers.set)
    assert headers["x-tollgate-cost"] == "0.000225000"
    assert headers["x-tollgate-limits"] == (
        "allow-daily;state=ok;remaining=4.999775000;max=5.000000000, "
        "block-monthly;state=exceeded;remaining=1.999775000;max=10.000000000"
    )
    assert reply.body is not None
    result = orjson.loads(reply.body)["xproxy_result"]
    types = {"allow-daily": False, "block-monthly": True}
    assert result["limits"] == limits_result(SETTLED, types)
    assert result["limits"]["block-monthly"]["state"] == "exceeded"
    assert result["limits"]["block-monthly"]["limit_type"] == "block"
    assert result["limits"]["allow-daily"]["limit_type"] == "allow"
    assert result["limits"]["block-monthly"]["current"] == 8.000225
    assert result["limits"]["block-monthly"]["remaining"] == 1.999775
    assert result["unknown_limit_ids"] == []
    assert exchange.limit_statuses == SETTLED


def test_response_body_journaled_reports_reservation_states(snapshot: Snapshot) -> None:
    exchange, reservation = priced_exchange(snapshot)
    exchange.take_due()
    reply = exchange.response_body_reply(RESPONSE, None)
    headers = dict(reply.headers.set)
    assert headers["x-tollgate-limits"] == limit_headers(reservation.limits)[0][1]
    # at reservation: 8 spent + the estimate held against a 10 max, threshold 8 -> exceeded
    assert "block-monthly;state=exceeded;remaining=1.998547500;max=10.000000000" in (
        headers["x-tollgate-limits"]
    )
    assert reply.body is not None
    result = orjson.loads(reply.body)["xproxy_result"]
    assert result["limits"] == limits_result(
        reservation.limits, {"allow-daily": False, "block-monthly": True})
    assert result["limits"]["block-monthly"]["held"] == STRICT_ESTIMATE / USD


def test_response_body_without_result_object_still_has_limit_headers(
    snapshot: Snapshot,
) -> None:
    exchange, _ = priced_exchange(snapshot, Options(result_object=False))
    reply = exchange.response_body_reply(RESPONSE, SETTLED)
    assert reply.body is None
    assert dict(reply.headers.set)["x-tollgate-limits"] == limit_headers(SETTLED)[0][1]


def test_named_unknown_limits_reach_the_result(snapshot: Snapshot) -> None:
    exchange, decision = send(snapshot, NAMER, chat("gpt-4o", max_tokens=100),
                              extra={"x-tollgate-limit-ids": "nope"})
    assert isinstance(decision, Continue)
    exchange.admitted = True
    exchange.on_response_headers({":status": "200", "content-type": "application/json"})
    exchange.on_response_body(RESPONSE)
    reply = exchange.response_body_reply(RESPONSE, ())
    assert "x-tollgate-limits" not in dict(reply.headers.set)
    assert reply.body is not None
    result = orjson.loads(reply.body)["xproxy_result"]
    assert result["unknown_limit_ids"] == ["nope"]
    assert result["limits"] == {}


# ---- settlement: take_due and settlement_on_abort --------------------------------------------


def test_take_due_hands_out_once(snapshot: Snapshot) -> None:
    exchange, _, _, _ = reserved(snapshot)
    exchange.admitted = True
    assert exchange.take_due() is None  # nothing decided yet
    assert not exchange.settled
    exchange.on_response_headers({":status": "502", "content-type": "text/html"})
    assert exchange.take_due() == Settlement(0, 0, 502, "upstream_error")
    assert exchange.settled
    assert exchange.take_due() is None
    assert exchange.settlement_on_abort() is None


def test_abort_when_not_admitted(snapshot: Snapshot) -> None:
    exchange, _, _, decision = reserved(snapshot, allowed=0, kind=1, index=2, retry=-1)
    assert isinstance(decision, Deny)
    assert exchange.settlement_on_abort() is None
    # nor before the request got anywhere
    fresh = Exchange(REQUEST_ID, DEFAULT)
    assert fresh.settlement_on_abort() is None


def test_abort_without_a_response_records_the_estimate(snapshot: Snapshot) -> None:
    exchange, _, _, _ = reserved(snapshot)
    exchange.admitted = True
    assert exchange.settlement_on_abort() == Settlement(STRICT_ESTIMATE, 110, 0, "aborted")
    assert exchange.settled
    assert exchange.settlement_on_abort() is None


def test_abort_after_2xx_headers_before_the_body_records_the_estimate(
    snapshot: Snapshot,
) -> None:
    exchange, _, _, _ = reserved(snapshot)
    exchange.admitted = True
    exchange.on_response_headers({":status": "200", "content-type": "application/json"})
    assert exchange.settlement_on_abort() == Settlement(STRICT_ESTIMATE, 110, 200, "aborted")
    assert exchange.settlement_on_abort() is None


def test_abort_after_an_error_status_records_zero_once(snapshot: Snapshot) -> None:
    exchange, _, _, _ = reserved(snapshot)
    exchange.admitted = True
    exchange.on_response_headers({":status": "500", "content-type": "application/json"})
    # the edge did not take the settlement before the stream ended
    assert exchange.settlement_on_abort() == Settlement(0, 0, 500, "upstream_error")
    assert exchange.settlement_on_abort() is None
    assert exchange.take_due() is None


def test_abort_after_settlement_is_nothing(snapshot: Snapshot) -> None:
    exchange, _ = priced_exchange(snapshot)
    assert exchange.take_due() == PRICED
    assert exchange.settlement_on_abort() is None


def test_abort_with_a_priced_settlement_pending_hands_that_out(snapshot: Snapshot) -> None:
    exchange, _ = priced_exchange(snapshot)
    assert exchange.settlement_on_abort() == PRICED
    assert exchange.take_due() is None
    assert exchange.settlement_on_abort() is None


def test_abort_offline_records_the_estimate(snapshot: Snapshot) -> None:
    exchange, reserve = reserve_for(snapshot, ALLOW_ONLY)
    exchange.on_reserve_failed(reserve, LocalWindows())
    exchange.admitted = True
    assert exchange.settlement_on_abort() == Settlement(ESTIMATE, 110, 0, "aborted")


def test_abort_without_limits_still_records_the_estimate(snapshot: Snapshot) -> None:
    # no plan to settle, but the usage event is still written, conservatively
    exchange, decision = send(snapshot, FREE, chat(max_tokens=100))
    assert isinstance(decision, Continue)
    exchange.admitted = True
    assert exchange.settlement_on_abort() == Settlement(ESTIMATE, 110, 0, "aborted")
