"""Request understanding: which API a path is, and the facts a request body carries.

Which paths exist and where each endpoint keeps its output cap and prompt is the providers'
knowledge (core/providers/); this module reads a body with it. Parsing never raises on client
input: anything malformed becomes a `Deny(400, ...)` whose message says what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from extproc.core import providers
from extproc.core.attribution import MAX_USER_CHARS
from extproc.core.decisions import Deny
from extproc.core.providers.base import Endpoint as Endpoint
from extproc.core.providers.base import Route as Route
from extproc.core.providers.base import field
from extproc.core.shape import PromptScan, PromptShape, prompt_shape
from extproc.core.values import value_type


def classify_path(path: str) -> Route | None:
    """Map a request path (query string allowed) to an endpoint, or None if unsupported."""
    return providers.classify_path(path)


@value_type
class RequestFacts:
    endpoint: Endpoint
    model: str
    max_output_tokens: int | None
    stream: bool
    include_usage: bool
    user: str | None
    prompt_chars: int
    shape: PromptShape | None = None  # what the strict bound needs (core/estimate.py)

    @property
    def prompt_tokens_estimate(self) -> int:
        # ~4 characters per token for English text; rounded up so that nothing is free.
        return (self.prompt_chars + 3) // 4


# Bounds on what a client may send (each beyond is a 400 naming the bound). Nesting: orjson
# parses up to 1024 levels but serialises only 255, and every recursive walk of a body must stay
# far below Python's recursion limit; real requests (messages, tool schemas) nest a few dozen.
MAX_JSON_DEPTH = 128
MAX_MODEL_CHARS = 256
# An output cap above any model's; keeps every estimate far inside int64 and Lua's 2^53.
MAX_OUTPUT_TOKENS = 100_000_000


def _nested_deeper(body: bytes, doc: object, limit: int) -> bool:
    """True when `doc` nests containers more than `limit` deep. Iterative (a recursive walk is
    what deep input breaks). The depth is at most the number of opening brackets in the body,
    so most bodies are cleared by two C-speed byte counts without a walk."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        assert isinstance(children, Iterable)
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _bad(message: str) -> Deny:
    return Deny(400, "invalid_request", message)


def load_body(body: bytes) -> Any | Deny:
    """A request body's JSON value, or the 400 for an empty or undecodable body (every JSON
    endpoint, the ingest API included, says the same)."""
    if not body:
        return _bad("Request body is empty; a JSON object is required.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _bad(f"Request body is not valid JSON (or not valid UTF-8): {exc}")


def parse_request(route: Route, body: bytes) -> RequestFacts | Deny:
    """Read the facts Tollgate needs from a request body, or explain why it is unusable."""
    endpoint = route.endpoint
    doc = load_body(body)
    if isinstance(doc, Deny):
        return doc
    if not isinstance(doc, dict):
        return _bad("Request body must be a JSON object.")
    if _nested_deeper(body, doc, MAX_JSON_DEPTH):
        return _bad(f"Request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels.")

    # Gemini names the model in the path; Azure paths name a deployment, the body may not.
    model = route.model if route.model is not None else doc.get("model", route.azure_deployment)
    if model is None:
        return _bad("Missing required field 'model'.")
    if not isinstance(model, str) or not model.strip():
        return _bad("Field 'model' must be a non-empty string.")
    if len(model) > MAX_MODEL_CHARS:
        return _bad(f"Field 'model' must be at most {MAX_MODEL_CHARS} characters.")

    rules = providers.owner(endpoint).rules(endpoint)
    required = rules.required
    # Responses also accepts a previous_response_id or a stored prompt instead of input.
    alternative = endpoint is Endpoint.RESPONSES and (
        "prompt" in doc or "previous_response_id" in doc
    )
    if required is not None and required not in doc and not alternative:
        return _bad(f"Missing required field '{required}'.")
    if endpoint in (Endpoint.CHAT, Endpoint.MESSAGES) and not isinstance(doc["messages"], list):
        return _bad("Field 'messages' must be an array.")

    max_output: int | None = None
    for name in rules.max_fields:
        value = field(doc, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not (
            1 <= value <= MAX_OUTPUT_TOKENS
        ):
            return _bad(f"Field '{name}' must be an integer from 1 to {MAX_OUTPUT_TOKENS}.")
        max_output = value
        break

    stream = doc.get("stream", False) if rules.streams is None else rules.streams
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        return _bad("Field 'stream' must be a boolean.")

    include_usage = False
    options = doc.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            return _bad("Field 'stream_options' must be an object.")
        include_usage = options.get("include_usage") is True

    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        return _bad("Field 'user' must be a string.")
    if endpoint is Endpoint.MESSAGES and user is None:
        metadata = doc.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            user = metadata["user_id"]
    if user is not None and len(user) > MAX_USER_CHARS:
        # It may end up in usage events: a client must not be able to fill Redis with it.
        return _bad(f"Field 'user' must be at most {MAX_USER_CHARS} characters.")

    scan = PromptScan()
    prompt_chars = sum(scan.chars(doc.get(name)) for name in rules.prompt_fields)
    return RequestFacts(
        endpoint=endpoint,
        model=model,
        max_output_tokens=max_output,
        stream=stream,
        include_usage=include_usage,
        user=user,
        prompt_chars=prompt_chars,
        shape=prompt_shape(endpoint.value, doc, body, scan),
    )
