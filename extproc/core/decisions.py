"""What the core tells the edge to do with one ext_proc message.

Decisions are plain values. The server adapter is the only code that turns them into protobuf
`ProcessingResponse`s; header changes travel as data (sets, removes) until that edge.
Denials are values too (`Deny`), never exceptions: an exception means a fault, not a refusal.
"""

from __future__ import annotations

import enum
from dataclasses import field

import orjson

from extproc.core.values import value_type


class BodyMode(enum.Enum):
    """Response body processing mode chosen per response (Envoy `mode_override`)."""

    NONE = "NONE"
    BUFFERED = "BUFFERED"
    STREAMED = "STREAMED"

    __hash__ = object.__hash__  # identity, in C (see `Endpoint`)


@value_type
class HeaderEdit:
    """Headers to set (overwrite) and to remove. Names are lower-case."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)

    def plus(self, other: HeaderEdit) -> HeaderEdit:
        return HeaderEdit(self.set + other.set, self.remove + other.remove)


NO_EDIT = HeaderEdit()


@value_type
class Continue:
    """Let the message through, possibly changed.

    `body` replaces the buffered body (the adapter fixes `content-length` in the same reply,
    or Envoy answers 500). `clear_route_cache` makes Envoy route again on the edited headers.
    """

    headers: HeaderEdit = NO_EDIT
    body: bytes | None = None
    clear_route_cache: bool = False
    response_body_mode: BodyMode | None = None
    streamed_chunk: bool = False  # `body` replaces one chunk of a STREAMED body (no headers)


CONTINUE = Continue()


# OpenAI-style error `type` per status; Anthropic clients read the same fields.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "service_unavailable",
}


@value_type
class Deny:
    """Answer the client now, without calling the upstream.

    `type_override` and `code_value` exist for bodies whose shape is fixed elsewhere (the
    compatible budget refusal `{"type": "LimitExceeded", "code": 429}`); `result` becomes the
    body's result object.
    """

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    extra: dict[str, object] = field(default_factory=dict)
    type_override: str | None = None
    code_value: int | str | None = None
    result: dict[str, object] | None = None

    @property
    def error_type(self) -> str:
        if self.type_override is not None:
            return self.type_override
        return _ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self, anthropic_style: bool = False) -> bytes:
        """The JSON error body: `{"error": {"message", "type", "code"}}`.

        For Anthropic endpoints a top-level `"type": "error"` is added, so the same body is a
        valid error for both SDKs.
        """
        error: dict[str, object] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code if self.code_value is None else self.code_value,
        }
        error.update(self.extra)
        doc: dict[str, object] = {"type": "error", "error": error} if anthropic_style else {
            "error": error
        }
        if self.result is not None:
            doc["xproxy_result"] = self.result
        return orjson.dumps(doc)


Decision = Continue | Deny
