"""OpenAI: `chat/completions`, `completions`, `embeddings`, `responses` and `/v1/models`.

Owns the `/v1/...` OpenAI paths (the dialect Azure OpenAI and OpenAI-compatible servers speak
too, see `azure_openai` and `openai_compatible`), the usage readers for its JSON bodies and SSE
streams, and the OpenAI error shape `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from extproc.core.providers.base import (
    Cluster,
    Endpoint,
    RequestRules,
    RewriteInput,
    Route,
    StreamReader,
    json_object,
    text_len,
)
from extproc.core.sse import SseEvent
from extproc.core.usage import Usage, count

if TYPE_CHECKING:
    from extproc.core.decisions import Deny

SUFFIXES = {
    "chat/completions": Endpoint.CHAT,
    "completions": Endpoint.COMPLETIONS,
    "embeddings": Endpoint.EMBEDDINGS,
    "responses": Endpoint.RESPONSES,
}

# `max_completion_tokens` supersedes `max_tokens` on chat; Responses uses `max_output_tokens`.
_RULES = {
    Endpoint.CHAT: RequestRules(("max_completion_tokens", "max_tokens"), ("messages",),
                                "messages", "max_completion_tokens"),
    Endpoint.COMPLETIONS: RequestRules(("max_tokens",), ("prompt",), "prompt", "max_tokens"),
    Endpoint.EMBEDDINGS: RequestRules((), ("input",), "input"),
    Endpoint.RESPONSES: RequestRules(("max_output_tokens",), ("input", "instructions"), "input",
                                     "max_output_tokens"),
    Endpoint.MODELS: RequestRules(),
}


def usage_from_openai(usage: Any) -> Usage:
    """Chat/completions/embeddings (`prompt_tokens`) or Responses (`input_tokens`) usage."""
    if not isinstance(usage, dict):
        return Usage()
    if "prompt_tokens" in usage:
        return Usage(
            input=count(usage, "prompt_tokens"),
            output=count(usage, "completion_tokens"),
            cached_input=count(usage, "prompt_tokens_details", "cached_tokens"),
            reasoning=count(usage, "completion_tokens_details", "reasoning_tokens"),
        )
    return Usage(
        input=count(usage, "input_tokens"),
        output=count(usage, "output_tokens"),
        cached_input=count(usage, "input_tokens_details", "cached_tokens"),
        reasoning=count(usage, "output_tokens_details", "reasoning_tokens"),
    )


class ChunkReader:
    """Chat/completions streams: the final usage chunk; `data: [DONE]` ends the stream. When
    Tollgate turned `include_usage` on (`hide_usage_chunk`), the extra chunk is dropped and the
    `"usage":null` members the option adds to every chunk are taken out again."""

    def __init__(self, hide_usage_chunk: bool) -> None:
        self.hide_usage_chunk = hide_usage_chunk
        self.usage: Usage | None = None
        self.output_chars = 0
        self.held_usage_chunk: bytes | None = None
        self.result_comment = True

    def observe(self, event: SseEvent) -> tuple[bytes | None, bool]:
        data = event.data
        if data.strip() == b"[DONE]":
            return None, True
        doc = json_object(data)
        if doc is None:
            return event.raw, False
        usage = doc.get("usage")
        for choice in doc.get("choices") or ():
            if isinstance(choice, dict):
                delta = choice.get("delta")
                self.output_chars += text_len(delta if delta is not None else choice)
        if isinstance(usage, dict):
            self.usage = usage_from_openai(usage)
            if not doc.get("choices"):
                if self.hide_usage_chunk:
                    return None, False  # the chunk only exists because Tollgate asked for it
                self.held_usage_chunk = event.raw  # the client asked for it: result goes in it
                return None, False
        if self.hide_usage_chunk and b'"usage":null' in event.raw:
            return event.raw.replace(b',"usage":null', b"").replace(b'"usage":null,', b""), False
        return event.raw, False


class ResponsesReader:
    """Responses API streams: `usage` on `response.completed` (or `.incomplete`/`.failed`);
    the stream ends with the body (there is no terminator event)."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.output_chars = 0
        self.held_usage_chunk: bytes | None = None
        self.result_comment = True

    def observe(self, event: SseEvent) -> tuple[bytes | None, bool]:
        name = event.event
        if name == "response.output_text.delta" or name.endswith(".delta"):
            doc = json_object(event.data)
            if doc is not None and isinstance(doc.get("delta"), str):
                self.output_chars += len(doc["delta"])
        elif name in ("response.completed", "response.incomplete", "response.failed"):
            doc = json_object(event.data)
            response = doc.get("response") if doc else None
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self.usage = usage_from_openai(response["usage"])
        return event.raw, False


class OpenAIDialect:
    """What every provider that speaks OpenAI's API shares (Azure and compatible servers
    reuse it)."""

    dialect = "openai"
    auth_header = "authorization"
    model_names: tuple[str, ...] = ()  # every name no other provider claims

    def serves(self, route: Route) -> bool:
        return route.endpoint in _RULES and route.azure_deployment is None

    def auth_value(self, secret: str) -> str:
        return "Bearer " + secret

    def rewrite(self, req: RewriteInput) -> list[tuple[str, str]]:
        return []

    def rules(self, endpoint: Endpoint) -> RequestRules:
        return _RULES[endpoint]

    def key_from_path(self, path: str) -> str | None:
        return None

    def usage_from_json(self, endpoint: Endpoint, doc: Any) -> Usage | None:
        usage = doc.get("usage") if isinstance(doc, dict) else None
        return usage_from_openai(usage) if isinstance(usage, dict) else None

    def stream_reader(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamReader:
        if endpoint is Endpoint.RESPONSES:
            return ResponsesReader()
        return ChunkReader(hide_usage_chunk)

    def error_body(self, deny: Deny) -> bytes:
        return deny.body(False)


_GEMINI_CALLS = (":generateContent", ":streamGenerateContent", ":countTokens")


class OpenAI(OpenAIDialect):
    name = "openai"
    endpoints = frozenset(_RULES)
    cluster: Cluster | None = Cluster("openai", "api.openai.com")

    def classify(self, path: str) -> Route | None:
        if not path.startswith("/v1/"):
            return None
        rest = path[4:]
        if rest == "models":
            return Route(Endpoint.MODELS)
        model = rest.removeprefix("models/")
        if model != rest and model and "/" not in model and not model.endswith(_GEMINI_CALLS):
            # `models.retrieve`: one model, answered like the list (`Route.model` names it).
            # Gemini's `/v1/models/<m>:generateContent` is not one (fine-tuned OpenAI ids
            # contain colons, so the method suffix is what tells them apart).
            return Route(Endpoint.MODELS, model=model)
        endpoint = SUFFIXES.get(rest)
        return Route(endpoint) if endpoint else None


PROVIDER = OpenAI()
