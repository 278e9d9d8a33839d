"""OpenAI-format access to Anthropic and Gemini models (`translate: true` on their Upstreams):
the `openai` SDK calls chat/completions, the fake Anthropic / Gemini APIs answer in their own
shapes, and the client gets OpenAI's shape back, priced from the provider's own usage. Real
Envoy, extproc, Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import (
    ANTHROPIC_UPSTREAM_KEY,
    GEMINI_UPSTREAM_KEY,
    CliRunner,
    upstream_requests,
)

pytestmark = pytest.mark.e2e

# Models no other test sends to chat/completions (the Upstreams below take them over).
CLAUDE, GEMINI = "claude-3-5-haiku", "gemini-2.0-flash"
# Nano-dollars per token: claude-3-5-haiku $0.80 / $4.00, gemini-2.0-flash $0.10 / $0.40.
RATES = {CLAUDE: (800, 4000), GEMINI: (100, 400)}


@pytest.fixture(scope="module")
def translating(cli: CliRunner) -> Iterator[None]:
    names = []
    for provider, model, secret in (("anthropic", CLAUDE, "ANTHROPIC_API_KEY"),
                                    ("gemini", GEMINI, "GEMINI_API_KEY")):
        name = f"tr-{provider}-" + uuid.uuid4().hex[:6]
        names.append(name)
        cli("apply", "-f", "-", stdin=(
            f"apiVersion: tollgate.io/v1alpha1\nkind: Upstream\nmetadata: {{name: {name}}}\n"
            f"spec:\n  provider: {provider}\n  cluster: {provider}\n  models: [{model}]\n"
            f"  priority: 10\n  translate: true\n"
            f"  credentials: [{{name: main, secretRef: {secret}}}]\n"))
    time.sleep(1.5)  # the workers reload within ~1 s
    yield
    for name in names:
        cli("delete", "upstreams", name)


def client_for(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0,
                         timeout=30)


def cost_nanos(model: str, prompt: int, completion: int) -> int:
    rate_in, rate_out = RATES[model]
    return prompt * rate_in + completion * rate_out


@pytest.mark.parametrize(("model", "path", "auth", "secret"), [
    (CLAUDE, "/v1/messages", "x-api-key", ANTHROPIC_UPSTREAM_KEY),
    (GEMINI, f"/v1beta/models/{GEMINI}:generateContent", "x-goog-api-key", GEMINI_UPSTREAM_KEY),
])
def test_chat_completion_round_trip(
    stack: Stack, new_key: Any, translating: None, model: str, path: str, auth: str,
    secret: str,
) -> None:
    client = client_for(stack, new_key())
    raw = client.chat.completions.with_raw_response.create(
        model=model, max_tokens=50,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello there"}])
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello from the mock upstream."
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 5
    expected = cost_nanos(model, usage.prompt_tokens, usage.completion_tokens)
    assert raw.headers["x-tollgate-cost"] == f"{expected / 1e9:.9f}"
    upstream = upstream_requests(stack)[-1]
    assert upstream["path"] == path
    assert upstream["headers"][auth] == secret
    assert "messages" not in upstream["body"] or model == CLAUDE  # Gemini gets `contents`


@pytest.mark.parametrize("model", [CLAUDE, GEMINI])
def test_stream_round_trip_with_usage(
    stack: Stack, new_key: Any, translating: None, model: str
) -> None:
    client = client_for(stack, new_key())
    chunks = list(client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count"}],
        extra_headers={"x-mock-words": "9"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9
    result = (chunks[-1].model_extra or {})["xproxy_result"]
    assert result["cost_nanos"]["total"] == cost_nanos(model, usage.prompt_tokens, 9)


@pytest.mark.parametrize("model", [CLAUDE, GEMINI])
def test_tool_calls_come_back_as_openai_tool_calls(
    stack: Stack, new_key: Any, translating: None, model: str
) -> None:
    """The request's tools reach the provider in its own shape."""
    client = client_for(stack, new_key())
    tools: Any = [{"type": "function", "function": {
        "name": "weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    client.chat.completions.create(model=model, tools=tools, tool_choice="required",
                                   messages=[{"role": "user", "content": "Weather in Oslo?"}])
    body = upstream_requests(stack)[-1]["body"]
    if model == CLAUDE:
        assert body["tools"][0]["input_schema"]["properties"] == {"city": {"type": "string"}}
        assert body["tool_choice"] == {"type": "any"}
    else:
        assert body["tools"][0]["functionDeclarations"][0]["name"] == "weather"
        assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


@pytest.mark.parametrize("model", [CLAUDE, GEMINI])
def test_what_does_not_map_is_a_clear_400(
    stack: Stack, new_key: Any, translating: None, model: str
) -> None:
    client = client_for(stack, new_key())
    before = len(upstream_requests(stack))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, n=2,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert "'n'" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, logprobs=True,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert "logprobs" in caught.value.message
    assert len(upstream_requests(stack)) == before  # nothing reached the provider
