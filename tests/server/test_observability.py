"""What an operator sees of a request: one access log line (JSON when asked, no prompt and no
key in it) and OpenTelemetry spans for the ext_proc phases and the Redis reserve call.

The real extproc servicer is driven with the messages Envoy sends, against a real Redis; spans
are collected with the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extproc.core.exchange import Options
from extproc.core.keys import generate_key, hash_key
from extproc.core.resources import validate_document
from extproc.server import logs, tracing
from extproc.server.processor import Processor
from extproc.server.settlement import Settler
from extproc.server.state import ConfigWatcher, KeyDirectory
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import Store, connect

pytestmark = pytest.mark.redis

PROMPT = "my secret prompt about the merger"


def _doc(kind: str, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": spec}


def _headers(pairs: dict[str, str]) -> ep.HttpHeaders:
    message = ep.HttpHeaders()
    for name, value in pairs.items():
        message.headers.headers.append(base_pb2.HeaderValue(key=name, raw_value=value.encode()))
    return message


DATA = Path(__file__).resolve().parents[1] / "data"


async def _messages(key: str, body: bool = True,
                    response: bool = False) -> AsyncIterator[ep.ProcessingRequest]:
    yield ep.ProcessingRequest(request_headers=_headers({
        ":path": "/v1/chat/completions", ":method": "POST", "content-type": "application/json",
        "authorization": f"Bearer {key}"}))
    if not body:  # Envoy sends nothing more after an immediate response
        return
    body = orjson.dumps({"model": "gpt-4o", "max_tokens": 10,
                         "messages": [{"role": "user", "content": PROMPT}]})
    yield ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    if response:
        yield ep.ProcessingRequest(response_headers=_headers({
            ":status": "200", "content-type": "application/json"}))
        golden = (DATA / "openai_chat.response.json").read_bytes()
        yield ep.ProcessingRequest(response_body=ep.HttpBody(body=golden, end_of_stream=True))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.enable(exporter)
    try:
        yield exporter
    finally:
        tracing.disable()


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter("worker-0"))
    logs.ACCESS.addHandler(handler)
    logs.ACCESS.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logs.ACCESS.removeHandler(handler)


async def test_a_request_is_logged_once_and_traced(
    redis_url: str, tmp_path: Path, spans: InMemorySpanExporter, access_lines: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-secret")
    store = Store.from_url(redis_url, "obs-" + uuid.uuid4().hex[:8])
    key = generate_key()
    await store.apply([
        validate_document(_doc("VirtualKey", "obs-app", {"keySha256": hash_key(key)})),
        validate_document(_doc("Limit", "obs-budget", {
            "type": "Block", "max": 100, "selector": {"keys": ["obs-app"]}})),
    ])
    watcher = ConfigWatcher(store, str(tmp_path), 1.0)
    await watcher.reload()
    hot = connect(redis_url, 1.0)
    quota = QuotaStore(hot, store.keys, 1000, background=store.redis)
    settler = Settler(quota, str(tmp_path / "journal"))
    processor = Processor(watcher, KeyDirectory(store), quota, settler, Options())
    try:
        replies = [r async for r in processor.Process(_messages(key, response=True), None)]
    finally:
        await settler.close(timeout=5)  # writes the queued settlement
        await hot.aclose()
        await store.close()
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers", "request_body", "response_headers", "response_body"]

    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["ext_proc.request_headers", "redis.reserve", "ext_proc.request_body",
                     "ext_proc.response_headers", "ext_proc.response_body",
                     "redis.settle_batch"]
    by_name = {s.name: s for s in spans.get_finished_spans()}
    request_id = by_name["ext_proc.request_body"].attributes["tollgate.request_id"]
    assert by_name["redis.reserve"].attributes["tollgate.limits"] == 1
    assert by_name["redis.reserve"].parent.span_id == (  # nested in the body phase
        by_name["ext_proc.request_body"].context.span_id)

    lines = access_lines.getvalue().splitlines()
    assert len(lines) == 1  # one line per request
    line = json.loads(lines[0])
    assert line["request_id"] == request_id
    assert (line["key"], line["model"], line["upstream"]) == ("obs-app", "gpt-4o", "openai")
    assert line["status"] == 200 and float(line["cost_usd"]) > 0
    assert line["input_tokens"] > 0 and line["output_tokens"] > 0
    assert isinstance(line["latency_ms"], float)
    text = access_lines.getvalue()
    assert PROMPT not in text and key not in text and "sk-provider-secret" not in text


async def test_a_refusal_is_logged_with_its_status_and_code(
    redis_url: str, tmp_path: Path, access_lines: io.StringIO, spans: InMemorySpanExporter,
) -> None:
    store = Store.from_url(redis_url, "obs-" + uuid.uuid4().hex[:8])
    watcher = ConfigWatcher(store, str(tmp_path), 1.0)
    await watcher.reload()
    processor = Processor(watcher, KeyDirectory(store), None, None,  # type: ignore[arg-type]
                          Options())
    try:
        replies = [r async for r in processor.Process(_messages("tg-" + "x" * 43, body=False),
                                                        None)]
    finally:
        await store.close()
    assert replies[0].immediate_response.status.code == 401
    (line,) = [json.loads(x) for x in access_lines.getvalue().splitlines()]
    assert (line["status"], line["code"], line["key"]) == (401, "invalid_api_key", None)
    assert "tg-xxx" not in access_lines.getvalue()
    # The unknown key was looked up in Redis, inside the headers phase.
    assert [s.name for s in spans.get_finished_spans()] == [
        "redis.key_lookup", "ext_proc.request_headers"]
