"""A bug inside a request phase becomes one JSON 500 and is counted once in
`tollgate_requests_total` (as error/internal), not twice."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import REGISTRY

from extproc.core.exchange import Exchange, Options
from extproc.core.snapshot import build_snapshot
from extproc.server.processor import Processor

pytestmark = pytest.mark.unit


def _count(decision: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "tollgate_requests_total", {"decision": decision, "reason": reason})
    return value or 0.0


def test_an_internal_error_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(Exchange, "on_request_headers", broken)
    processor = Processor(None, None, None, None, Options())  # type: ignore[arg-type]
    snapshot = build_snapshot(1, [], [], lambda _name: None)
    request = ep.ProcessingRequest()
    request.request_headers.SetInParent()
    before = {pair: _count(*pair) for pair in (("error", "internal"),
                                               ("denied", "internal_error"))}
    exchange = Exchange("rid-1", Options())
    response = asyncio.run(
        processor._handle("request_headers", request, exchange, snapshot, 0.0))
    assert response.immediate_response.status.code == 500
    body = orjson.loads(response.immediate_response.body)
    assert body["error"]["code"] == "internal_error"
    assert _count("error", "internal") == before[("error", "internal")] + 1
    assert _count("denied", "internal_error") == before[("denied", "internal_error")]
