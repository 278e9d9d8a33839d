"""Prometheus metrics. Workers write them in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by
the supervisor before a worker starts) and the supervisor serves the sum on /metrics."""

from __future__ import annotations

import asyncio
import os
import struct
from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "tollgate_requests_total",
    "Requests by decision (allowed, denied, error) and reason code.",
    ["decision", "reason"],
)
PHASE_SECONDS = Histogram(
    "tollgate_phase_seconds",
    "Time extproc spends on one ext_proc message, by phase.",
    ["phase"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
PRICED = Counter(
    "tollgate_priced_responses_total",
    "Responses priced, by upstream and whether the model had a price.",
    ["upstream", "priced"],
)
UNPRICED = Counter(
    "tollgate_unpriced_responses_total",
    "Responses that could not be priced (unknown model, no usage in the response).",
    ["reason"],
)
COST_NANOS = Counter(
    "tollgate_cost_nanos_total", "Cost of priced responses in nano-dollars.", ["upstream"]
)
TOKENS = Counter("tollgate_tokens_total", "Tokens seen in responses, by kind.", ["kind"])
CONFIG_GENERATION = Gauge(
    "tollgate_config_generation", "Configuration generation being served.",
    multiprocess_mode="min",
)
CONFIG_RELOADS = Counter("tollgate_config_reloads_total", "Configuration snapshots loaded.")
REDIS_ERRORS = Counter("tollgate_redis_errors_total", "Failed Redis calls, by operation.", ["op"])
USAGE_WRITTEN = Counter("tollgate_usage_events_written_total", "Usage events written to Redis.")
KEY_LOOKUPS = Counter(
    "tollgate_key_lookups_total",
    "Virtual key lookups by where they were answered (snapshot, negative_cache, redis, "
    "throttled).",
    ["source"],
)
JOURNALED = Counter(
    "tollgate_settlements_journaled_total",
    "Settlements that could not be written to Redis at once and were journaled for replay.",
)
JOURNAL_PENDING = Gauge(
    "tollgate_settlements_pending", "Journaled settlements not yet replayed.",
    multiprocess_mode="livesum",
)
HOLDS_SWEPT = Counter(
    "tollgate_holds_swept_total", "Reservations settled at their estimate after their deadline."
)
FAIL_OPEN = Counter(
    "tollgate_fail_open_total",
    "Requests admitted without the limit store (Redis unreachable), by what was skipped.",
    ["kind"],
)
LIMIT_DENIALS = Counter(
    "tollgate_limit_denials_total", "Requests refused by a spend limit.", ["limit"]
)
CLAMPED = Counter(
    "tollgate_clamped_requests_total",
    "Requests whose output cap was lowered to fit a limit (onInsufficient: clamp).",
)
CRED_REQUESTS = Counter(
    "tollgate_credential_requests_total", "Requests sent with a pooled credential.",
    ["upstream", "credential"],
)
CRED_TOKENS = Counter(
    "tollgate_credential_tokens_total", "Tokens used through a credential.",
    ["upstream", "credential"],
)
CRED_ERRORS = Counter(
    "tollgate_credential_errors_total", "Failed responses per pooled credential, by status.",
    ["upstream", "credential", "status"],
)
CRED_COOLDOWNS = Counter(
    "tollgate_credential_cooldowns_total", "Times a credential was put in cooldown.",
    ["upstream", "credential"],
)
FAILOVERS = Counter(
    "tollgate_failovers_total",
    "Calls moved on to a backup Upstream after the last try of this one failed.",
    ["upstream", "status"],
)
STREAMS_PASSED = Counter(
    "tollgate_passthrough_streams_total",
    "Streams let through without waiting for the extproc (TOLLGATE_STREAM_PASSTHROUGH), by "
    "who settled them: observer (metered from the copy) or unobserved (no observer came: "
    "charged at the estimate).",
    ["settled_by"],
)
CRED_RPM = Gauge(
    "tollgate_credential_requests_per_minute",
    "Requests in the credential's current rolling minute (as last seen by a worker).",
    ["upstream", "credential"], multiprocess_mode="mostrecent",
)
CRED_TPM = Gauge(
    "tollgate_credential_tokens_per_minute",
    "Tokens in the credential's current rolling minute (as last seen by a worker).",
    ["upstream", "credential"], multiprocess_mode="mostrecent",
)

# Spend and tokens by key, model and upstream. Label values are bounded per worker process:
# the first MAX_LABEL_KEYS key names and MAX_LABEL_MODELS models seen get their own series,
# later ones are counted under "_other" (models without a price always are "_unpriced", since
# their names are the client's to choose). So a worker exports at most
# (MAX_LABEL_KEYS + 1) x (MAX_LABEL_MODELS + 2) x upstreams series per metric.
MAX_LABEL_KEYS = 200
MAX_LABEL_MODELS = 100
SPEND_NANOS = Counter(
    "tollgate_spend_nanos_total",
    "Cost in nano-dollars by key, model and upstream (upstream 'ingest': reported usage).",
    ["key", "model", "upstream"],
)
SPEND_TOKENS = Counter(
    "tollgate_spend_tokens_total", "Tokens by key, model, upstream and kind (input, output).",
    ["key", "model", "upstream", "kind"],
)


class BoundedValues:
    """The first `limit` distinct values pass; later ones become `_other`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return "_other"
        self.seen.add(value)
        return value


_KEYS = BoundedValues(MAX_LABEL_KEYS)
_MODELS = BoundedValues(MAX_LABEL_MODELS)


def count_spend(key: str, model: str, priced: bool, upstream: str, cost_nanos: int,
                input_tokens: int, output_tokens: int) -> None:
    labels = (_KEYS(key), _MODELS(model) if priced else "_unpriced", upstream)
    count(labelled(SPEND_NANOS, *labels), cost_nanos)
    count(labelled(SPEND_TOKENS, *labels, "input"), input_tokens)
    count(labelled(SPEND_TOKENS, *labels, "output"), output_tokens)


POLICY_ACTIONS = Counter(
    "tollgate_policy_actions_total",
    "Requests a content policy rule acted on, by policy, rule, action and side (never the text).",
    ["policy", "rule", "action", "side"],
)

_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once: `labels()` validates and locks on every call
    (≈ 3 µs), and the request path calls it about seven times per request. Label values come
    from configuration (upstream, credential names, fixed codes), so this stays as small as
    the metric's own set of children."""
    key = (id(metric), values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


class Tally:
    """Increments of the request path, summed in memory and written to the metric values once
    per event-loop turn. In multiprocess mode every `inc` writes the worker's mmap file (≈ 1.3 µs
    for a counter, ≈ 2.4 µs for a histogram observation, about 14 of them per request); requests
    handled in the same loop turn share those writes here. Values are written before the loop
    runs anything else, so a /metrics read after a response always sees that request."""

    __slots__ = ("pending", "pid", "scheduled")

    def __init__(self) -> None:
        self.pending: dict[Any, float] = {}  # a metric child's value object -> amount to add
        self.scheduled = False
        self.pid = os.getpid()  # the process the values' files were opened in

    def schedule(self) -> None:
        """Write the pending amounts at the end of this loop turn (at once without a loop)."""
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no event loop (a CLI, a test): written at once
            self.flush()
            return
        self.scheduled = True

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        # prometheus_client's own `inc` compares the pid with the one its files were opened
        # under before every write and, after a fork, reopens every value's file. One
        # comparison per flush here: after a fork the first multiprocess value goes through
        # `inc`, which does the reopening, and the rest are written directly.
        forked = self.pid != os.getpid()
        for value, amount in pending.items():
            file = getattr(value, "_file", None)
            if file is None or forked:  # a single-process value, or the first after a fork
                value.inc(amount)
                if file is not None:
                    forked, self.pid = False, os.getpid()
                continue
            # Written as `inc` writes it, minus the lock (the worker writes metrics from its
            # event-loop thread only) and the pid check (above). A value whose place in the
            # file is known is written there directly, as `MmapedDict.write_value` does (one
            # slice assignment of both doubles, not `pack_into`, which zeroes first so that a
            # reader could see 0), without its two calls.
            value._value = total = value._value + amount
            value._timestamp = 0.0
            pos = file._positions.get(value._key)
            if pos is None:  # the value's first write in this file: written (and placed)
                file.write_value(value._key, total, 0.0)
            else:
                file._m[pos:pos + 16] = _TWO_DOUBLES(total, 0.0)


_TWO_DOUBLES = struct.Struct("dd").pack  # a value and its timestamp, as the file holds them


TALLY = Tally()


def count(child: Any, amount: float = 1) -> None:
    """`child.inc(amount)` for a Counter child (from `labelled` or an unlabelled Counter),
    written with the loop turn's other increments (Tally)."""
    if amount:
        # Added to the tally here, not through a method (about 20 a request): the child's
        # value object (prometheus_client's) -> the amount to add to it.
        pending, value = TALLY.pending, child._value
        pending[value] = pending.get(value, 0.0) + amount
        if not TALLY.scheduled:
            TALLY.schedule()


def observe(child: Any, amount: float) -> None:
    """`child.observe(amount)` for a Histogram child, written like `count`: the sum and the
    one bucket the amount falls in (multiprocess buckets are not cumulative; the collector
    adds them up, as prometheus_client's own `observe` writes them)."""
    pending, total = TALLY.pending, child._sum
    bucket = child._buckets[bisect_left(child._upper_bounds, amount)]
    pending[total] = pending.get(total, 0.0) + amount
    pending[bucket] = pending.get(bucket, 0.0) + 1
    if not TALLY.scheduled:
        TALLY.schedule()
