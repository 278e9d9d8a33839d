"""The golden request/response bodies in tests/data (which also feed the parser tests and the
fake upstream) are what the official SDKs accept: each parses into the SDK's own model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent.parent / "data"


def golden(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def sse_events(name: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) for each event of a golden SSE file."""
    events: list[tuple[str | None, str]] = []
    for block in (DATA / name).read_text().split("\n\n"):
        if not block.strip():
            continue
        kind: str | None = None
        data: list[str] = []
        for line in block.splitlines():
            field, _, value = line.partition(": ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
        events.append((kind, "\n".join(data)))
    return events


def test_golden_json_bodies_validate_against_sdk_models() -> None:
    chat = ChatCompletion.model_validate(golden("openai_chat.response.json"))
    assert chat.usage is not None
    assert chat.usage.prompt_tokens_details is not None
    assert chat.usage.completion_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens
    assert chat.usage.completion_tokens_details.reasoning_tokens
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    Completion.model_validate(golden("openai_completions.response.json"))
    emb = CreateEmbeddingResponse.model_validate(golden("openai_embeddings.response.json"))
    assert set(emb.usage.model_dump()) == {"prompt_tokens", "total_tokens"}

    resp = Response.model_validate(golden("openai_responses.response.json"))
    assert resp.usage is not None
    assert resp.usage.input_tokens_details.cached_tokens
    assert resp.usage.output_tokens_details.reasoning_tokens
    assert resp.output_text

    msg = Message.model_validate(golden("anthropic_messages.response.json"))
    assert msg.usage.input_tokens and msg.usage.output_tokens
    assert msg.usage.cache_creation_input_tokens and msg.usage.cache_read_input_tokens


def test_golden_sse_streams_validate_against_sdk_models() -> None:
    chat = sse_events("openai_chat.stream.sse")
    assert chat[-1] == (None, "[DONE]")
    chunks = [ChatCompletionChunk.model_validate_json(data) for _, data in chat[:-1]]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])

    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    events = sse_events("openai_responses.stream.sse")
    parsed = [adapter.validate_json(data) for _, data in events]
    assert [kind for kind, _ in events] == [p.type for p in parsed]
    assert parsed[0].type == "response.created"
    assert parsed[-1].type == "response.completed" and parsed[-1].response.usage is not None
    assert any(p.type == "response.output_text.delta" for p in parsed)

    anthropic_adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    kinds: list[str | None] = []
    for kind, data in sse_events("anthropic_messages.stream.sse"):
        if kind == "ping":
            kinds.append(kind)
            continue
        event = anthropic_adapter.validate_json(data)
        assert event.type == kind
        kinds.append(kind)
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") >= 3
