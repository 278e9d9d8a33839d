"""The prompt-text seam: every text a provider reads in a request, and every text it returns
in a (JSON) response, as rewritable slots.

A slot is a string inside the parsed body together with the container holding it, so that a
policy can replace it in place (redaction) and the body is serialised again once. The walk
covers each endpoint's text-bearing fields (messages with all their parts and tool-call
arguments, system prompts, Anthropic `system` and `tools`, Responses `input`/`instructions`,
completions `prompt`) and takes every string below them except identifiers, enums and binary
payloads (image URLs, base64 data), which are not text anyone reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Fields of the request body that hold text the model reads, per endpoint (`Endpoint.value`).
REQUEST_FIELDS = {
    "chat.completions": ("messages", "tools"),
    "completions": ("prompt", "suffix"),
    "embeddings": ("input",),
    "responses": ("input", "instructions", "tools"),
    "messages": ("system", "messages", "tools"),
}
# Fields of a JSON response that hold generated text.
RESPONSE_FIELDS = {
    "chat.completions": ("choices",),
    "completions": ("choices",),
    "responses": ("output",),
    "messages": ("content",),
}
# Keys whose strings are identifiers, enums or binary data, never prose.
_SKIP = frozenset({
    "role", "type", "id", "tool_call_id", "tool_use_id", "call_id", "name", "image_url", "url",
    "source", "data", "file_data", "file_id", "detail", "format", "cache_control", "media_type",
    "signature", "finish_reason", "stop_reason", "status", "logprobs", "index", "object",
    "model", "encrypted_content",
})
MAX_DEPTH = 64  # bodies are depth-checked (request.MAX_JSON_DEPTH); this bounds the walk too


@dataclass(slots=True)
class Slot:
    """One text: `container[key]` is the string `text`."""

    container: Any  # dict or list
    key: Any  # str or int
    text: str

    def replace(self, text: str) -> None:
        self.container[self.key] = text
        self.text = text


def request_slots(endpoint: str, doc: dict[str, Any]) -> list[Slot]:
    return _slots(doc, REQUEST_FIELDS.get(endpoint, ()))


def response_slots(endpoint: str, doc: dict[str, Any]) -> list[Slot]:
    return _slots(doc, RESPONSE_FIELDS.get(endpoint, ()))


def _slots(doc: dict[str, Any], fields: tuple[str, ...]) -> list[Slot]:
    out: list[Slot] = []
    stack: list[tuple[Any, Any, int]] = [(doc, f, 0) for f in reversed(fields) if f in doc]
    while stack:
        container, key, depth = stack.pop()
        value = container[key]
        if isinstance(value, str):
            if value:
                out.append(Slot(container, key, value))
        elif depth < MAX_DEPTH and isinstance(value, dict):
            stack.extend((value, k, depth + 1) for k in reversed(value) if k not in _SKIP)
        elif depth < MAX_DEPTH and isinstance(value, list):
            stack.extend((value, i, depth + 1) for i in reversed(range(len(value))))
    return out
