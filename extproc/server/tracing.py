"""OpenTelemetry spans for the ext_proc phases and the Redis calls on the request path.

Off by default, and then free: `span()` returns a shared no-op context manager without touching
OpenTelemetry. On when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard variable; the other
`OTEL_*` variables work too) and the optional extra is installed (`pip install 'tollgate[otel]'`):
spans go to that endpoint through the SDK's own OTLP exporter, batched off the request path.
Tests call `enable()` with the SDK's in-memory exporter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

log = logging.getLogger(__name__)

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Any = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Any]:
    if _tracer is None:
        return _NOOP
    return _span(name, attributes)


@contextlib.contextmanager
def _span(name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    with _tracer.start_as_current_span(name, attributes=dict(attributes)) as current:
        yield current


def enable(exporter: Any = None, service_name: str = "tollgate-extproc") -> bool:
    """Turn tracing on: with `exporter` (a SpanExporter, exported synchronously: for tests), or
    else with the OTLP exporter configured from the environment. False if the SDK is missing."""
    global _tracer
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                    "(pip install 'tollgate[otel]'); tracing stays off")
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("the OTLP exporter is not installed (pip install 'tollgate[otel]'); "
                        "tracing stays off")
            return False
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = provider.get_tracer("tollgate")
    return True


def enable_from_env() -> bool:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    return enable()


def disable() -> None:
    global _tracer
    _tracer = None
