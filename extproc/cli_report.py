"""`tollgate usage --by/--since/--from/--to`: spend totals from the hourly rollups.

Reads one hash per hour of the range (store/rollup.py) in one round trip, so a week is 168
small reads whether it held a thousand requests or a million. The range is whole UTC hours:
an hour the range starts or ends in counts whole.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from extproc.cli_output import print_documents, print_rows
from extproc.core.pricing import format_nanos
from extproc.store.rollup import DIMENSIONS, HOUR_MS, Report, aggregate

# A report never reads more than this many hourly hashes (about 3 years).
MAX_HOURS = 27_000
_UNITS = {"h": HOUR_MS, "d": 24 * HOUR_MS, "w": 7 * 24 * HOUR_MS}
_ALIASES = {"use-case": "use_case", "usecase": "use_case", "tags": "tag", "limits": "limit",
            "keys": "key", "users": "user", "groups": "group", "models": "model",
            "upstreams": "upstream"}


class ReportError(ValueError):
    """A bad report option (the CLI turns it into a usage error)."""


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.by or args.since or args.from_ or args.to)


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


def hour_range(args: argparse.Namespace, now_ms: int) -> tuple[int, int]:
    """First and last hour (inclusive, unix ms // HOUR_MS) of the report."""
    if args.since and args.from_:
        raise ReportError("--since and --from cannot be combined")
    end_ms = parse_time(args.to, "--to") if args.to else now_ms
    if args.since:
        match = re.fullmatch(r"(\d+)([hdw])", args.since.strip())
        if not match or int(match.group(1)) == 0:
            raise ReportError(f"--since: {args.since!r} is not a duration like 24h, 7d or 4w")
        start_ms = end_ms - int(match.group(1)) * _UNITS[match.group(2)]
    elif args.from_:
        start_ms = parse_time(args.from_, "--from")
    else:
        start_ms = end_ms - 7 * 24 * HOUR_MS  # a week unless told otherwise
    if start_ms >= end_ms:
        raise ReportError("the report's start is not before its end")
    first, last = start_ms // HOUR_MS, (end_ms - 1) // HOUR_MS
    if last - first + 1 > MAX_HOURS:
        raise ReportError(f"the range spans more than {MAX_HOURS} hours")
    return first, last


def _documents(report: Report) -> list[dict[str, Any]]:
    rows = sorted(report.groups.items(), key=lambda kv: (-kv[1].cost_nanos, kv[0]))
    return [
        {**dict(zip(report.by, group, strict=True)),
         "requests": t.requests, "cost_usd": format_nanos(t.cost_nanos),
         "cost_nanos": t.cost_nanos, "input_tokens": t.input_tokens,
         "output_tokens": t.output_tokens, "tokens": t.tokens}
        for group, t in rows
    ]


def run(args: argparse.Namespace,
        read: Callable[[list[int]], list[dict[bytes, bytes]]]) -> int:
    by = parse_by(args.by)
    first, last = hour_range(args, int(time.time() * 1000))
    report = aggregate(read(list(range(first, last + 1))), by)
    docs = _documents(report)
    output = args.output
    if output == "jsonl":
        for doc in docs:
            print(orjson.dumps(doc).decode())
    elif output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        columns = [*by, "requests", "cost_usd", "cost_nanos", "input_tokens", "output_tokens",
                  "tokens"]
        writer.writerow(columns)
        for doc in docs:
            writer.writerow([doc[c] for c in columns])
    elif output == "table":
        header = (*(b.upper() for b in by), "REQUESTS", "COST_USD", "INPUT_TOKENS",
                  "OUTPUT_TOKENS", "TOKENS")
        rows = [(*(str(doc[b]) for b in by), str(doc["requests"]), str(doc["cost_usd"]),
                 str(doc["input_tokens"]), str(doc["output_tokens"]), str(doc["tokens"]))
                for doc in docs]
        print_rows(header, rows, "table", "no usage in this range")
    else:
        print_documents(docs, output, single=False)
    return 0
