"""Anthropic: `/v1/messages` (and `/v1/messages/count_tokens`, passed through at no cost),
authenticated with `x-api-key`, versioned by `anthropic-version`.

Usage: `input_tokens` excludes cache reads and writes, which Tollgate's `Usage.input` includes,
so they are added here. Streams: input and cache counts in `message_start`, output in the last
`message_delta` (later events carry cumulative counts); `message_stop` ends the stream. Errors
carry a top-level `"type": "error"` next to `error`, which the OpenAI SDK reads as well.
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

DEFAULT_VERSION = "2023-06-01"
_RULES = RequestRules(("max_tokens",), ("messages", "system"), "messages", "max_tokens")
_COUNT_RULES = RequestRules((), ("messages", "system"), "messages", streams=False)
_PATHS = {"/v1/messages": Endpoint.MESSAGES,
          "/v1/messages/count_tokens": Endpoint.MESSAGES_COUNT_TOKENS}


def usage_from_anthropic(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    cached = count(usage, "cache_read_input_tokens")
    written = count(usage, "cache_creation_input_tokens")
    return Usage(
        input=count(usage, "input_tokens") + cached + written,
        output=count(usage, "output_tokens"),
        cached_input=cached,
        cache_write=written,
        cache_write_1h=min(written, count(usage, "cache_creation", "ephemeral_1h_input_tokens")),
    )


class MessagesReader:
    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.output_chars = 0
        self.held_usage_chunk: bytes | None = None
        self.result_comment = True
        self._counts: dict[str, Any] = {}

    def observe(self, event: SseEvent) -> tuple[bytes | None, bool]:
        name = event.event
        if name == "message_stop":
            return None, True
        if name in ("message_start", "message_delta", "content_block_delta"):
            doc = json_object(event.data)
            if doc is None:
                return event.raw, False
            if name == "content_block_delta":
                self.output_chars += text_len(doc.get("delta"))
            else:
                message = doc.get("message") if name == "message_start" else doc
                usage = message.get("usage") if isinstance(message, dict) else None
                if isinstance(usage, dict):
                    # Later events carry cumulative counts: newer values replace older ones.
                    self._counts.update({k: v for k, v in usage.items() if v is not None})
                    self.usage = usage_from_anthropic(self._counts)
        return event.raw, False


class Anthropic:
    name = "anthropic"
    dialect = "anthropic"
    auth_header = "x-api-key"
    endpoints = frozenset(_PATHS.values())
    cluster: Cluster | None = Cluster("anthropic", "api.anthropic.com")
    model_names: tuple[str, ...] = ("claude-*",)

    def classify(self, path: str) -> Route | None:
        endpoint = _PATHS.get(path)
        return Route(endpoint) if endpoint else None

    def serves(self, route: Route) -> bool:
        return route.endpoint in self.endpoints

    def auth_value(self, secret: str) -> str:
        return secret

    def rewrite(self, req: RewriteInput) -> list[tuple[str, str]]:
        if "anthropic-version" in req.client_headers:
            return []  # the client's SDK knows which API version it speaks
        return [("anthropic-version", req.upstream.anthropic_version)]

    def rules(self, endpoint: Endpoint) -> RequestRules:
        return _COUNT_RULES if endpoint is Endpoint.MESSAGES_COUNT_TOKENS else _RULES

    def key_from_path(self, path: str) -> str | None:
        return None

    def usage_from_json(self, endpoint: Endpoint, doc: Any) -> Usage | None:
        if endpoint is Endpoint.MESSAGES_COUNT_TOKENS:
            return Usage()  # counting tokens is free
        usage = doc.get("usage") if isinstance(doc, dict) else None
        return usage_from_anthropic(usage) if isinstance(usage, dict) else None

    def stream_reader(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamReader:
        return MessagesReader()

    def error_body(self, deny: Deny) -> bytes:
        return deny.body(True)


PROVIDER = Anthropic()
