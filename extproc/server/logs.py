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

import logging
import time
from typing import Any

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
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(process_label) if fmt == "json"
                         else TextFormatter(process_label))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def access(fields: dict[str, Any]) -> None:
    """One line per request: request id, key name, model, upstream, status, error code, cost,
    latency."""
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info("request", extra={"fields": fields})
