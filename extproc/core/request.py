"""Request understanding: which API a path is, and the facts a request body carries.

Covers OpenAI `chat/completions`, `completions`, `embeddings`, `responses`, Anthropic
`messages`, and the Azure OpenAI deployment paths. Parsing never raises on client input:
anything malformed becomes a `Deny(400, ...)` whose message says what is wrong.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

from extproc.core.decisions import Deny


class Endpoint(enum.Enum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    MODELS = "models"

    @property
    def is_anthropic(self) -> bool:
        return self is Endpoint.MESSAGES


_OPENAI_SUFFIXES = {
    "chat/completions": Endpoint.CHAT,
    "completions": Endpoint.COMPLETIONS,
    "embeddings": Endpoint.EMBEDDINGS,
    "responses": Endpoint.RESPONSES,
}


@dataclass(frozen=True, slots=True)
class Route:
    """What the path says: the endpoint, and the Azure deployment when the path names one."""

    endpoint: Endpoint
    azure_deployment: str | None = None


def classify_path(path: str) -> Route | None:
    """Map a request path (query string allowed) to an endpoint, or None if unsupported."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.startswith("/v1/"):
        rest = path[4:]
        if rest == "messages":
            return Route(Endpoint.MESSAGES)
        if rest == "models":
            return Route(Endpoint.MODELS)
        endpoint = _OPENAI_SUFFIXES.get(rest)
        return Route(endpoint) if endpoint else None
    if path.startswith("/openai/deployments/"):
        # /openai/deployments/<deployment>/<operation>
        deployment, _, operation = path[len("/openai/deployments/") :].partition("/")
        endpoint = _OPENAI_SUFFIXES.get(operation)
        if deployment and endpoint:
            return Route(endpoint, azure_deployment=deployment)
    return None


# Output-cap fields, in the order they are looked for. `max_completion_tokens` supersedes
# `max_tokens` on OpenAI chat; Responses uses `max_output_tokens`; Anthropic `max_tokens`.
_MAX_FIELDS = {
    Endpoint.CHAT: ("max_completion_tokens", "max_tokens"),
    Endpoint.COMPLETIONS: ("max_tokens",),
    Endpoint.EMBEDDINGS: (),
    Endpoint.RESPONSES: ("max_output_tokens",),
    Endpoint.MESSAGES: ("max_tokens",),
    Endpoint.MODELS: (),
}

# A non-text content part (image, audio, file) is counted as this many characters of prompt:
# about 1k tokens, a middle-of-the-road image cost. Only the estimate depends on it.
_NON_TEXT_PART_CHARS = 4000


@dataclass(frozen=True, slots=True)
class RequestFacts:
    endpoint: Endpoint
    model: str
    max_output_tokens: int | None
    stream: bool
    include_usage: bool
    user: str | None
    prompt_chars: int

    @property
    def prompt_tokens_estimate(self) -> int:
        # ~4 characters per token for English text; rounded up so that nothing is free.
        return (self.prompt_chars + 3) // 4


def _bad(message: str) -> Deny:
    return Deny(400, "invalid_request", message)


def _text_chars(value: object) -> int:
    """Characters of text in a prompt-like value: str, list of parts/messages, or dict."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        if "text" in value and isinstance(value["text"], str):
            return len(value["text"])
        if "content" in value:
            return _text_chars(value["content"])
        part_type = value.get("type")
        if isinstance(part_type, str) and part_type not in ("text", "input_text"):
            return _NON_TEXT_PART_CHARS
        return 0
    return 0


_PROMPT_FIELDS = {
    Endpoint.CHAT: ("messages",),
    Endpoint.COMPLETIONS: ("prompt",),
    Endpoint.EMBEDDINGS: ("input",),
    Endpoint.RESPONSES: ("input", "instructions"),
    Endpoint.MESSAGES: ("messages", "system"),
    Endpoint.MODELS: (),
}

_REQUIRED_FIELDS = {
    Endpoint.CHAT: "messages",
    Endpoint.COMPLETIONS: "prompt",
    Endpoint.EMBEDDINGS: "input",
    Endpoint.RESPONSES: "input",
    Endpoint.MESSAGES: "messages",
}


def parse_request(route: Route, body: bytes) -> RequestFacts | Deny:
    """Read the facts Tollgate needs from a request body, or explain why it is unusable."""
    endpoint = route.endpoint
    if not body:
        return _bad("Request body is empty; a JSON object is required.")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _bad(f"Request body is not valid JSON (or not valid UTF-8): {exc}")
    if not isinstance(doc, dict):
        return _bad("Request body must be a JSON object.")

    model = doc.get("model", route.azure_deployment)
    if model is None:
        return _bad("Missing required field 'model'.")
    if not isinstance(model, str) or not model.strip():
        return _bad("Field 'model' must be a non-empty string.")

    required = _REQUIRED_FIELDS.get(endpoint)
    # Responses also accepts a previous_response_id or a stored prompt instead of input.
    alternative = endpoint is Endpoint.RESPONSES and (
        "prompt" in doc or "previous_response_id" in doc
    )
    if required is not None and required not in doc and not alternative:
        return _bad(f"Missing required field '{required}'.")
    if endpoint in (Endpoint.CHAT, Endpoint.MESSAGES) and not isinstance(doc["messages"], list):
        return _bad("Field 'messages' must be an array.")

    max_output: int | None = None
    for name in _MAX_FIELDS[endpoint]:
        value = doc.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return _bad(f"Field '{name}' must be a positive integer.")
        max_output = value
        break

    stream = doc.get("stream", False)
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

    try:
        prompt_chars = sum(_text_chars(doc.get(name)) for name in _PROMPT_FIELDS[endpoint])
    except RecursionError:  # orjson accepts 1024 levels of nesting, Python's stack fewer
        return _bad("Request body is nested too deeply.")
    return RequestFacts(
        endpoint=endpoint,
        model=model,
        max_output_tokens=max_output,
        stream=stream,
        include_usage=include_usage,
        user=user,
        prompt_chars=prompt_chars,
    )
