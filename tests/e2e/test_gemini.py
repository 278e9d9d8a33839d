"""Google Gemini through the gateway with the official `google-genai` SDK: real Envoy, extproc,
Redis, the fake upstream speaking Gemini's native API. JSON and SSE pricing, the virtual key
swapped for the provider credential (header or `?key=`), countTokens passed through unpriced, a
Block limit refusing, and errors in Google's shape."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors, types

from extproc.launch import Stack
from tests.e2e.conftest import GEMINI_UPSTREAM_KEY, CliRunner, upstream_requests

pytestmark = pytest.mark.e2e

MODEL = "gemini-2.5-flash"
# gemini-2.5-flash list prices in nano-dollars per token: $0.30 / $2.50 per 1M.
INPUT_NANOS, OUTPUT_NANOS = 300, 2500


def client_for(stack: Stack, key: str, headers: dict[str, str] | None = None) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=stack.base_url, api_version="v1beta", headers=headers or {}))


def expected_nanos(meta: types.GenerateContentResponseUsageMetadata) -> int:
    output = (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0)
    return (meta.prompt_token_count or 0) * INPUT_NANOS + output * OUTPUT_NANOS


def last_gemini_call(stack: Stack) -> dict[str, Any]:
    return [r for r in upstream_requests(stack) if ":" in r["path"]][-1]


def test_generate_content_is_priced_and_the_key_swapped(
    stack: Stack, new_key: Any
) -> None:
    key = new_key()
    client = client_for(stack, key, {"x-mock-reasoning-tokens": "7"})
    response = client.models.generate_content(model=MODEL, contents="Hello there")
    assert response.text == "Hello from the mock upstream."
    meta = response.usage_metadata
    assert meta is not None and meta.thoughts_token_count == 7
    headers = response.sdk_http_response.headers if response.sdk_http_response else {}
    assert headers is not None
    nanos = expected_nanos(meta)
    assert headers["x-tollgate-cost"] == f"{nanos / 1e9:.9f}"
    assert headers["x-tollgate-reasoning-tokens"] == "7"
    upstream = last_gemini_call(stack)
    assert upstream["path"] == f"/v1beta/models/{MODEL}:generateContent"
    assert upstream["headers"]["x-goog-api-key"] == GEMINI_UPSTREAM_KEY
    assert key not in orjson.dumps(upstream).decode()


def test_stream_is_priced_in_its_final_chunk(stack: Stack, new_key: Any) -> None:
    client = client_for(stack, new_key(), {"x-mock-words": "12"})
    chunks = list(client.models.generate_content_stream(model=MODEL, contents="Count to 12"))
    text = "".join(c.text or "" for c in chunks)
    assert len(text.split()) == 12
    meta = chunks[-1].usage_metadata
    assert meta is not None and meta.candidates_token_count == 12
    # The result rides in the final chunk (the SDK drops the member); read the raw stream.
    raw = httpx.post(f"{stack.base_url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
                     headers={"x-goog-api-key": client._api_client.api_key or "",
                              "x-mock-words": "12"},
                     json={"contents": [{"role": "user", "parts": [{"text": "Count to 12"}]}]},
                     timeout=30)
    lines = [line for line in raw.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines)  # nothing google-genai chokes on
    result = orjson.loads(lines[-1].removeprefix("data: "))["xproxy_result"]
    assert result["cost_nanos"]["total"] == expected_nanos(meta)
    assert result["usage"]["output_tokens"] == 12


def test_a_key_in_the_query_string_never_reaches_google(stack: Stack, new_key: Any) -> None:
    key = new_key()
    response = httpx.post(
        f"{stack.base_url}/v1beta/models/{MODEL}:generateContent?key={key}",
        json={"contents": [{"parts": [{"text": "Hi"}]}]}, timeout=30)
    assert response.status_code == 200, response.text
    assert float(response.headers["x-tollgate-cost"]) > 0
    upstream = last_gemini_call(stack)
    assert upstream["query"] == {}
    assert upstream["headers"]["x-goog-api-key"] == GEMINI_UPSTREAM_KEY
    assert key not in orjson.dumps(upstream).decode()


def test_count_tokens_passes_through_unpriced(stack: Stack, new_key: Any) -> None:
    client = client_for(stack, new_key())
    counted = client.models.count_tokens(model=MODEL, contents="How many tokens is this?")
    assert counted.total_tokens and counted.total_tokens > 0
    headers = counted.sdk_http_response.headers if counted.sdk_http_response else {}
    assert headers is not None and headers["x-tollgate-cost"] == "0.000000000"


def test_bad_key_is_a_401_in_googles_shape(stack: Stack) -> None:
    client = client_for(stack, "tg-not-a-key")
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="Hello")
    assert caught.value.code == 401
    assert caught.value.status == "UNAUTHENTICATED"
    raw = httpx.post(f"{stack.base_url}/v1beta/models/{MODEL}:generateContent",
                     headers={"x-goog-api-key": "tg-not-a-key"},
                     json={"contents": [{"parts": [{"text": "Hi"}]}]}, timeout=30)
    error = raw.json()["error"]
    assert (error["code"], error["status"]) == (401, "UNAUTHENTICATED")
    assert error["message"]


def test_block_limit_refuses_gemini_calls(
    stack: Stack, cli: CliRunner, new_named_key: Any
) -> None:
    name, key = new_named_key()
    limit = "gem-" + uuid.uuid4().hex[:6]
    cli("apply", "-f", "-", stdin=(
        "apiVersion: tollgate.io/v1alpha1\nkind: Limit\n"
        f"metadata: {{name: {limit}}}\nspec:\n  type: Block\n  max: 0.00001\n"
        f"  period: month\n  selector: {{keys: [{name}]}}\n"))
    time.sleep(1.5)  # the workers reload within ~1 s
    client = client_for(stack, key)
    # $0.00001 cannot hold 1000 output tokens at $2.50 per 1M ($0.0025).
    config = types.GenerateContentConfig(max_output_tokens=1000)
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="Hello", config=config)
    assert caught.value.code == 429
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    before = len(upstream_requests(stack))
    with pytest.raises(errors.ClientError):
        list(client.models.generate_content_stream(model=MODEL, contents="Hi", config=config))
    assert len(upstream_requests(stack)) == before  # nothing reached the provider


def test_vertex_style_paths_are_served_by_the_gemini_api(stack: Stack, new_key: Any) -> None:
    """The SDK with `vertexai=True`, in express mode (API key in x-goog-api-key) and with a
    project and location (the key as an OAuth bearer token): the same pricing, JSON and SSE,
    the call sent to the Gemini API's path with the provider key; errors in Google's shape."""
    from google.oauth2.credentials import Credentials

    key = new_key()
    options = types.HttpOptions(base_url=stack.base_url, headers={"x-mock-words": "5"})
    express = genai.Client(vertexai=True, api_key=key, http_options=options)
    projects = genai.Client(vertexai=True, project="p1", location="us-central1",
                            credentials=Credentials(token=key), http_options=options)
    for client in (express, projects):
        response = client.models.generate_content(model=MODEL, contents="Hello there")
        meta = response.usage_metadata
        assert meta is not None and meta.candidates_token_count == 5
        headers = response.sdk_http_response.headers if response.sdk_http_response else {}
        assert headers is not None
        assert headers["x-tollgate-cost"] == f"{expected_nanos(meta) / 1e9:.9f}"
        upstream = last_gemini_call(stack)
        assert upstream["path"] == f"/v1beta/models/{MODEL}:generateContent"
        assert upstream["headers"]["x-goog-api-key"] == GEMINI_UPSTREAM_KEY
        assert key not in orjson.dumps(upstream).decode()
    chunks = list(express.models.generate_content_stream(model=MODEL, contents="Count"))
    assert "".join(c.text or "" for c in chunks).split() and chunks[-1].usage_metadata
    assert last_gemini_call(stack)["path"] == \
        f"/v1beta/models/{MODEL}:streamGenerateContent"
    refused = genai.Client(vertexai=True, api_key="tg-not-a-key", http_options=options)
    with pytest.raises(errors.ClientError) as denied:
        refused.models.generate_content(model=MODEL, contents="Hello")
    assert (denied.value.code, denied.value.status) == (401, "UNAUTHENTICATED")


def test_embeddings_are_priced_from_the_request_text(stack: Stack, new_key: Any) -> None:
    """`embed_content` (the SDK sends batchEmbedContents) and a raw embedContent: the Gemini
    API answers vectors without token counts, so the input is the request's text at ~4
    characters a token, rounded up, at gemini-embedding-001's $0.15 per 1M tokens."""
    model = "gemini-embedding-001"
    client = client_for(stack, new_key())
    response = client.models.embed_content(model=model, contents=["Hello there", "General K"])
    assert response.embeddings is not None and len(response.embeddings) == 2
    headers = response.sdk_http_response.headers if response.sdk_http_response else {}
    assert headers is not None
    tokens = -(-len("Hello thereGeneral K") // 4)  # 5
    assert headers["x-tollgate-cost"] == f"{tokens * 150 / 1e9:.9f}"
    assert last_gemini_call(stack)["path"] == f"/v1beta/models/{model}:batchEmbedContents"
    raw = httpx.post(f"{stack.base_url}/v1beta/models/{model}:embedContent",
                     headers={"x-goog-api-key": client._api_client.api_key or ""},
                     json={"content": {"parts": [{"text": "12345678"}]}}, timeout=30)
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-tollgate-cost"] == f"{2 * 150 / 1e9:.9f}"
    result = raw.json()["xproxy_result"]
    assert "usage-estimated-from-request" in str(result)
