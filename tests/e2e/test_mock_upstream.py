"""The fake upstream speaks the real wire formats: the official SDKs parse what it sends.

These tests do loopback I/O (a real aiohttp server on 127.0.0.1, driven by the official SDKs),
so they are marked ``e2e``; the golden files it serves are checked against the SDKs' models in
tests/unit/test_golden_files.py.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import pytest_asyncio

from extproc.mock_upstream import (
    DEFAULT_REPLY,
    RING_SIZE,
    STATE_KEY,
    count_input_tokens,
    create_app,
    start_mock_upstream,
)

DATA = Path(__file__).resolve().parent.parent / "data"
OPENAI_KEY = "sk-test-tollgate-mock"
ANTHROPIC_KEY = "sk-ant-test-tollgate-mock"
REPLY_WORDS = len(DEFAULT_REPLY.split())

pytestmark = pytest.mark.e2e


def golden(name: str) -> Any:
    return json.loads((DATA / name).read_text())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_url() -> AsyncIterator[str]:
    runner = await start_mock_upstream("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def oai(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    # max_retries=0: a forced 429 must surface at once, not after the SDK's backoff.
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=OPENAI_KEY, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def claude(base_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key=ANTHROPIC_KEY, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --------------------------------------------------------------------------------------------
# OpenAI SDK against the mock
# --------------------------------------------------------------------------------------------


async def test_chat_json(oai: openai.AsyncOpenAI) -> None:
    request = golden("openai_chat.request.json")
    chat = await oai.chat.completions.create(
        **request, extra_headers={"x-mock-cached-tokens": "7", "x-mock-reasoning-tokens": "11"}
    )
    assert chat.model == request["model"]
    assert chat.choices[0].message.content == DEFAULT_REPLY
    assert chat.choices[0].finish_reason == "stop"
    usage = chat.usage
    assert usage is not None
    assert usage.prompt_tokens == count_input_tokens(request["messages"])
    assert usage.completion_tokens == REPLY_WORDS + 11
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 7
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 11


async def test_chat_stream_usage_arrives_in_last_chunk(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count to fifty"}],
        stream=True,
        stream_options={"include_usage": True},
        # 50 one-word chunks, written 7 bytes at a time so events straddle writes.
        extra_headers={"x-mock-words": "50", "x-mock-odd-chunks": "1"},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 50
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 50


async def test_stamped_stream_carries_each_events_send_time(oai: openai.AsyncOpenAI) -> None:
    """`x-mock-stamp` (the benchmark's per-chunk transit time): each event's id holds the
    monotonic time it was written, in the id's usual 20 digits."""
    before = time.monotonic_ns()
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}], stream=True,
        extra_headers={"x-mock-words": "5", "x-mock-chunk-delay-ms": "2", "x-mock-stamp": "1"},
    )
    chunks = [chunk async for chunk in stream]
    after = time.monotonic_ns()
    sent = [int(c.id.removeprefix("chatcmpl-mock")) for c in chunks]
    assert all(len(c.id) == len("chatcmpl-mock") + 20 for c in chunks)
    assert before < sent[0] and sent[-1] < after
    assert all(b - a >= 1_900_000 for a, b in itertools.pairwise(sent))  # ~2 ms apart
    plain = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}], stream=True,
        extra_headers={"x-mock-words": "5"})
    ids = {c.id async for c in plain}
    assert len(ids) == 1  # unstamped: one id for the whole stream, as a provider sends


async def test_chat_stream_without_include_usage_has_no_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_completions_json(oai: openai.AsyncOpenAI) -> None:
    request = golden("openai_completions.request.json")
    completion = await oai.completions.create(**request, extra_headers={"x-mock-reply": "a b c"})
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "a b c"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_responses_json_and_stream(oai: openai.AsyncOpenAI) -> None:
    request = golden("openai_responses.request.json")
    headers = {"x-mock-reasoning-tokens": "64", "x-mock-cached-tokens": "2"}
    resp = await oai.responses.create(**request, extra_headers=headers)
    assert resp.output_text == DEFAULT_REPLY
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    assert resp.usage is not None
    assert resp.usage.output_tokens == REPLY_WORDS + 64
    assert resp.usage.output_tokens_details.reasoning_tokens == 64
    assert resp.usage.input_tokens_details.cached_tokens == 2

    stream = await oai.responses.create(**request, stream=True, extra_headers=headers)
    events = [event async for event in stream]
    assert events[0].type == "response.created"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == DEFAULT_REPLY
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None
    assert final.response.usage.total_tokens == resp.usage.total_tokens


async def test_embeddings_float_and_sdk_default_base64(oai: openai.AsyncOpenAI) -> None:
    request = golden("openai_embeddings.request.json")
    floats = await oai.embeddings.create(**request)
    assert [len(d.embedding) for d in floats.data] == [8, 8]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens >= 1
    # Without encoding_format the SDK asks for base64 and decodes float32 itself.
    decoded = await oai.embeddings.create(model=request["model"], input=request["input"])
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)


async def test_forced_429_raises_rate_limit_error(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-status": "429", "x-mock-retry-after": "3"},
        )
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "rate_limit_exceeded"


async def test_azure_deployment_route(base_url: str, http: aiohttp.ClientSession) -> None:
    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=base_url, api_key="azure-key", api_version="2024-10-21", max_retries=0
    )
    try:
        chat = await azure.chat.completions.create(
            model="my-gpt4o", messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        await azure.close()
    assert chat.model == "my-gpt4o"
    # Without a model in the body the deployment name stands in for it.
    url = base_url + "/openai/deployments/dep-7/embeddings?api-version=2024-10-21"
    async with http.post(url, json={"input": "hello"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == "dep-7"


# --------------------------------------------------------------------------------------------
# Anthropic SDK against the mock
# --------------------------------------------------------------------------------------------


async def test_anthropic_messages_json(claude: anthropic.AsyncAnthropic) -> None:
    request = golden("anthropic_messages.request.json")
    msg = await claude.messages.create(
        **request,
        extra_headers={"x-mock-cached-tokens": "2048", "x-mock-cache-write-tokens": "1536"},
    )
    assert msg.model == request["model"]
    assert msg.content[0].type == "text" and msg.content[0].text == DEFAULT_REPLY
    assert msg.usage.input_tokens == count_input_tokens(request["system"], request["messages"])
    assert msg.usage.output_tokens == REPLY_WORDS
    assert msg.usage.cache_read_input_tokens == 2048
    assert msg.usage.cache_creation_input_tokens == 1536


async def test_anthropic_stream_final_message_usage(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-words": "12", "x-mock-odd-chunks": "1"},
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert len(text.split()) == 12
    assert final.usage.output_tokens == 12
    assert final.usage.input_tokens >= 1
    assert final.stop_reason == "end_turn"


async def test_anthropic_error_shape(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        await claude.messages.create(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-status": "429"},
        )
    body = info.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
    assert body["request_id"] == info.value.request_id


# --------------------------------------------------------------------------------------------
# Shape parity, recording, controls
# --------------------------------------------------------------------------------------------


async def test_chat_json_keys_match_golden(base_url: str, http: aiohttp.ClientSession) -> None:
    expected = golden("openai_chat.response.json")
    request = golden("openai_chat.request.json")
    async with http.post(base_url + "/v1/chat/completions", json=request) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        got = await resp.json()
    assert set(got) == set(expected)
    assert set(got["usage"]) == set(expected["usage"])
    for key in ("prompt_tokens_details", "completion_tokens_details"):
        assert set(got["usage"][key]) >= set(expected["usage"][key])
    assert set(got["choices"][0]) >= set(expected["choices"][0])
    assert set(got["choices"][0]["message"]) >= set(expected["choices"][0]["message"])


async def test_requests_are_recorded(
    base_url: str,
    oai: openai.AsyncOpenAI,
    claude: anthropic.AsyncAnthropic,
    http: aiohttp.ClientSession,
) -> None:
    async with http.delete(base_url + "/__mock/requests") as resp:
        assert resp.status == 200
    await oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    await claude.messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "y"}]
    )
    async with http.get(base_url + "/__mock/requests") as resp:
        records = await resp.json()
    assert [r["path"] for r in records] == ["/v1/chat/completions", "/v1/messages"]
    first, second = records
    assert first["method"] == "POST"
    assert first["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert first["body"]["model"] == "gpt-4o"
    # Older anthropic SDKs send x-api-key; current ones send the key as a Bearer token.
    sent = second["headers"]
    assert ANTHROPIC_KEY in (sent.get("x-api-key"), sent.get("authorization", "")[7:])
    assert "anthropic-version" in second["headers"]


async def test_controls_and_admin_endpoints(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(base_url + "/__mock/health") as resp:
        assert resp.status == 200
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    started = time.perf_counter()
    async with http.post(
        base_url + "/v1/chat/completions", json=body, headers={"x-mock-delay-ms": "60"}
    ) as resp:
        assert resp.status == 200
    assert time.perf_counter() - started >= 0.06
    async with http.post(
        base_url + "/v1/chat/completions", json=body, headers={"x-mock-status": "abc"}
    ) as resp:
        assert resp.status == 400
        assert "x-mock-status" in (await resp.json())["error"]["message"]
    async with http.post(base_url + "/v1/chat/completions", json={"messages": []}) as resp:
        assert resp.status == 400
    async with http.post(base_url + "/v1/nope", json=body) as resp:
        assert resp.status == 404
    async with http.post(
        base_url + "/v1/chat/completions",
        json={**body, "stream": True},
        headers={"x-mock-chunk-delay-ms": "1"},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert create_app()[STATE_KEY].requests.maxlen == RING_SIZE
