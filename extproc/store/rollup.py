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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

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
