"""Hourly usage rollups: what `tollgate usage --by ...` reads instead of the raw stream.

The settle script adds every charged request to one hash per hour (`KeySchema.rollup`), in the
same script call that appends its usage event, so a report over a week reads 168 hashes in one
pipelined round trip however many requests there were, and the request path makes no extra
Redis call. A hash field is a metric letter followed by a compact dimension tuple:

    c<dims>  cost, nano-dollars      n<dims>  requests
    i<dims>  input tokens            o<dims>  output tokens

`<dims>` is the JSON array [key, user, group, model, upstream, tags, use case, limits] (tags and
limits are lists). It is built here, from the usage event and the limit keys the settle call
already carries, so journals and hold records (the settle layout) are unchanged: the rollup
arguments are added on the wire only (`wire`). Hashes expire ROLLUP_TTL_MS after their last
write; the raw stream keeps its own (length) limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from extproc.core.pricing import format_nanos
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.store.keyschema import KeySchema

HOUR_MS = 3_600_000
# How long an hour's rollup is kept after its last write (default 400 days, a year-on-year
# report's worth). TOLLGATE_ROLLUP_TTL_DAYS overrides it; 0 keeps rollups without expiry.
ROLLUP_TTL_MS = int(float(os.environ.get("TOLLGATE_ROLLUP_TTL_DAYS", "400")) * 86_400_000)

# The dimensions a report can group by, in tuple order.
DIMENSIONS = ("key", "user", "group", "model", "upstream", "tag", "use_case", "limit")
_MULTI = {"tag", "limit"}  # list-valued: a request counts once in each of its values


def limit_names(keys: Sequence[str], schema: KeySchema, count: int) -> list[str]:
    """The limits a settle call charges, from its limit-state keys (`spend:<limit>:<period>`;
    limit ids have no colon)."""
    head = f"{schema.prefix}spend:"
    return [k[len(head):].split(":", 1)[0] for k in keys[4:4 + count] if k.startswith(head)]


def wire(keys: Sequence[str], args: Sequence[Any], schema: KeySchema) -> tuple[list[str],
                                                                               list[bytes]]:
    """Extra keys and arguments that make the settle script roll the request up (ARGV 3..6 of
    settle.lua). Nothing when the call only cancels or its event cannot be read."""
    event_bytes = args[4]
    if int(args[13]) == 1 or not isinstance(event_bytes, bytes | str):
        return [], []
    try:
        event = usage_pb2.UsageEvent.FromString(
            event_bytes if isinstance(event_bytes, bytes) else event_bytes.encode())
    except Exception:
        return [], []
    when = event.timestamp_ms or int(args[1])
    use_case = event.use_case_name or event.use_case_id
    dims = orjson.dumps([event.key, event.user, event.group, event.model, event.upstream,
                         sorted(event.tags), use_case,
                         limit_names(keys, schema, int(args[6]))])
    return [schema.rollup(when // HOUR_MS)], [
        dims, str(event.tokens.input).encode(), str(event.tokens.output).encode(),
        str(ROLLUP_TTL_MS).encode()]


@dataclass(slots=True)
class Totals:
    cost_nanos: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class Report:
    by: tuple[str, ...]
    groups: dict[tuple[str, ...], Totals] = field(default_factory=dict)


def _groups(dims: list[Any], by: Sequence[int]) -> list[tuple[str, ...]]:
    """The groups one dimension tuple belongs to: one per combination of list values (a
    request with two tags counts under each tag), "-" for an empty value."""
    combos: list[tuple[str, ...]] = [()]
    for i in by:
        value = dims[i] if i < len(dims) else ""
        values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        values = values or ["-"]
        combos = [(*c, v or "-") for c in combos for v in values]
    return combos


_SLOT = {ord("c"): 0, ord("n"): 1, ord("i"): 2, ord("o"): 3}


def aggregate(hashes: Iterable[dict[bytes, bytes]], by: Sequence[str]) -> Report:
    """Sum hourly rollup hashes into a report grouped by `by` (names from DIMENSIONS).

    The hot loop runs once per (hour, tuple, metric) cell: each distinct tuple's groups are
    worked out once and cached, and sums are kept in plain lists until the end."""
    index = [DIMENSIONS.index(name) for name in by]
    sums: dict[tuple[str, ...], list[int]] = {}
    targets: dict[bytes, list[list[int]]] = {}
    for hashed in hashes:
        for raw_field, raw_value in hashed.items():
            slot = _SLOT.get(raw_field[0])
            if slot is None:
                continue
            dims_raw = raw_field[1:]
            lists = targets.get(dims_raw)
            if lists is None:
                lists = targets[dims_raw] = [
                    sums.setdefault(g, [0, 0, 0, 0])
                    for g in _groups(orjson.loads(dims_raw), index)]
            value = int(raw_value)
            for totals in lists:
                totals[slot] += value
    report = Report(tuple(by))
    for group, (cost, requests, tin, tout) in sums.items():
        report.groups[group] = Totals(cost, requests, tin, tout)
    return report


# ---- report options and rows (`tollgate usage --by ...` and the dashboard) ---------------

# A report never reads more than this many hourly hashes (about 3 years).
MAX_HOURS = 27_000
_UNITS = {"h": HOUR_MS, "d": 24 * HOUR_MS, "w": 7 * 24 * HOUR_MS}
_ALIASES = {"use-case": "use_case", "usecase": "use_case", "tags": "tag", "limits": "limit",
            "keys": "key", "users": "user", "groups": "group", "models": "model",
            "upstreams": "upstream"}


class ReportError(ValueError):
    """A bad report option (the CLI turns it into a usage error, the dashboard into a 400)."""


def parse_by(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    names = [_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in value.split(",")
             if n.strip()]
    for name in names:
        if name not in DIMENSIONS:
            raise ReportError(f"--by: unknown dimension {name!r} (one or more of "
                              f"{', '.join(DIMENSIONS)})")
    if len(set(names)) != len(names):
        raise ReportError("--by: a dimension is named twice")
    return tuple(names)


def parse_time(value: str, flag: str) -> int:
    """An ISO 8601 date or date-time (UTC unless it says otherwise) as unix ms."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"{flag}: {value!r} is not an ISO 8601 date or time "
                          "(e.g. 2026-12-01 or 2026-12-01T08:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def hours_of(since: str | None, from_: str | None, to: str | None, now_ms: int
             ) -> tuple[int, int]:
    """First and last hour (inclusive, unix ms // HOUR_MS) of a report given the way
    `tollgate usage` takes it (`--since`, `--from`, `--to`; the dashboard asks the same way)."""
    if since and from_:
        raise ReportError("--since and --from cannot be combined")
    end_ms = parse_time(to, "--to") if to else now_ms
    if since:
        match = re.fullmatch(r"(\d+)([hdw])", since.strip())
        if not match or int(match.group(1)) == 0:
            raise ReportError(f"--since: {since!r} is not a duration like 24h, 7d or 4w")
        start_ms = end_ms - int(match.group(1)) * _UNITS[match.group(2)]
    elif from_:
        start_ms = parse_time(from_, "--from")
    else:
        start_ms = end_ms - 7 * 24 * HOUR_MS  # a week unless told otherwise
    if start_ms >= end_ms:
        raise ReportError("the report's start is not before its end")
    first, last = start_ms // HOUR_MS, (end_ms - 1) // HOUR_MS
    if last - first + 1 > MAX_HOURS:
        raise ReportError(f"the range spans more than {MAX_HOURS} hours")
    return first, last


def documents(report: Report) -> list[dict[str, Any]]:
    rows = sorted(report.groups.items(), key=lambda kv: (-kv[1].cost_nanos, kv[0]))
    return [
        {**dict(zip(report.by, group, strict=True)),
         "requests": t.requests, "cost_usd": format_nanos(t.cost_nanos),
         "cost_nanos": t.cost_nanos, "input_tokens": t.input_tokens,
         "output_tokens": t.output_tokens, "tokens": t.tokens}
        for group, t in rows
    ]
