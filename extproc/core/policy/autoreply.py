"""Auto-replies: a configured phrase in the request is answered at once with a canned text, in
the exact shape the endpoint's SDK expects (JSON, or SSE when the request streams), never sent
upstream and priced at zero.

Shapes: OpenAI chat completions, legacy completions, Anthropic messages. Other endpoints
(embeddings, Responses) are never auto-replied: they go upstream as usual.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

SSE = "text/event-stream"
JSON = "application/json"
ENDPOINTS = ("chat.completions", "completions", "messages")


def _id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _usage(endpoint: str) -> dict[str, int]:
    if endpoint == "messages":
        return {"input_tokens": 0, "output_tokens": 0}
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def reply(endpoint: str, model: str, text: str, stream: bool, now: float) -> tuple[str, bytes]:
    """(content type, body) of the canned answer."""
    created = int(now)
    if endpoint == "messages":
        message: dict[str, Any] = {
            "id": _id("msg_tollgate_"), "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": _usage(endpoint)}
        if not stream:
            return JSON, orjson.dumps(message)
        start = {**message, "content": [], "stop_reason": None}
        events = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": text}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 0}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return SSE, b"".join(f"event: {name}\n".encode() + b"data: " + orjson.dumps(doc)
                             + b"\n\n" for name, doc in events)
    chat = endpoint == "chat.completions"
    base = {"id": _id("chatcmpl-tollgate-" if chat else "cmpl-tollgate-"),
            "object": ("chat.completion" if chat else "text_completion"),
            "created": created, "model": model}
    if not stream:
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
             "finish_reason": "stop", "logprobs": None} if chat
            else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
        return JSON, orjson.dumps({**base, "choices": [choice], "usage": _usage(endpoint)})
    chunk = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        choices = [[{"index": 0, "delta": {"role": "assistant", "content": text},
                     "finish_reason": None, "logprobs": None}],
                   [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]]
    else:
        choices = [[{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]]
    encoded = [orjson.dumps({**chunk, "choices": c}) for c in choices]
    return SSE, b"".join(b"data: " + e + b"\n\n" for e in encoded) + b"data: [DONE]\n\n"
