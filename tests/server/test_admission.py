"""Admission control: past `max_pending` requests in their request phases, a worker answers
new requests at once with a JSON 503 and Retry-After (nothing reserved, nothing charged)
instead of queueing them until Envoy's message timeout turns them into bare 500s. Requests
waiting for the upstream do not count against the bound.

The real servicer is driven with the messages Envoy sends, against a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core.exchange import Options
from extproc.core.keys import generate_key, hash_key
from extproc.core.resources import validate_document
from extproc.server.admission import LoopLag
from extproc.server.processor import Processor
from extproc.server.settlement import Settler
from extproc.server.state import ConfigWatcher, KeyDirectory
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import Store, connect
from tests.server.test_observability import _doc, _headers

pytestmark = pytest.mark.redis

BODY = orjson.dumps({"model": "gpt-4o", "max_tokens": 10,
                     "messages": [{"role": "user", "content": "hi"}]})


class Stream:
    """One ext_proc stream whose messages the test sends one at a time."""

    def __init__(self, processor: Processor) -> None:
        self.inbox: asyncio.Queue[ep.ProcessingRequest | None] = asyncio.Queue()
        self.replies = processor.Process(self._requests(), None)

    async def _requests(self) -> AsyncIterator[ep.ProcessingRequest]:
        while (message := await self.inbox.get()) is not None:
            yield message

    async def send(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse:
        await self.inbox.put(message)
        reply: ep.ProcessingResponse = await anext(self.replies)
        return reply

    async def close(self) -> None:
        await self.inbox.put(None)
        async for _ in self.replies:
            pass


def headers(key: str, path: str = "/v1/chat/completions") -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_headers=_headers({
        ":path": path, ":method": "POST", "content-type": "application/json",
        "authorization": f"Bearer {key}"}))


def body() -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=BODY, end_of_stream=True))


async def test_past_the_bound_new_requests_get_a_json_503_with_retry_after(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-secret")
    store = Store.from_url(redis_url, "adm-" + uuid.uuid4().hex[:8])
    key = generate_key()
    await store.apply([validate_document(
        _doc("VirtualKey", "adm-app", {"keySha256": hash_key(key)}))])
    watcher = ConfigWatcher(store, str(tmp_path), 1.0)
    await watcher.reload()
    hot = connect(redis_url, 1.0)
    quota = QuotaStore(hot, store.keys, 1000, background=store.redis)
    settler = Settler(quota, str(tmp_path / "journal"))
    processor = Processor(watcher, KeyDirectory(store), quota, settler, Options(),
                          max_pending=1)
    try:
        first = Stream(processor)
        reply = await first.send(headers(key))
        assert reply.HasField("request_headers")  # admitted, its body not yet sent

        second = Stream(processor)
        shed = await second.send(headers(key, "/v1/messages"))
        immediate = shed.immediate_response
        assert immediate.status.code == 503
        sent = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
        assert sent["retry-after"] == b"1"
        assert sent["content-type"] == b"application/json"
        error = orjson.loads(immediate.body)
        assert error["error"]["code"] == "overloaded"
        assert error["type"] == "error"  # the Anthropic shape for /v1/messages
        await second.close()

        # The first request finishes its request phases: the next one is admitted again,
        # although the first is still waiting for its upstream.
        assert (await first.send(body())).HasField("request_body")
        third = Stream(processor)
        assert (await third.send(headers(key))).HasField("request_headers")
        await third.close()  # ended early (client gone): its slot is given back
        await first.close()
        assert processor.pending == 0
    finally:
        await settler.close(timeout=5)
        await hot.aclose()
        await store.close()


async def test_while_the_event_loop_runs_late_new_requests_are_refused(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker whose loop is behind (CPU saturated: here, blocked on purpose) refuses new
    requests with the 503 instead of queueing them; once it catches up it admits again."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-secret")
    store = Store.from_url(redis_url, "adm-" + uuid.uuid4().hex[:8])
    key = generate_key()
    await store.apply([validate_document(
        _doc("VirtualKey", "adm-lag", {"keySha256": hash_key(key)}))])
    watcher = ConfigWatcher(store, str(tmp_path), 1.0)
    await watcher.reload()
    lag = LoopLag(max_lag_s=0.2)
    lag.start()
    processor = Processor(watcher, KeyDirectory(store), None, None,  # type: ignore[arg-type]
                          Options(), lag=lag)
    try:
        time.sleep(0.6)  # the loop cannot run: what a saturated worker looks like
        stream = Stream(processor)
        shed = await stream.send(headers(key))
        assert shed.immediate_response.status.code == 503
        assert orjson.loads(shed.immediate_response.body)["error"]["code"] == "overloaded"
        await stream.close()

        for _ in range(200):  # caught up: admitted again (a few ticks later)
            await asyncio.sleep(0.025)
            if not lag.overloaded:
                break
        stream = Stream(processor)
        assert (await stream.send(headers(key))).HasField("request_headers")
        await stream.close()
    finally:
        lag.stop()
        await store.close()
