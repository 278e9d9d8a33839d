"""Spend limits and rate limits: which apply to a request, what to reserve, what the answer means.

Plan -> execute -> interpret: `plan_reservation` lists what one request must reserve (spend
holds, rate-window charges, concurrency leases) as plain data; the store runs it in one atomic
Lua script; `interpret_reservation` turns the script's reply into a decision. Settlement works
the same way (`interpret_settlement`). Nothing here knows Redis key names: charges carry logical
identifiers that the store's key schema maps to keys.

Limit states: `ok` spend < threshold*max; `exceeded` threshold*max <=
spend <= max (does NOT block); `overrun` spend > max; `blocked` the request was refused by it.
Strict enforcement admits only if spent + held + estimate <= max, so concurrent requests on any
number of replicas can never push a Block limit past max; reactive enforcement (the looser rule some
users prefer) refuses only once spend > max.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from extproc.core.decisions import Deny
from extproc.core.periods import period_bounds
from extproc.core.pricing import format_nanos, nanos_to_usd
from extproc.core.values import value_type

WINDOW_MS = 60_000
BUCKET_MS = 5_000  # rolling-window granularity: a refusal is at most this early
BUCKETS = WINDOW_MS // BUCKET_MS
_DURATION = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_WINDOW_MS = 30 * 86_400_000


def parse_window(text: str) -> int | None:
    """A rate-limit window in LiteLLM's duration format (`30s`, `5m`, `1h`, `1d`, as its
    `budget_duration`) -> ms; None when it is not one or lies outside 1 s .. 30 d."""
    match = _DURATION.match(text.strip())
    if match is None:
        return None
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    return ms if ms <= MAX_WINDOW_MS else None


def window_buckets(window_ms: int) -> tuple[int, int]:
    """(bucket width ms, buckets) of a rolling window: 12 buckets (the 60 s window's 5 s), or
    10 when the window's ms do not split in 12 (every whole-second window splits in 10). A
    refusal is at most one bucket early."""
    count = 12 if window_ms % 12 == 0 else 10
    return window_ms // count, count


def window_label(window_ms: int) -> str:
    """`minute` for the 60 s window, else the shortest duration text (`10s`, `1h`, `90m`)."""
    if window_ms == WINDOW_MS:
        return "minute"
    for unit in ("d", "h", "m"):
        if window_ms % _UNIT_MS[unit] == 0:
            return f"{window_ms // _UNIT_MS[unit]}{unit}"
    return f"{window_ms // 1000}s"
STATES = ("ok", "exceeded", "overrun")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._@/+-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Selector:
    """Which requests a limit covers. Every non-empty list must match (AND across lists, OR
    within one); an empty selector covers every request."""

    keys: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    # Namespaces whose keys are covered; empty = every namespace. Limits from resources carry
    # their own namespace here unless they ask for more (`selector.namespaces`).
    namespaces: tuple[str, ...] = ()
    # Use case (name or id) and account name the request says it is for (Pay-i annotations);
    # the subject carries only the ones its key may use (core/attribution.py).
    use_cases: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()

    def matches(self, subject: Subject) -> bool:
        if self.namespaces and subject.namespace not in self.namespaces:
            return False
        if self.keys and subject.key not in self.keys:
            return False
        if self.groups and subject.group not in self.groups:
            return False
        if self.users and subject.user not in self.users:
            return False
        if self.tags and not set(self.tags) & set(subject.tags):
            return False
        if self.use_cases and not set(self.use_cases) & set(subject.use_cases):
            return False
        if self.accounts and subject.account not in self.accounts:
            return False
        return not self.models or any(
            fnmatch.fnmatchcase(subject.model, p)
            or (subject.requested_model and fnmatch.fnmatchcase(subject.requested_model, p))
            for p in self.models
        )


@dataclass(frozen=True, slots=True)
class LimitSpec:
    name: str
    block: bool  # type Block (enforce) vs Allow (track only)
    max_nanos: int
    threshold_nanos: int
    period: str
    time_zone: str
    strict: bool  # enforcement strict (reservation) vs reactive
    fail_open: bool  # admit when Redis is unreachable (Block limits fail closed by default)
    selector: Selector
    clamp: bool = False  # onInsufficient: clamp (lower the output cap) instead of refusing
    min_output_tokens: int = 16  # the smallest output cap a clamp may leave


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    name: str
    per: str  # key | user | group | model | ip | global
    selector: Selector
    requests_per_minute: int | None  # per window (the name is from when it was always 60 s)
    tokens_per_minute: int | None
    concurrent: int | None
    window_ms: int = WINDOW_MS


@value_type
class Subject:
    """Who and what a request is, for matching limits."""

    key: str
    group: str
    user: str
    tags: tuple[str, ...]
    model: str  # the model's identity: a dated name's priced base model (PriceBook.canonical)
    ip: str
    requested_model: str = ""  # the exact name asked for, when it differs from `model`
    namespace: str = "default"  # the key's namespace; `key` is its canonical id
    use_cases: tuple[str, ...] = ()  # use case name and id, when the key may select by them
    account: str = ""  # account name, when the key may select by it


def scope_id(rate_limit: RateLimitSpec, subject: Subject) -> str:
    """The identity a rate limit counts by. Values that are unsafe inside a Redis key name
    (colons, braces, very long strings) are replaced by a digest."""
    raw = {
        "key": subject.key,
        # A request with no user counts as its key's own user: requests of different keys
        # without users must not share (and exhaust) one window.
        "user": subject.user or f"key/{subject.key}",
        "group": subject.group,
        "model": subject.model,
        "ip": subject.ip,
        "global": "all",
    }[rate_limit.per]
    if _SAFE_ID.match(raw):
        return raw
    import hashlib

    return "h-" + hashlib.sha256(raw.encode()).hexdigest()[:24]


@value_type
class LimitCharge:
    limit: LimitSpec
    period_id: str
    ttl_ms: int  # state key lifetime: the period plus 35 days, for reporting
    ends_ms: int | None = None  # when the period ends (None: `period: none` never resets)


@value_type
class WindowCharge:
    rate_limit: str
    scope: str
    ident: str
    metric: str  # "requests" | "tokens"
    limit: int
    amount: int
    window_ms: int = WINDOW_MS

    @property
    def buckets(self) -> tuple[int, int]:
        """(bucket width ms, buckets) of this window."""
        return window_buckets(self.window_ms)


@dataclass(frozen=True, slots=True)
class LeaseCharge:
    rate_limit: str
    scope: str
    ident: str
    limit: int


@value_type
class CredentialCharge:
    """One candidate credential of the chosen upstream, in the order they may be tried."""

    upstream: str
    name: str
    secret_ref: str
    model: str
    primary: bool
    rpm: int | None
    tpm: int | None


@value_type
class ReservationPlan:
    request_id: str
    now_ms: int
    hold_deadline_ms: int
    estimate_nanos: int
    estimate_tokens: int
    limits: tuple[LimitCharge, ...]
    windows: tuple[WindowCharge, ...]
    leases: tuple[LeaseCharge, ...]
    credentials: tuple[CredentialCharge, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.limits or self.windows or self.leases or self.credentials)

    @property
    def lease_deadline_ms(self) -> int:
        """Concurrency leases end with the hold: a lost request frees its slot when the sweeper
        would settle it."""
        return self.hold_deadline_ms

    @property
    def token_windows(self) -> tuple[WindowCharge, ...]:
        return tuple([w for w in self.windows if w.metric == "tokens"])

    @property
    def bucket(self) -> int:
        return self.now_ms // BUCKET_MS


@dataclass(slots=True)
class _LimitIndex:
    """Limits by name, and split into those whose selector names keys (found by the request's
    key) and the rest (checked one by one). Without it every request scanned every stored
    limit: 80 ms per request with 100,000 limits (bench/scale.py)."""

    by_name: dict[str, LimitSpec]
    by_key: dict[str, list[LimitSpec]]
    general: list[LimitSpec]


# The snapshot's limits tuple -> its index (the tuple is kept referenced, so its id is not reused
# while cached). Two entries: requests of the previous snapshot may run during a reload.
_INDEXES: dict[int, tuple[object, _LimitIndex]] = {}


def _limit_index(limits: Iterable[LimitSpec]) -> _LimitIndex:
    cached = _INDEXES.get(id(limits))
    if cached is not None and cached[0] is limits:
        return cached[1]
    by_name: dict[str, LimitSpec] = {}
    for limit in limits:
        by_name[limit.name] = limit
    by_key: dict[str, list[LimitSpec]] = {}
    general: list[LimitSpec] = []
    for limit in by_name.values():
        if limit.selector.keys:
            for key in dict.fromkeys(limit.selector.keys):
                by_key.setdefault(key, []).append(limit)
        else:
            general.append(limit)
    index = _LimitIndex(by_name, by_key, general)
    if isinstance(limits, tuple):  # immutable: safe to remember (a list could change)
        _remember(limits, index)
    return index


def _remember(limits: tuple[LimitSpec, ...], index: _LimitIndex) -> None:
    if len(_INDEXES) >= 2:
        _INDEXES.pop(next(iter(_INDEXES)))
    _INDEXES[id(limits)] = (limits, index)


def reindex(previous: tuple[LimitSpec, ...], limits: tuple[LimitSpec, ...],
            changed: Iterable[str], rebuilt: Iterable[LimitSpec]) -> None:
    """Index `limits` — `previous` with the limits named `changed` dropped and `rebuilt` (the
    changed ones still stored) put in — from `previous`'s index, if that was built, in time
    proportional to the change. Indexing 100,000 limits from scratch takes about 0.2 s, which
    the first request after every configuration change would otherwise wait (and its worker
    with it)."""
    cached = _INDEXES.get(id(previous))
    if cached is None or cached[0] is not previous:
        return  # never used: built on first use, as usual
    old = cached[1]
    names = set(changed)
    fresh = list(rebuilt)
    by_name = dict(old.by_name)
    keys: set[str] = set()
    general = False
    for limit in [*(old.by_name[n] for n in names if n in old.by_name), *fresh]:
        by_name.pop(limit.name, None)
        keys.update(limit.selector.keys)
        general = general or not limit.selector.keys
    by_name.update((limit.name, limit) for limit in fresh)
    by_key = dict(old.by_key)
    for key in keys:
        listed = [lim for lim in old.by_key.get(key, ()) if lim.name not in names]
        listed += [lim for lim in fresh if key in lim.selector.keys]
        if listed:
            by_key[key] = listed
        else:
            by_key.pop(key, None)
    rest = old.general
    if general:
        rest = [lim for lim in old.general if lim.name not in names]
        rest += [lim for lim in fresh if not lim.selector.keys]
    _remember(limits, _LimitIndex(by_name, by_key, rest))


def applicable(
    limits: Iterable[LimitSpec], subject: Subject, named: Sequence[str]
) -> tuple[list[LimitSpec], list[str]]:
    """Limits that cover this request (by selector, or named in the request header), and the
    named ids that do not exist."""
    index = _limit_index(limits)
    by_name = index.by_name
    candidates = index.general + index.by_key.get(subject.key, [])
    chosen = {lim.name: lim for lim in candidates if lim.selector.matches(subject)}
    unknown = []
    for name in named:
        if name in by_name:
            chosen[name] = by_name[name]
        elif name not in unknown:  # named twice (e.g. in both limit-ids headers): report once
            unknown.append(name)
    return sorted(chosen.values(), key=lambda lim: lim.name), unknown


_RETENTION_MS = 35 * 86_400_000


def plan_reservation(
    *,
    request_id: str,
    now: float,
    limits: Sequence[LimitSpec],
    rate_limits: Iterable[RateLimitSpec],
    subject: Subject,
    estimate_nanos: int,
    estimate_tokens: int,
    hold_seconds: float,
    credentials: Sequence[CredentialCharge] = (),
) -> ReservationPlan:
    now_ms = int(now * 1000)
    charges = []
    for limit in limits:
        period_id, end = period_bounds(limit.period, limit.time_zone, now)
        ttl = 0 if end is None else int((end - now) * 1000) + _RETENTION_MS
        charges.append(LimitCharge(limit, period_id, ttl,
                                   None if end is None else int(end * 1000)))
    windows: list[WindowCharge] = []
    leases: list[LeaseCharge] = []
    for rl in rate_limits:
        if not rl.selector.matches(subject):
            continue
        ident = scope_id(rl, subject)
        if rl.requests_per_minute is not None:
            windows.append(WindowCharge(rl.name, rl.per, ident, "requests",
                                        rl.requests_per_minute, 1, rl.window_ms))
        if rl.tokens_per_minute is not None:
            windows.append(WindowCharge(rl.name, rl.per, ident, "tokens", rl.tokens_per_minute,
                                        estimate_tokens, rl.window_ms))
        if rl.concurrent is not None:
            leases.append(LeaseCharge(rl.name, rl.per, ident, rl.concurrent))
    deadline = now_ms + int(hold_seconds * 1000)
    return ReservationPlan(
        request_id=request_id,
        now_ms=now_ms,
        hold_deadline_ms=deadline,
        estimate_nanos=estimate_nanos,
        estimate_tokens=estimate_tokens,
        limits=tuple(charges),
        windows=tuple(windows),
        leases=tuple(leases),
        credentials=tuple(credentials),
    )


# ---- interpreting replies ----------------------------------------------------------------


@value_type
class LimitStatus:
    name: str
    state: str  # ok | exceeded | overrun | blocked
    spent_nanos: int
    held_nanos: int
    max_nanos: int
    period_id: str

    @property
    def remaining_nanos(self) -> int:
        return max(0, self.max_nanos - self.spent_nanos - self.held_nanos)


@value_type
class WindowStatus:
    charge: WindowCharge
    used: int
    reset_ms: int

    @property
    def remaining(self) -> int:
        return max(0, self.charge.limit - self.used)


@value_type
class Reservation:
    """What the reserve script said. `denial` is None when everything was reserved."""

    plan: ReservationPlan
    limits: tuple[LimitStatus, ...]
    windows: tuple[WindowStatus, ...]
    denial: Deny | None
    blocked_limit: str | None = None
    credential: CredentialCharge | None = None
    credential_requests: int = 0  # in the credential's current window, this one included
    credential_tokens: int = 0
    no_credential: bool = False  # refused because no credential candidate was usable


def state_of(spent: int, limit: LimitSpec) -> str:
    if spent > limit.max_nanos:
        return "overrun"
    if spent >= limit.threshold_nanos:
        return "exceeded"
    return "ok"


def interpret_reservation(plan: ReservationPlan, reply: Sequence[int]) -> Reservation:
    allowed, kind, index, retry_ms = (int(v) for v in reply[:4])
    pos = 4
    statuses = []
    for i, charge in enumerate(plan.limits, start=1):
        spent, held = int(reply[pos]), int(reply[pos + 1])
        pos += 2
        state = "blocked" if (not allowed and kind == 1 and index == i) else state_of(
            spent, charge.limit
        )
        statuses.append(LimitStatus(charge.limit.name, state, spent, held,
                                    charge.limit.max_nanos, charge.period_id))
    windows = []
    for window in plan.windows:
        windows.append(WindowStatus(window, int(reply[pos]), int(reply[pos + 1])))
        pos += 2
    limit_statuses, window_statuses = tuple(statuses), tuple(windows)
    chosen = int(reply[pos]) if len(reply) > pos else 0
    credential = plan.credentials[chosen - 1] if chosen > 0 else None
    used = (int(reply[pos + 1]), int(reply[pos + 2])) if len(reply) > pos + 2 else (0, 0)
    if allowed:
        return Reservation(plan, limit_statuses, window_statuses, None,
                           credential=credential, credential_requests=used[0],
                           credential_tokens=used[1])
    if kind == 5:
        # Only a reserve that ran after its request was given up (stalled Redis) gets this;
        # nobody is normally waiting for the answer.
        deny = Deny(503, "limits_unavailable", "Spend limits could not be checked in time; "
                    "retry shortly.", headers=(("retry-after", "1"),))
        return Reservation(plan, limit_statuses, window_statuses, deny)
    if kind == 4:
        upstream = plan.credentials[0].upstream if plan.credentials else "?"
        wait = max(1, -(-retry_ms // 1000)) if retry_ms > 0 else 1
        deny = Deny(
            503, "no_credential_available",
            f"Every credential of upstream '{upstream}' is cooling down or at its rate cap; "
            "retry shortly.",
            headers=(("retry-after", str(wait)),),
        )
        return Reservation(plan, limit_statuses, window_statuses, deny, no_credential=True)
    if kind == 1:
        charge = plan.limits[index - 1]
        limit = charge.limit
        deny = Deny(
            429, "limit_exceeded", f"Limit exceeded: {limit.name}",
            type_override="LimitExceeded", code_value=429, extra={"limit_id": limit.name},
            headers=_budget_refusal_headers(charge, plan.now_ms),
        )
        return Reservation(plan, limit_statuses, window_statuses, deny, limit.name)
    retry_after = None if retry_ms < 0 else max(1, -(-retry_ms // 1000))
    if kind == 2:
        hit = plan.windows[index - 1]
        message = (f"Rate limit reached for {hit.metric} per {window_label(hit.window_ms)} "
                   f"({hit.rate_limit}, per {hit.scope}): limit {hit.limit}.")
        if retry_after is None:
            message += " This request alone is larger than the limit."
    else:
        lease = plan.leases[index - 1]
        message = (f"Too many concurrent requests ({lease.rate_limit}, per {lease.scope}): "
                   f"limit {lease.limit}.")
        retry_after = retry_after or 1
    headers = (("retry-after", str(retry_after)),) if retry_after is not None else ()
    deny = Deny(429, "rate_limit_exceeded", message, headers=headers)
    return Reservation(plan, limit_statuses, window_statuses, deny)


def _budget_refusal_headers(charge: LimitCharge, now_ms: int) -> tuple[tuple[str, str], ...]:
    """A budget refusal cannot succeed before the period resets: `x-should-retry: false` stops
    the openai/anthropic SDKs' automatic retries (they read it before anything else), and
    `Retry-After` says when the period ends (absent for `period: none`, which never resets)."""
    headers: tuple[tuple[str, str], ...] = (("x-should-retry", "false"),)
    if charge.ends_ms is not None:
        seconds = max(1, -(-(charge.ends_ms - now_ms) // 1000))
        headers += (("retry-after", str(seconds)),)
    return headers


def interpret_settlement(plan: ReservationPlan, reply: Sequence[int]) -> tuple[LimitStatus, ...]:
    out = []
    pos = 1
    for charge in plan.limits:
        spent, held, code = int(reply[pos]), int(reply[pos + 1]), int(reply[pos + 2])
        pos += 3
        out.append(LimitStatus(charge.limit.name, STATES[code], spent, held,
                               charge.limit.max_nanos, charge.period_id))
    return tuple(out)


# ---- what the client sees ----------------------------------------------------------------


def _duration(ms: int) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = -(-ms // 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:  # windows of an hour or a day (`window: 1d`), as Go prints a duration
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def rate_limit_headers(windows: Sequence[WindowStatus]) -> tuple[tuple[str, str], ...]:
    """OpenAI-convention headers for the most constrained requests and tokens windows."""
    headers: list[tuple[str, str]] = []
    for metric in ("requests", "tokens"):
        relevant = [w for w in windows if w.charge.metric == metric]
        if not relevant:
            continue
        tightest = min(relevant, key=lambda w: (w.remaining, -w.reset_ms))
        headers += [
            (f"x-ratelimit-limit-{metric}", str(tightest.charge.limit)),
            (f"x-ratelimit-remaining-{metric}", str(tightest.remaining)),
            (f"x-ratelimit-reset-{metric}", _duration(tightest.reset_ms)),
        ]
    return tuple(headers)


def limit_headers(statuses: Sequence[LimitStatus]) -> tuple[tuple[str, str], ...]:
    """`x-tollgate-limits: <name>;state=ok;remaining=12.500000000;max=100.000000000, ...`"""
    if not statuses:
        return ()
    value = ", ".join(
        f"{s.name};state={s.state};remaining={format_nanos(s.remaining_nanos)};"
        f"max={format_nanos(s.max_nanos)}"
        for s in statuses
    )
    return (("x-tollgate-limits", value),)


def limits_result(
    statuses: Sequence[LimitStatus], blocking: Mapping[str, bool] | None = None
) -> dict[str, object]:
    """The `limits` member of the result object: `{limit_id: {state, ...}}` as the Pay-i SDK
    parses it, with the per-limit details Pay-i documents (`limit_type`, `current`, `max`,
    `remaining`); `blocking` says which limits are Block limits."""
    return {
        s.name: {
            "state": s.state,
            **({"limit_type": "block" if blocking[s.name] else "allow"}
               if blocking is not None and s.name in blocking else {}),
            "current": nanos_to_usd(s.spent_nanos),
            "period": s.period_id,
            "spent": nanos_to_usd(s.spent_nanos),
            "held": nanos_to_usd(s.held_nanos),
            "max": nanos_to_usd(s.max_nanos),
            "remaining": nanos_to_usd(s.remaining_nanos),
        }
        for s in statuses
    }


class LocalWindows:
    """Per-replica rate limiting used while Redis is unreachable (rate limits fail open to it).

    Same bucketed rolling windows as the Redis script, but counted in this process only, so with
    N replicas the effective limit is up to N times the configured one during an outage.
    Concurrency leases are not tracked locally (in-flight requests cannot be known without the
    shared store); they fail open.
    """

    def __init__(self, max_windows: int = 50_000) -> None:
        self._windows: dict[tuple[str, str, str], dict[int, int]] = {}
        self.max_windows = max_windows

    def admit(self, plan: ReservationPlan) -> Deny | None:
        checked = []
        for w in plan.windows:
            width, count = w.buckets
            bucket = plan.now_ms // width
            key = (w.rate_limit, w.ident, f"{w.metric}/{w.window_ms}")
            counts = self._windows.get(key)
            if counts is None:
                if len(self._windows) >= self.max_windows:
                    self._windows.clear()  # bounded memory beats precision during an outage
                counts = self._windows[key] = {}
            for old in [b for b in counts if b < bucket - count]:
                del counts[old]
            if sum(counts.values()) + w.amount > w.limit:
                return Deny(
                    429, "rate_limit_exceeded",
                    f"Rate limit reached for {w.metric} per {window_label(w.window_ms)} "
                    f"({w.rate_limit}, per {w.scope}): limit {w.limit}.",
                    headers=(("retry-after", str(max(1, width // 1000))),),
                )
            checked.append((counts, bucket))
        for w, (counts, bucket) in zip(plan.windows, checked, strict=True):
            counts[bucket] = counts.get(bucket, 0) + w.amount
        return None


def project_settlement(
    statuses: Sequence[LimitStatus], plan: ReservationPlan, actual_nanos: int, limits: Sequence[
        LimitSpec]
) -> tuple[LimitStatus, ...]:
    """Limit states after this request settles, as seen from its own reservation: its hold is
    released and its actual cost added. Concurrent requests settling in between are not
    reflected (the settle script, which runs off the request path, keeps the exact numbers and
    state counts); this is what the response reports."""
    by_name = {lim.name: lim for lim in limits}
    out = []
    for status in statuses:
        limit = by_name.get(status.name)
        spent = status.spent_nanos + actual_nanos
        held = max(0, status.held_nanos - plan.estimate_nanos)
        state = state_of(spent, limit) if limit is not None else status.state
        out.append(LimitStatus(status.name, state, spent, held, status.max_nanos,
                               status.period_id))
    return tuple(out)
