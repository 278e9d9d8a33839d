"""Logging for the extproc processes: a human format for the terminal, or JSON lines
(`TOLLGATE_LOG_FORMAT=json` / `--log-format json`) with one object per line, and the access log:
one line per request, written by extproc (Envoy's own access log is not configured, so a request
is never logged twice).

What is never logged: prompts, response bodies, virtual keys, provider keys. The access line
carries the key's NAME, never the key.

The JSON formatter is a few lines over orjson rather than python-json-logger: it is faster on the
request path and needs nothing the standard `logging.Formatter` does not already give.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TextIO

import orjson

ACCESS = logging.getLogger("tollgate.access")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def __init__(self, process_label: str) -> None:
        super().__init__()
        self.process_label = process_label

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self.process_label,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time process LEVEL logger: message key=value ...`"""

    def __init__(self, process_label: str) -> None:
        super().__init__(f"%(asctime)s {process_label} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure(level: str, fmt: str, process_label: str) -> None:
    global _writer
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(process_label) if fmt == "json"
                         else TextFormatter(process_label))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _writer = AccessWriter(handler, fmt == "json", process_label)


_PAIR = "%s=%s"  # `key=value` of the text line; `map` with it keeps the join in C


class AccessWriter:
    """The access line written straight to the root handler's stream, in the same format the
    formatters above give it: through `logging` (a LogRecord, the formatter, a flush per line)
    it cost ≈ 16 µs per request, about 5 % of a worker's handler time. Lines are joined and
    written once per event-loop turn. Used only while the access logger has no handler of its
    own (tests attach one) and the root handler is the one `configure` installed."""

    def __init__(self, handler: logging.StreamHandler[TextIO], json: bool, label: str) -> None:
        self.handler = handler
        self.json = json
        self.label = label
        self.lines: list[str] = []
        self.second = -1
        self.stamp = ""

    def write(self, fields: dict[str, Any]) -> None:
        now = time.time()
        second = int(now)
        if second != self.second:  # the time prefix, formatted once per second
            self.second = second
            self.stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                          if self.json else time.strftime("%Y-%m-%d %H:%M:%S",
                                                          time.localtime(second)))
        millis = int((now - second) * 1000)
        if self.json:
            line = orjson.dumps({"time": f"{self.stamp}.{millis:03d}Z", "level": "info",
                                 "logger": ACCESS.name, "process": self.label,
                                 "message": "request", **fields}, default=str).decode()
        else:
            line = (f"{self.stamp},{millis:03d} {self.label} INFO {ACCESS.name}: request "
                    + " ".join(map(_PAIR.__mod__, fields.items())))
        self.lines.append(line)
        if len(self.lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop: at once
                self.flush()

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if not lines:
            return
        stream = self.handler.stream
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as logging would, go on
            pass


_writer: AccessWriter | None = None


def flush_access() -> None:
    """Write the access lines still waiting for their loop turn (at a worker's exit)."""
    if _writer is not None:
        _writer.flush()


def access(fields: dict[str, Any]) -> None:
    """One line per request: request id, key name, model, upstream, status, error code, cost,
    latency."""
    if ACCESS.isEnabledFor(logging.INFO):
        writer = _writer
        if (writer is not None and not ACCESS.handlers
                and logging.getLogger().handlers == [writer.handler]):
            writer.write(fields)
        else:
            ACCESS.info("request", extra={"fields": fields})
