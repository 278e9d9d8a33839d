"""Google Gemini, native API (Google AI / generativelanguage): `generateContent`,
`streamGenerateContent` (SSE with `?alt=sse`; a JSON array without it) and `countTokens`.

Paths: `/v1beta/models/<model>:<method>` (and `/v1/...`, which the `google-genai` SDK uses by
default); the model is in the path, not the body. Auth: `x-goog-api-key` (the SDK) or the
`key` query parameter (REST examples, curl); a virtual key found in the query is removed from
the path on the way up, and the provider credential always travels in `x-goog-api-key`.

Usage (`usageMetadata`): `promptTokenCount` already includes `cachedContentTokenCount`; the
prompt of tool calls (`toolUsePromptTokenCount`) is billed as input too; output is billed as
`candidatesTokenCount` + `thoughtsTokenCount` (thinking is output, and `maxOutputTokens` caps
both together). Streams repeat `usageMetadata` in chunks with cumulative counts, so the last
one wins; the stream ends with the body (no terminator event). `countTokens` bills nothing.

Errors: Google's shape, `{"error": {"code", "message", "status"}}`, with Tollgate's reason as
an `ErrorInfo` detail.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import orjson

from extproc.core.providers.base import (
    Cluster,
    Endpoint,
    RequestRules,
    RewriteInput,
    Route,
    StreamReader,
    json_object,
)
from extproc.core.sse import SseEvent
from extproc.core.usage import Usage, count

if TYPE_CHECKING:
    from extproc.core.decisions import Deny
    from extproc.core.pricing import ModelPrice

_PATH = re.compile(
    r"/(?:v1|v1beta|v1alpha)/models/([^/:?]+):(generateContent|streamGenerateContent|countTokens"
    r"|embedContent|batchEmbedContents)"
)
# Vertex AI's paths for the same methods (the google-genai SDK with `vertexai=True`: with a
# project and location, or in express mode with an API key). They are served by the Gemini
# API: the path is rewritten to `_PATH`'s form, the credential is the Upstream's API key.
_VERTEX = re.compile(
    r"/(?:v1|v1beta1)/(?:projects/[^/]+/locations/[^/]+/)?publishers/google/models/"
    r"([^/:?]+):(generateContent|streamGenerateContent|countTokens)"
)
# The models list and one model (`client.models.list()` / `.get()`), answered by Tollgate from
# what the key can reach (core/catalog.py). Only the beta versions: `/v1/models` is OpenAI's.
_LIST = re.compile(r"/(?:v1beta|v1alpha)/models(?:/([^/:?]+))?")
_METHODS = {
    "generateContent": Endpoint.GENERATE,
    "streamGenerateContent": Endpoint.STREAM_GENERATE,
    "countTokens": Endpoint.COUNT_TOKENS,
    "embedContent": Endpoint.EMBED_CONTENT,
    "batchEmbedContents": Endpoint.BATCH_EMBED_CONTENTS,
}
_PROMPT = ("contents", "systemInstruction", "system_instruction")
_CAP = "generationConfig.maxOutputTokens"
_RULES = {
    Endpoint.GENERATE: RequestRules((_CAP,), _PROMPT, "contents", _CAP, streams=False),
    Endpoint.STREAM_GENERATE: RequestRules((_CAP,), _PROMPT, "contents", _CAP, streams=True),
    # countTokens takes `contents` or a whole `generateContentRequest`.
    Endpoint.COUNT_TOKENS: RequestRules((), ("contents", "generateContentRequest"),
                                        streams=False),
    # Embeddings: the text is all there is to price. The Gemini API's answer carries no
    # token counts (only the vectors); the exchange then prices the request's own estimate.
    Endpoint.EMBED_CONTENT: RequestRules((), ("content",), "content", streams=False),
    Endpoint.BATCH_EMBED_CONTENTS: RequestRules((), ("requests",), "requests", streams=False),
    Endpoint.GEMINI_MODELS: RequestRules(),
}
# google.rpc.Code names, by HTTP status, as Google's APIs send them.
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    431: "INVALID_ARGUMENT",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def usage_from_gemini(meta: Any) -> Usage:
    if not isinstance(meta, dict):
        return Usage()
    thoughts = count(meta, "thoughtsTokenCount")
    return Usage(
        input=count(meta, "promptTokenCount") + count(meta, "toolUsePromptTokenCount"),
        output=count(meta, "candidatesTokenCount") + thoughts,
        cached_input=count(meta, "cachedContentTokenCount"),
        reasoning=thoughts,
    )


def _candidate_chars(doc: dict[str, Any]) -> int:
    total = 0
    for candidate in doc.get("candidates") or ():
        content = candidate.get("content") if isinstance(candidate, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("functionCall"), dict):
                total += len(orjson.dumps(part["functionCall"]))
    return total


class SseReader:
    """`data: <GenerateContentResponse>` events; the last `usageMetadata` holds the totals.

    The `google-genai` SDK reads every line that does not start with `data: ` as JSON, so an
    SSE comment breaks it: the result object goes into the final chunk instead (the one with a
    `finishReason`, held back until the stream ends; the SDK ignores the extra member). An
    event after it releases it unchanged."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.output_chars = 0
        self.held_usage_chunk: bytes | None = None
        self.result_comment = False

    def observe(self, event: SseEvent) -> tuple[bytes | None, bool]:
        doc = json_object(event.data)
        released, self.held_usage_chunk = self.held_usage_chunk or b"", None
        if doc is None:
            return released + event.raw, False
        self.output_chars += _candidate_chars(doc)
        if isinstance(doc.get("usageMetadata"), dict):
            self.usage = usage_from_gemini(doc["usageMetadata"])
        candidates = doc.get("candidates")
        if isinstance(candidates, list) and any(
            isinstance(c, dict) and c.get("finishReason") for c in candidates
        ):
            self.held_usage_chunk = event.raw
            return released or None, False
        return released + event.raw, False


class Gemini:
    name = "gemini"
    dialect = "gemini"
    auth_header = "x-goog-api-key"
    endpoints = frozenset(_RULES)
    cluster: Cluster | None = Cluster("gemini", "generativelanguage.googleapis.com")
    model_names: tuple[str, ...] = ("gemini-*", "gemma-*", "text-embedding-004")

    def classify(self, path: str) -> Route | None:
        match = _PATH.fullmatch(path) or _VERTEX.fullmatch(path)
        if match is None:
            listing = _LIST.fullmatch(path)
            return Route(Endpoint.GEMINI_MODELS, model=listing.group(1)) if listing else None
        return Route(_METHODS[match.group(2)], model=match.group(1))

    def serves(self, route: Route) -> bool:
        return route.endpoint in _RULES and route.endpoint is not Endpoint.GEMINI_MODELS

    def auth_value(self, secret: str) -> str:
        return secret

    def key_from_path(self, path: str) -> str | None:
        base, _, query = path.partition("?")
        if not query or self.classify(base.rstrip("/")) is None:
            return None
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "key" and value.strip():
                return value.strip()
        return None

    def rewrite(self, req: RewriteInput) -> list[tuple[str, str]]:
        base, _, query = req.path.partition("?")
        vertex = _VERTEX.fullmatch(base.rstrip("/"))
        if vertex is not None:  # the Gemini API's path for the same model and method
            base = f"/v1beta/models/{vertex.group(1)}:{vertex.group(2)}"
        if not query or req.bring_your_own_key:
            if vertex is None:
                return []
            return [(":path", base + ("?" + query if query else ""))]
        params = parse_qsl(query, keep_blank_values=True)
        kept = [(n, v) for n, v in params if n != "key"]
        if len(kept) == len(params) and vertex is None:
            return []
        # The key in the query is the virtual key: it must not reach Google.
        return [(":path", base + ("?" + urlencode(kept) if kept else ""))]

    def rules(self, endpoint: Endpoint) -> RequestRules:
        return _RULES[endpoint]

    def usage_from_json(self, endpoint: Endpoint, doc: Any) -> Usage | None:
        if endpoint is Endpoint.COUNT_TOKENS:
            return Usage()  # counting tokens is free
        if endpoint.embeds:  # counts only where Google sends them (`usageMetadata`)
            meta = doc.get("usageMetadata") if isinstance(doc, dict) else None
            return Usage(input=count(meta, "promptTokenCount")) if isinstance(
                meta, dict) else None
        if isinstance(doc, list):  # streamGenerateContent without alt=sse: a JSON array
            metas = [d["usageMetadata"] for d in doc
                     if isinstance(d, dict) and isinstance(d.get("usageMetadata"), dict)]
            return usage_from_gemini(metas[-1]) if metas else None
        meta = doc.get("usageMetadata") if isinstance(doc, dict) else None
        return usage_from_gemini(meta) if isinstance(meta, dict) else None

    def stream_reader(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamReader:
        return SseReader()

    def error_body(self, deny: Deny) -> bytes:
        error: dict[str, object] = {
            "code": deny.status,
            "message": deny.message,
            "status": _STATUS.get(deny.status, "UNKNOWN"),
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": str(deny.code if deny.code_value is None else deny.code_value),
                "domain": "tollgate",
                "metadata": {k: str(v) for k, v in deny.extra.items()},
            }],
        }
        doc: dict[str, object] = {"error": error}
        if deny.result is not None:
            doc["xproxy_result"] = deny.result
        return orjson.dumps(doc)


def model_resource(name: str, target: str, price: ModelPrice | None) -> dict[str, object]:
    """One `Model` as the Gemini API describes it (what `client.models.get()` parses): `name`
    is what the client calls, `target` the model it reaches (an alias's), whose price carries
    the token limits when the price table has them."""
    embeds = "embedding" in target
    doc: dict[str, object] = {
        "name": f"models/{name}",
        "displayName": name,
        "description": f"{target}, through Tollgate" if target != name else "Through Tollgate",
        "supportedGenerationMethods": (
            ["embedContent", "batchEmbedContents"] if embeds
            else ["generateContent", "streamGenerateContent", "countTokens"]),
    }
    if price is not None and price.context_window:
        doc["inputTokenLimit"] = price.context_window
    if price is not None and price.max_output_tokens and not embeds:
        doc["outputTokenLimit"] = price.max_output_tokens
    return doc


def page_request(query: str, default: int, most: int) -> tuple[int, int] | None:
    """`pageSize` and `pageToken` of a models list as (first index, page size); None when
    either is not a number. The token is the index the page starts at (Tollgate's own: clients
    pass back the `nextPageToken` they were given)."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    size, token = params.get("pageSize", ""), params.get("pageToken", "")
    if not (size or "0").isdigit() or not (token or "0").isdigit():
        return None
    return int(token or 0), min(int(size), most) if size and int(size) else default


PROVIDER = Gemini()
