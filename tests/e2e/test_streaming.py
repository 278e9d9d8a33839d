"""Streaming end to end: the openai and anthropic SDKs stream through real Envoy and extproc
from a fake upstream that writes real SSE slowly and in odd-sized pieces."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from extproc.core.pricing import format_nanos
from extproc.launch import Stack
from tests.e2e.conftest import (
    CliRunner,
    every_worker_has_loaded_the_latest_configuration,
    spent_and_held,
    upstream_requests,
)

pytestmark = pytest.mark.e2e

SLOW = {"x-mock-chunk-delay-ms": "25", "x-mock-odd-chunks": "1", "x-mock-words": "12"}
MESSAGES = [{"role": "user", "content": "Tell me something"}]
# gpt-4o-mini: $0.15 input, $0.60 output per 1M tokens (builtin.yaml).
MINI_IN, MINI_OUT = 150_000_000, 600_000_000  # nano-dollars per 1M tokens


def nanos(tokens: int, rate: int) -> int:
    """Exact: these list prices have at most 3 decimals (whole nano-dollars per token)."""
    assert tokens * rate % 1_000_000 == 0
    return tokens * rate // 1_000_000


def openai_client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def raw_stream(stack: Stack, key: str, path: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[list[bytes], list[float]]:
    """The response body as the client receives it: chunks and their arrival times."""
    chunks, times = [], []
    with httpx.stream("POST", f"{stack.base_url}{path}", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}", **(headers or {})}) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_raw():
            chunks.append(chunk)
            times.append(time.monotonic())
    return chunks, times


def result_comment(body: bytes) -> dict[str, Any]:
    for line in body.split(b"\n"):
        if line.startswith(b": xproxy_result "):
            doc: dict[str, Any] = orjson.loads(line[len(b": xproxy_result "):])
            return doc
    raise AssertionError("no xproxy_result comment in the stream")


def test_openai_stream_arrives_chunk_by_chunk_and_is_priced(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = new_key()
    started = time.monotonic()
    stream = openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=SLOW)
    arrivals, pieces, chunks = [], [], []
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    # Every word, in order; the first arrived long before the last (no buffering).
    assert "".join(pieces).split() == (["Hello", "from", "the", "mock", "upstream."] * 3)[:12]
    assert arrivals[0] < arrivals[-1] - 0.15
    # The client did not ask for usage, so it sees no usage chunk and no usage members ...
    assert all(c.usage is None and c.choices for c in chunks)
    # ... although Tollgate asked the upstream for it.
    sent = upstream_requests(stack)[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}


def test_stream_with_usage_gets_the_result_in_the_usage_chunk(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = new_key()
    chunks = list(openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, extra_headers=SLOW))
    last = chunks[-1]
    assert last.usage is not None and not last.choices
    result = (last.model_extra or {})["xproxy_result"]
    expected = nanos(last.usage.prompt_tokens, MINI_IN) + nanos(last.usage.completion_tokens,
                                                                MINI_OUT)
    assert result["cost_nanos"]["total"] == expected
    assert result["usage"]["output_tokens"] == last.usage.completion_tokens


def test_result_event_precedes_the_terminator_and_lands_in_the_usage_stream(
    stack: Stack, new_key: Callable[..., str], cli: CliRunner
) -> None:
    key = new_key()
    chunks, _ = raw_stream(stack, key, "/v1/chat/completions",
                           {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                           SLOW)
    body = b"".join(chunks)
    assert body.rstrip().endswith(b"data: [DONE]")
    comment_at = body.index(b": xproxy_result ")
    assert comment_at < body.index(b"data: [DONE]")
    result = result_comment(body)
    assert b'"usage"' not in body[:comment_at]  # the injected usage chunk was removed
    events = [orjson.loads(line) for line in cli("usage", "--count", "30").stdout.splitlines()]
    event = next(e for e in events if e["request_id"] == result["request_id"])
    assert event["streamed"] is True and event["priced"] is True
    assert int(event["cost"]["total_nanos"]) == result["cost_nanos"]["total"] > 0
    assert int(event["tokens"]["output"]) == result["usage"]["output_tokens"] == 12


def test_anthropic_stream(stack: Stack, new_key: Callable[..., str]) -> None:
    key = new_key()
    client = anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0)
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES,
                                extra_headers=SLOW) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert len(text.split()) == 12
    assert final.usage.output_tokens == 12
    chunks, _ = raw_stream(stack, key, "/v1/messages",
                           {"model": "claude-haiku-4-5", "max_tokens": 100,
                            "messages": MESSAGES, "stream": True},
                           {**SLOW, "x-mock-cached-tokens": "8"})
    body = b"".join(chunks)
    result = result_comment(body)
    assert body.index(b": xproxy_result ") < body.index(b"event: message_stop")
    # claude-haiku-4-5: $1 input, $0.10 cache read, $5 output per 1M tokens.
    usage = result["usage"]
    plain_input = usage["input_tokens"] - usage["cached_input_tokens"]
    assert usage["cached_input_tokens"] == 8
    expected = (nanos(plain_input, 1_000_000_000) + nanos(8, 100_000_000)
                + nanos(12, 5_000_000_000))
    assert result["cost_nanos"]["total"] == expected


def test_responses_stream(stack: Stack, new_key: Callable[..., str]) -> None:
    key = new_key()
    events = list(openai_client(stack, key).responses.create(
        model="gpt-4o-mini", input="Tell me something", stream=True, extra_headers=SLOW))
    completed = [e for e in events if e.type == "response.completed"]
    assert completed and completed[0].response.usage is not None
    chunks, _ = raw_stream(stack, key, "/v1/responses",
                           {"model": "gpt-4o-mini", "input": "Tell me something",
                            "stream": True}, SLOW)
    body = b"".join(chunks)
    result = result_comment(body)
    assert body.index(b"response.completed") < body.index(b": xproxy_result ")
    assert result["usage"]["output_tokens"] == 12 and result["priced"] is True


def test_client_that_disconnects_mid_stream_is_settled(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    e2e_env: dict[str, str],
) -> None:
    name, key = new_named_key()
    limit = "stream-" + uuid.uuid4().hex[:6]
    cli("apply", "-f", "-", stdin=f"""apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: {limit}}}
spec: {{type: Block, max: 10, selector: {{keys: [{name}]}}}}
""")
    every_worker_has_loaded_the_latest_configuration(stack, e2e_env)
    slow = {"x-mock-chunk-delay-ms": "100", "x-mock-words": "200"}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}", **slow},
                      json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
                            "max_tokens": 1000}) as response:
        assert response.status_code == 200
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"data: ") >= 5:
                break  # hang up after a few words of a 200-word answer
    deadline = time.monotonic() + 10
    spent, held = spent_and_held(cli, limit)
    while time.monotonic() < deadline and not (spent > 0 and held == 0):
        time.sleep(0.2)
        spent, held = spent_and_held(cli, limit)
    assert held == 0  # never left reserved
    # Priced on what was produced: more than zero, far less than the 200-word answer.
    assert 0 < spent < Decimal(format_nanos(nanos(40, MINI_IN) + nanos(200, MINI_OUT)))
