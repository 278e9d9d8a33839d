"""The provider protocol: what Tollgate must know about one LLM provider, and nothing else.

Rules (every provider module follows them; the registry in `__init__` is the only list):

1. A provider has a `name` (the Upstream's `spec.provider`) and speaks one *dialect*: the API
   shape its clients use (`openai`, `anthropic`, `gemini`). Azure OpenAI and OpenAI-compatible
   servers speak `openai`.
2. Paths: `classify(path)` maps the paths the provider *owns* to a `Route`, or None. Each path
   is owned by at most one provider; the registry asks them in order, the first answer wins.
   A provider that owns no paths of its own (Azure's `/v1` calls, OpenAI-compatible) returns
   None for them and serves the owner's routes through `serves`.
3. `serves(route)`: whether an Upstream of this provider can take a call on `route` (possibly
   after `rewrite`). Upstream choice asks this, never the provider's name.
4. Authentication: the credential travels in `auth_header` as `auth_value(secret)`; every
   other header that may carry a virtual key (`KEY_HEADERS`) is removed on the way up. A
   provider whose clients may put the key in the query string reads it (`key_from_path`) and
   removes it in `rewrite`: a virtual key never reaches a provider.
5. `rewrite(...)`: the header sets (`:path`, version headers) a call needs on its way to this
   provider. Pure: it sees the request, never the network.
6. Usage: `usage_from_json(endpoint, doc)` reads a JSON response body; `stream_reader(...)`
   returns a `StreamReader` fed the SSE events of a streamed one, in order. Readers are
   tolerant: a missing or mistyped count is 0, never an exception.
7. Errors: `error_body(deny)` is the JSON a client of this dialect expects for a refusal.
8. Request fields: `rules(endpoint)` names the body fields that carry the output cap and the
   prompt, and the field that is required, for the endpoints it owns.
9. `cluster`: the Envoy cluster name and host of the provider's public API (TLS on 443), or
   None when there is no single host (OpenAI-compatible servers are configured per Upstream).
10. `model_names`: globs of the model names its public API serves, which the models list
   (`/v1/models`) asks when an Upstream of it serves `*`; empty for the OpenAI dialect, which
   takes every name no other provider claims.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from extproc.core.sse import SseEvent
from extproc.core.usage import Usage
from extproc.core.values import value_type

if TYPE_CHECKING:
    from extproc.core.decisions import Deny
    from extproc.core.resources import UpstreamSpec


class Endpoint(enum.Enum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    MODELS = "models"
    GENERATE = "gemini.generateContent"
    STREAM_GENERATE = "gemini.streamGenerateContent"
    COUNT_TOKENS = "gemini.countTokens"
    MESSAGES_COUNT_TOKENS = "messages.count_tokens"
    EMBED_CONTENT = "gemini.embedContent"
    BATCH_EMBED_CONTENTS = "gemini.batchEmbedContents"
    GEMINI_MODELS = "gemini.models"  # `GET /v1beta/models[/<model>]`, answered by Tollgate

    # Members are singletons compared by identity: hashing by identity too is consistent, and
    # runs in C (Enum's own `__hash__` is Python, hashing the name; endpoints key the provider
    # tables looked up several times per request).
    __hash__ = object.__hash__

    @property
    def embeds(self) -> bool:
        """An embeddings call: input only, no output to cap or bound."""
        return self in (Endpoint.EMBEDDINGS, Endpoint.EMBED_CONTENT, Endpoint.BATCH_EMBED_CONTENTS)

    @property
    def is_gemini(self) -> bool:
        return self.value.startswith("gemini.")

    @property
    def is_anthropic(self) -> bool:
        return self in (Endpoint.MESSAGES, Endpoint.MESSAGES_COUNT_TOKENS)


@value_type
class Route:
    """What the path says: the endpoint, the Azure deployment when the path names one, the
    model when the path names it (Gemini: `/v1beta/models/<model>:generateContent`)."""

    endpoint: Endpoint
    azure_deployment: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class RequestRules:
    """Where a request body of one endpoint keeps what Tollgate reads."""

    # Output-cap fields, in the order they are looked for; `a.b` names field b inside object a.
    max_fields: tuple[str, ...] = ()
    prompt_fields: tuple[str, ...] = ()  # fields whose text is the prompt
    required: str | None = None  # a field the body must have
    cap_field: str | None = None  # the field a clamp writes when the body has no cap
    streams: bool | None = None  # the endpoint always (True) streams; None: the body's `stream`


@dataclass(frozen=True, slots=True)
class Cluster:
    """The Envoy cluster of a provider's public API (TLS on 443, SNI = host)."""

    name: str
    host: str


@value_type
class RewriteInput:
    """What `Provider.rewrite` may look at."""

    upstream: UpstreamSpec
    route: Route
    path: str  # the client's :path, query included
    model: str  # the model the client asked for
    client_headers: frozenset[str]  # names of the headers the client sent (lower-case)
    bring_your_own_key: bool = False  # the client's own provider credential passes through


# Every header that may carry a virtual key (`xproxy-api-key`, the bring-your-own-key one, is
# removed separately by the exchange).
KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


class StreamReader(Protocol):
    """Reads one SSE stream event by event (rule 6)."""

    usage: Usage | None
    output_chars: int  # characters of generated text seen, for a stream cut short
    held_usage_chunk: bytes | None  # an event held back to carry the result object
    # Whether the result may also travel as an SSE comment line (`: xproxy_result ...`): not
    # for clients whose SSE parser reads every non-`data:` line as JSON (google-genai).
    result_comment: bool

    def observe(self, event: SseEvent) -> tuple[bytes | None, bool]:
        """What to forward for `event` (None: drop it) and whether it is the terminator
        (then it is held back until the call is priced)."""
        ...


class Provider(Protocol):
    name: str
    dialect: str
    endpoints: frozenset[Endpoint]  # the endpoints whose paths it owns (rule 2)
    auth_header: str
    cluster: Cluster | None
    model_names: tuple[str, ...]

    def classify(self, path: str) -> Route | None: ...

    def serves(self, route: Route) -> bool: ...

    def auth_value(self, secret: str) -> str: ...

    def key_from_path(self, path: str) -> str | None:
        """A virtual key the client put in the query string of a path this provider owns
        (Gemini's `?key=`), else None. `rewrite` must then take it out of the path."""
        ...

    def rewrite(self, req: RewriteInput) -> list[tuple[str, str]]: ...

    def rules(self, endpoint: Endpoint) -> RequestRules: ...

    def usage_from_json(self, endpoint: Endpoint, doc: Any) -> Usage | None: ...

    def stream_reader(self, endpoint: Endpoint, hide_usage_chunk: bool) -> StreamReader: ...

    def error_body(self, deny: Deny) -> bytes: ...


def field(doc: dict[str, Any], name: str) -> Any:
    """`doc[name]`, where `a.b` is field b of object a; None when absent."""
    value: Any = doc
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def set_field(doc: dict[str, Any], name: str, value: Any) -> None:
    """Set `doc[name]` (`a.b`: field b of object a, created when absent or not an object)."""
    *parents, last = name.split(".")
    for part in parents:
        child = doc.get(part)
        if not isinstance(child, dict):
            child = doc[part] = {}
        doc = child
    doc[last] = value


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` parsed as a JSON object, or None."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def text_len(delta: Any) -> int:
    """Characters of generated text in a delta: content, text, reasoning, tool arguments."""
    if not isinstance(delta, dict):
        return 0
    total = 0
    for key in ("content", "text", "reasoning_content", "thinking", "partial_json", "refusal"):
        value = delta.get(key)
        if isinstance(value, str):
            total += len(value)
    for call in delta.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            args = call["function"].get("arguments")
            if isinstance(args, str):
                total += len(args)
    return total
