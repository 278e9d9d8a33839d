"""chat/completions <-> Anthropic Messages / Gemini generateContent, as pure functions: what a
client sends becomes the provider's request, what the provider answers becomes OpenAI's."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.core.decisions import Deny
from extproc.core.providers import Endpoint, translation
from extproc.core.resources import ResourceError, validate_document
from extproc.core.sse import SseSplitter
from extproc.core.usage import Usage

pytestmark = pytest.mark.unit

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"},
                                 {"type": "image_url",
                                  "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 4 C"},
]


def test_to_anthropic() -> None:
    out = translation.to_anthropic({"model": "c", "messages": CONVERSATION, "stop": "END",
                                    "temperature": 0.2}, "claude-haiku-4-5", 300)
    assert isinstance(out, translation.Translated)
    assert (out.path, out.endpoint) == ("/v1/messages", Endpoint.MESSAGES)
    body = orjson.loads(out.body)
    assert body["system"] == "Be brief." and body["max_tokens"] == 300
    assert body["stop_sequences"] == ["END"] and body["temperature"] == 0.2
    user, assistant, tool = body["messages"]
    assert user["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}
    assert assistant["content"] == [{"type": "tool_use", "id": "call_1", "name": "weather",
                                     "input": {"city": "Oslo"}}]
    assert tool == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "Rain, 4 C"}]}


def test_to_gemini() -> None:
    out = translation.to_gemini({"model": "g", "messages": CONVERSATION, "stream": True,
                                 "max_completion_tokens": 99}, "gemini-2.5-flash", 99)
    assert isinstance(out, translation.Translated)
    assert out.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert out.endpoint is Endpoint.STREAM_GENERATE
    body = orjson.loads(out.body)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["generationConfig"] == {"maxOutputTokens": 99}
    user, model, tool = body["contents"]
    assert user["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}
    assert model == {"role": "model", "parts": [
        {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]}
    # Gemini answers a function by its name, which the tool message does not carry.
    assert tool["parts"] == [{"functionResponse": {"name": "weather",
                                                   "response": {"content": "Rain, 4 C"}}}]


@pytest.mark.parametrize("extra", [{"n": 3}, {"logprobs": True}, {"top_logprobs": 2},
                                   {"response_format": {"type": "json_object"}},
                                   {"frequency_penalty": 0.5}, {"audio": {"voice": "x"}}])
def test_what_does_not_map_is_refused(extra: dict[str, Any]) -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **extra}
    for out in (translation.to_anthropic(doc, "m", 10), translation.to_gemini(doc, "m", 10)):
        assert isinstance(out, Deny) and out.status == 400
        assert next(iter(extra)) in out.message


def test_gemini_refuses_image_urls_it_cannot_fetch() -> None:
    doc = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}]}]}
    assert isinstance(translation.to_gemini(doc, "m", None), Deny)
    assert isinstance(translation.to_anthropic(doc, "m", 5), translation.Translated)


USAGE = Usage(input=30, output=12, cached_input=10, reasoning=4)


def test_answers_come_back_in_openai_shape() -> None:
    anthropic = orjson.dumps({"id": "msg_1", "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "tu_1", "name": "weather", "input": {"city": "Oslo"}}],
        "stop_reason": "tool_use"})
    doc = orjson.loads(translation.from_anthropic(anthropic, "claude-x", USAGE) or b"")
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "weather", "arguments": '{"city":"Oslo"}'}
    assert doc["usage"]["prompt_tokens"] == 30
    assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 10
    gemini = orjson.dumps({"candidates": [{"content": {"parts": [
        {"text": "thinking...", "thought": True}, {"text": "Rain."}]},
        "finishReason": "MAX_TOKENS"}]})
    doc = orjson.loads(translation.from_gemini(gemini, "gemini-x", USAGE) or b"")
    assert doc["choices"][0]["message"]["content"] == "Rain."  # thoughts are not the answer
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4


def _chunks(stream: bytes) -> list[Any]:
    return [orjson.loads(e.data) for e in SseSplitter().feed(stream)
            if e.data and e.data != b"[DONE]"]


def test_anthropic_stream_with_a_tool_call() -> None:
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_9"}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "tool_use", "id": "tu_1",
                                                   "name": "weather"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "input_json_delta", "partial_json": '{"city":'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "input_json_delta", "partial_json": '"Oslo"}'}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
    ]
    raw = b"".join(b"event: " + n.encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n"
                   for n, d in events)
    stream = translation.AnthropicStream("claude-x")
    out = stream.feed(raw) + stream.finish(USAGE, True, b'{"cost":1}')
    chunks = _chunks(out)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "tu_1"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Oslo"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-1]["xproxy_result"] == {"cost": 1}
    assert out.endswith(b": xproxy_result {\"cost\":1}\n\ndata: [DONE]\n\n")


def test_only_anthropic_and_gemini_upstreams_translate() -> None:
    base = {"apiVersion": "tollgate.io/v1alpha1", "kind": "Upstream",
            "metadata": {"name": "u"}}
    ok = validate_document({**base, "spec": {"provider": "gemini", "cluster": "gemini",
                                             "translate": True}})
    assert ok.spec["translate"] is True
    with pytest.raises(ResourceError, match="translate"):
        validate_document({**base, "spec": {"provider": "openai", "cluster": "openai",
                                            "translate": True}})
