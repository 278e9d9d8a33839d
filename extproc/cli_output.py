"""How the CLI prints: `--output table|json|yaml` for every listing command, timestamps without
microseconds, and which Redis a command is using.

Tables are plain aligned text written by hand: a dozen lines, no colour codes in pipes, and one
dependency fewer than `rich` (whose start-up import alone costs more than most commands take).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import yaml

OUTPUTS = ("table", "json", "yaml")
BUILTIN_ANNOTATION = "tollgate.io/built-in"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def print_rows(header: Sequence[str], rows: Sequence[Sequence[str]], output: str,
               empty: str) -> None:
    """Rows as a table, or as a list of objects keyed by the lower-cased header for json/yaml."""
    if output == "table":
        print(table([header, *rows]) if rows else empty)
        return
    docs = [{h.lower(): cell for h, cell in zip(header, row, strict=True)} for row in rows]
    print_documents(docs, output, single=False)


def print_documents(docs: Sequence[dict[str, Any]], output: str, single: bool) -> None:
    """json/yaml output. `single` (a NAME was given): one object, not a list, in both formats."""
    if output == "json":
        value: Any = docs[0] if single else list(docs)
        print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    elif single:
        print(yaml.safe_dump(docs[0], sort_keys=False), end="")
    else:
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")


def short_time(value: str | None) -> str:
    """An RFC 3339 timestamp to the second, in UTC: `2027-01-31T00:00:00Z`."""
    if not value:
        return "-"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def redacted(url: str) -> str:
    """The URL with its password replaced by `***`, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def note(message: str) -> None:
    print(f"tollgate: {message}", file=sys.stderr)
