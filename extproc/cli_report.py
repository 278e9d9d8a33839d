"""`tollgate usage --by/--since/--from/--to`: spend totals from the hourly rollups.

Reads one hash per hour of the range (store/rollup.py) in one round trip, so a week is 168
small reads whether it held a thousand requests or a million. The range is whole UTC hours:
an hour the range starts or ends in counts whole.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable

import orjson

from extproc.cli_output import print_documents, print_rows
from extproc.store.rollup import ReportError, aggregate, documents, hours_of, parse_by

__all__ = ["ReportError", "hour_range", "run", "wanted"]


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.by or args.since or args.from_ or args.to)


def hour_range(args: argparse.Namespace, now_ms: int) -> tuple[int, int]:
    """First and last hour (inclusive, unix ms // HOUR_MS) of the report."""
    return hours_of(args.since, args.from_, args.to, now_ms)


def run(args: argparse.Namespace,
        read: Callable[[list[int]], list[dict[bytes, bytes]]]) -> int:
    by = parse_by(args.by)
    first, last = hour_range(args, int(time.time() * 1000))
    report = aggregate(read(list(range(first, last + 1))), by)
    docs = documents(report)
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
