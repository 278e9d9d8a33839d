"""A fake OpenAI / Anthropic / Gemini upstream for tests, local runs and the benchmark.

This module owns the *provider side* of Tollgate's test setup and nothing else: an aiohttp
server that answers the OpenAI (Chat Completions, legacy Completions, Embeddings, Responses,
plus the Azure OpenAI deployment paths), Anthropic (Messages) and Google Gemini
(`models/<model>:generateContent`, `:streamGenerateContent?alt=sse`, `:countTokens`, under
`/v1beta` and `/v1`) endpoints in their real wire formats, JSON and SSE, in the same shapes
as the golden files under ``tests/data/``.

Everything it returns is deterministic so tests can predict the usage Tollgate will price:

* reply text: ``x-mock-reply`` header, default ``"Hello from the mock upstream."``; the reply is
  normalised to single spaces and ``x-mock-words: N`` repeats its words cyclically to N words;
* input tokens: ``max(1, len(text) // 4)`` where ``text`` is the prompt / input if it is a
  string, else its compact JSON serialisation (chat ``messages``; Anthropic ``system`` +
  ``messages``; Responses ``instructions`` + ``input``);
* output tokens: the number of reply words (embeddings: 0);
* ``x-mock-cached-tokens`` -> OpenAI ``cached_tokens`` / Anthropic ``cache_read_input_tokens``;
  ``x-mock-cache-write-tokens`` -> Anthropic ``cache_creation_input_tokens``;
  ``x-mock-reasoning-tokens`` -> OpenAI ``reasoning_tokens``, added to the completion/output
  count as OpenAI does. OpenAI counts cached tokens *inside* the prompt, so the reported prompt
  is raised to at least the cached count; Anthropic reports them separately, so it is not.
* a ``max_tokens`` style limit in the body truncates the reply to that many words and reports
  ``finish_reason: "length"`` / ``stop_reason: "max_tokens"`` / ``status: "incomplete"``.

Worst-case billing (``x-mock-bill: worst``), for tests that check a budget cannot be overspent:
prompt tokens = every UTF-8 byte of every string the provider reads plus one per token id in
token arrays plus 4 per message and 3 per call (a tokenizer at its worst, one byte per token),
and completion tokens = the request's output cap times ``n`` (what a model that writes until
the cap would bill), whatever the reply text is.

Fault injection: ``x-mock-status`` (provider-shaped error, with ``retry-after`` from
``x-mock-retry-after``), ``x-mock-delay-ms``; streaming: ``x-mock-chunk-delay-ms`` and
``x-mock-odd-chunks: 1``; ``x-mock-stamp: 1`` writes, in the response id of every streamed
event, the ``time.monotonic_ns()`` at which the event was written (same width, so the events
keep their size): a benchmark on the same machine reads each event's transit time from it.
Per credential (the key the request carries):
``POST /__mock/faults`` with ``{"credential": KEY, "status": 429, "count": N, "retry_after":
"1"}`` makes the next N requests with that key (0 or absent: every one, until ``DELETE
/__mock/faults``) fail with that provider-shaped error. Every API request is kept in a
500-entry ring buffer exposed at ``GET``/``DELETE /__mock/requests``; ``GET /__mock/health``
answers 200.

Run it standalone with ``python -m extproc.mock_upstream --port 8089``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import math
import os
import re
import signal
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import uvloop
from aiohttp import web

JSONObj = dict[str, Any]
Builder = Callable[["_Ctx"], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_REPLY: Final = "Hello from the mock upstream."
RING_SIZE: Final = 500
EMBEDDING_DIMS: Final = 8
# 7 is odd and smaller than any SSE line, so every event is split across several writes and
# most writes straddle an event boundary: exactly what a streaming parser must survive.
ODD_PIECE_BYTES: Final = 7
MAX_BODY_BYTES: Final = 64 * 1024 * 1024

OPENAI: Final = "openai"
ANTHROPIC: Final = "anthropic"
GEMINI: Final = "gemini"

_DEFAULT_WORDS: Final = tuple(DEFAULT_REPLY.split())
_JSON_CT: Final = "application/json"
# Both providers send the charset parameter; a parser that compares the header for equality
# with "text/event-stream" would be wrong against the real APIs, so the mock sends it too.
_SSE_CT: Final = "text/event-stream; charset=utf-8"
_SSE_DONE: Final = b"data: [DONE]\n\n"
_FINGERPRINT: Final = "fp_mock0001"
# Real OpenAI streams pad every chunk with a random "obfuscation" string (on by default since
# 2025). Parsers must ignore it; a fixed rotation keeps the mock's output deterministic.
_OBFUSCATION: Final = ("Qz4", "a1Bc9", "Xy", "k7LmP2", "T0", "w3Rz", "NpQ8sV")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


class _State:
    """Per-application state: the request ring buffer and an id counter."""

    __slots__ = ("_ids", "faults", "requests")

    def __init__(self) -> None:
        # deque(maxlen) drops the oldest entry in O(1): bounded memory under a benchmark.
        self.requests: deque[JSONObj] = deque(maxlen=RING_SIZE)
        self._ids = itertools.count(1)
        # credential -> [status, requests left (-1 = no end), retry-after or None]
        self.faults: dict[str, list[Any]] = {}

    def fault_for(self, headers: Mapping[str, str]) -> tuple[int, str | None] | None:
        """The injected error for the credential these headers carry, if any (counted)."""
        if not self.faults:
            return None
        for name in ("authorization", "x-api-key", "api-key", "x-goog-api-key"):
            key = headers.get(name, "").removeprefix("Bearer ")
            fault = self.faults.get(key)
            if fault is not None and fault[1] != 0:
                fault[1] -= 1 if fault[1] > 0 else 0
                return int(fault[0]), fault[2]
        return None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}mock{next(self._ids):020d}"

    def record(self, request: web.Request, body: Any) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": {name.lower(): value for name, value in request.headers.items()},
                "body": body,
            }
        )


STATE_KEY: Final = web.AppKey("tollgate_mock_upstream_state", _State)


# --------------------------------------------------------------------------------------------
# Control headers
# --------------------------------------------------------------------------------------------


class _ControlError(ValueError):
    """A malformed x-mock-* header; reported as a 400 so a broken test fails loudly."""


@dataclass(frozen=True, slots=True)
class _Controls:
    status: int
    retry_after: str | None
    delay_s: float
    chunk_delay_s: float
    odd_chunks: bool
    words: tuple[str, ...]
    cached: int
    cache_write: int
    reasoning: int
    worst: bool = False  # x-mock-bill: worst
    stamp: bool = False  # x-mock-stamp: the send time of each streamed event in its id


def _int_header(headers: Mapping[str, str], name: str, default: int = 0) -> int:
    raw = headers.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _ControlError(f"{name} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise _ControlError(f"{name} must be a non-negative integer, got {raw!r}")
    return value


def _parse_controls(headers: Mapping[str, str]) -> _Controls:
    reply = headers.get("x-mock-reply")
    words = _DEFAULT_WORDS if reply is None else tuple(reply.split())
    if "x-mock-words" in headers:
        count = _int_header(headers, "x-mock-words")
        source = words or _DEFAULT_WORDS
        words = tuple(itertools.islice(itertools.cycle(source), count))
    status = _int_header(headers, "x-mock-status")
    if status and not 400 <= status <= 599:
        raise _ControlError(f"x-mock-status must be in 400..599, got {status}")
    return _Controls(
        status=status,
        retry_after=headers.get("x-mock-retry-after"),
        delay_s=_int_header(headers, "x-mock-delay-ms") / 1000.0,
        chunk_delay_s=_int_header(headers, "x-mock-chunk-delay-ms") / 1000.0,
        odd_chunks=headers.get("x-mock-odd-chunks", "0").strip() not in ("", "0", "false"),
        words=words,
        cached=_int_header(headers, "x-mock-cached-tokens"),
        cache_write=_int_header(headers, "x-mock-cache-write-tokens"),
        reasoning=_int_header(headers, "x-mock-reasoning-tokens"),
        worst=headers.get("x-mock-bill", "").strip() == "worst",
        stamp=headers.get("x-mock-stamp", "0").strip() not in ("", "0", "false"),
    )


_PROMPT_FIELDS = ("messages", "tools", "functions", "response_format", "system", "prompt",
                  "input", "instructions", "tool_choice", "text")


def worst_prompt_tokens(body: JSONObj) -> int:
    """Prompt tokens billed by a tokenizer at its worst: one token per UTF-8 byte of text,
    one per token id, 4 per message and 3 per call."""
    total = 3
    stack: list[Any] = [body.get(name) for name in _PROMPT_FIELDS]
    for name in ("messages", "input"):
        if isinstance(body.get(name), list):
            total += 4 * len(body[name])
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value.encode())
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            total += 1
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return total


def _worst_output(body: JSONObj, visible: int) -> int:
    """The output cap times the number of choices (the visible reply when there is no cap)."""
    cap = next((body[n] for n in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                if isinstance(body.get(n), int)), visible)
    choices = max((body[n] for n in ("n", "best_of") if isinstance(body.get(n), int)),
                  default=1)
    return int(cap) * max(int(choices), 1)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ctx:
    """Everything a per-endpoint builder needs, resolved once by the common handler."""

    request: web.Request
    state: _State
    body: JSONObj
    controls: _Controls
    model: str
    request_id: str


def _text_len(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(orjson.dumps(value))


def count_input_tokens(*parts: Any) -> int:
    """The mock's deterministic tokenizer: a quarter of the text length, at least 1."""
    return max(1, sum(_text_len(part) for part in parts) // 4)


def _apply_limit(words: tuple[str, ...], limit: Any) -> tuple[tuple[str, ...], bool]:
    """Cut the reply to a max-tokens style limit (one word = one token); True if cut."""
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(words):
        return words[:limit], True
    return words, False


def _pieces(words: tuple[str, ...]) -> list[str]:
    """One stream delta per word; joined they equal " ".join(words)."""
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _json(obj: Any, request_id_header: str, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj),
        status=status,
        headers={"Content-Type": _JSON_CT, request_id_header: request_id},
    )


def _rid_header(dialect: str) -> str:
    # OpenAI names it x-request-id, Anthropic request-id; the SDKs read these names. (Google
    # sends none; a header the SDK ignores does no harm.)
    return "request-id" if dialect == ANTHROPIC else "x-request-id"


_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "permission_denied", "You are not allowed to do that."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
}

_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error."),
    529: ("overloaded_error", "Overloaded"),
}


_GEMINI_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT"),
    403: ("Permission denied.", "PERMISSION_DENIED"),
    404: ("Model not found.", "NOT_FOUND"),
    429: ("Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED"),
    500: ("An internal error has occurred.", "INTERNAL"),
    503: ("The model is overloaded. Please try again later.", "UNAVAILABLE"),
}


def _error(
    dialect: str,
    status: int,
    request_id: str,
    message: str | None = None,
    retry_after: str | None = None,
) -> web.Response:
    """A provider-shaped error body, as the SDKs expect it when they raise APIStatusError."""
    body: JSONObj
    if dialect == GEMINI:
        body = {"error": {"code": status, "message": message or _GEMINI_ERRORS.get(
            status, (f"HTTP {status}", ""))[0], "status": _GEMINI_ERRORS.get(
            status, ("", "UNKNOWN"))[1]}}
    elif dialect == ANTHROPIC:
        default_type = "invalid_request_error" if status < 500 else "api_error"
        etype, default_msg = _ANTHROPIC_ERRORS.get(status, (default_type, f"HTTP {status}"))
        body = {
            "type": "error",
            "error": {"type": etype, "message": message or default_msg},
            "request_id": request_id,
        }
    else:
        default_type = "invalid_request_error" if status < 500 else "server_error"
        etype, code, default_msg = _OPENAI_ERRORS.get(
            status, (default_type, None, f"HTTP {status}")
        )
        body = {
            "error": {"message": message or default_msg, "type": etype, "param": None, "code": code}
        }
    response = _json(body, _rid_header(dialect), request_id, status=status)
    if retry_after is not None:
        response.headers["retry-after"] = retry_after
    return response


_ID_DIGITS = re.compile(rb"mock\d{20}")


class _SSEWriter:
    """Writes SSE events, optionally slowly (chunk delay) or in odd-sized pieces."""

    __slots__ = ("_carry", "_delay", "_odd", "_resp", "_stamp", "_started")

    def __init__(self, resp: web.StreamResponse, controls: _Controls) -> None:
        self._resp = resp
        self._delay = controls.chunk_delay_s
        self._odd = controls.odd_chunks
        self._stamp = controls.stamp
        self._carry = b""
        self._started = False

    async def send(self, event: bytes) -> None:
        if self._started and self._delay:
            await asyncio.sleep(self._delay)
        self._started = True
        if self._stamp:  # the id's 20 digits (State.new_id) become the send time
            event = _ID_DIGITS.sub(b"mock%020d" % time.monotonic_ns(), event, count=1)
        if not self._odd:
            await self._resp.write(event)
            return
        # Carry the remainder into the next event so pieces cross event boundaries, and (with
        # a chunk delay) the tail of one event arrives only together with the next one.
        buf = self._carry + event
        cut = len(buf) - len(buf) % ODD_PIECE_BYTES
        for start in range(0, cut, ODD_PIECE_BYTES):
            await self._resp.write(buf[start : start + ODD_PIECE_BYTES])
        self._carry = buf[cut:]

    async def finish(self) -> web.StreamResponse:
        if self._carry:
            await self._resp.write(self._carry)
            self._carry = b""
        await self._resp.write_eof()
        return self._resp


async def _open_sse(ctx: _Ctx, dialect: str) -> tuple[web.StreamResponse, _SSEWriter]:
    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": _SSE_CT,
            "Cache-Control": "no-cache",
            _rid_header(dialect): ctx.request_id,
        },
    )
    # No Content-Length: aiohttp switches to chunked transfer encoding, like the providers.
    await resp.prepare(ctx.request)
    return resp, _SSEWriter(resp, ctx.controls)


def _data_event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _named_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


async def _stream(ctx: _Ctx, dialect: str, events: list[bytes]) -> web.StreamResponse:
    resp, writer = await _open_sse(ctx, dialect)
    try:
        for event in events:
            await writer.send(event)
        return await writer.finish()
    except ConnectionResetError:
        # The client went away mid-stream (a test cancelled, Envoy reset the stream):
        # normal for a streaming upstream, not worth a traceback.
        return resp


# --------------------------------------------------------------------------------------------
# OpenAI: Chat Completions
# --------------------------------------------------------------------------------------------


def _chat_usage(prompt: int, visible: int, c: _Controls) -> JSONObj:
    prompt = max(prompt, c.cached)
    completion = visible + c.reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": c.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": c.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _stream_options(body: JSONObj) -> tuple[bool, bool]:
    """(include_usage, include_obfuscation) from stream_options, with the API's defaults."""
    options = body.get("stream_options")
    if not isinstance(options, dict):
        return False, True
    return options.get("include_usage") is True, options.get("include_obfuscation") is not False


async def _chat(ctx: _Ctx) -> web.StreamResponse:
    body, c = ctx.body, ctx.controls
    if not isinstance(body.get("messages"), list):
        return _error(OPENAI, 400, ctx.request_id, "Missing required parameter: 'messages'.")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    words, truncated = _apply_limit(c.words, limit)
    finish = "length" if truncated else "stop"
    usage = _chat_usage(count_input_tokens(body.get("messages")), len(words), c)
    if c.worst:
        usage = _chat_usage(worst_prompt_tokens(body), _worst_output(body, len(words)), c)
    chat_id = ctx.state.new_id("chatcmpl-")
    created = int(time.time())

    if body.get("stream") is not True:
        return _json(
            {
                "id": chat_id,
                "object": "chat.completion",
                "created": created,
                "model": ctx.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": " ".join(words),
                            "refusal": None,
                            "annotations": [],
                        },
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": _FINGERPRINT,
            },
            "x-request-id",
            ctx.request_id,
        )

    include_usage, obfuscate = _stream_options(body)
    events: list[bytes] = []

    def chunk(choices: list[JSONObj], chunk_usage: JSONObj | None = None) -> None:
        obj: JSONObj = {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ctx.model,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
            "choices": choices,
        }
        # With include_usage every chunk carries "usage": null and only the extra final
        # chunk (empty choices) carries the numbers; without it the key is absent.
        if include_usage:
            obj["usage"] = chunk_usage
        if obfuscate:
            obj["obfuscation"] = _OBFUSCATION[len(events) % len(_OBFUSCATION)]
        events.append(_data_event(obj))

    # A stream with "n" > 1 carries every choice (the same reply) in each chunk, as a chunk
    # of a real n > 1 stream may; the usage stays that of one reply.
    n = body.get("n")
    indexes = range(n if isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 8 else 1)

    def choice(delta: JSONObj, finish_reason: str | None = None) -> list[JSONObj]:
        return [{"index": i, "delta": dict(delta), "logprobs": None,
                 "finish_reason": finish_reason} for i in indexes]

    chunk(choice({"role": "assistant", "content": "", "refusal": None}))
    for piece in _pieces(words):
        chunk(choice({"content": piece}))
    chunk(choice({}, finish))
    if include_usage:
        chunk([], usage)
    events.append(_SSE_DONE)
    return await _stream(ctx, OPENAI, events)


# --------------------------------------------------------------------------------------------
# OpenAI: legacy Completions
# --------------------------------------------------------------------------------------------


async def _completions(ctx: _Ctx) -> web.StreamResponse:
    body, c = ctx.body, ctx.controls
    if "prompt" not in body:
        return _error(OPENAI, 400, ctx.request_id, "Missing required parameter: 'prompt'.")
    words, truncated = _apply_limit(c.words, body.get("max_tokens"))
    finish = "length" if truncated else "stop"
    prompt = count_input_tokens(body.get("prompt"))
    completion = len(words)
    if c.worst:
        prompt, completion = worst_prompt_tokens(body), _worst_output(body, len(words))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cmpl_id = ctx.state.new_id("cmpl-")
    created = int(time.time())

    def obj(choices: list[JSONObj]) -> JSONObj:
        return {
            "id": cmpl_id,
            "object": "text_completion",
            "created": created,
            "model": ctx.model,
            "choices": choices,
            "system_fingerprint": None,
        }

    def choice(text: str, finish_reason: str | None) -> JSONObj:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    if body.get("stream") is not True:
        full = obj([choice(" ".join(words), finish)])
        full["usage"] = usage
        return _json(full, "x-request-id", ctx.request_id)

    include_usage, _ = _stream_options(body)
    events: list[bytes] = []
    for i, piece in enumerate(_pieces(words)):
        last = i == len(words) - 1
        chunk = obj([choice(piece, finish if last else None)])
        if include_usage:
            chunk["usage"] = None
        events.append(_data_event(chunk))
    if not words:
        events.append(_data_event(obj([choice("", finish)])))
    if include_usage:
        final = obj([])
        final["usage"] = usage
        events.append(_data_event(final))
    events.append(_SSE_DONE)
    return await _stream(ctx, OPENAI, events)


# --------------------------------------------------------------------------------------------
# OpenAI: Embeddings
# --------------------------------------------------------------------------------------------


def _embedding_vector(seed_text: Any, index: int) -> list[float]:
    # crc32 (not hash()) so vectors are identical across processes; unit length like the API.
    seed = zlib.crc32(orjson.dumps(seed_text)) ^ (index * 0x9E3779B1)
    raw = [((seed >> (4 * k)) & 0xF) - 7.5 for k in range(EMBEDDING_DIMS)]
    norm = math.sqrt(sum(x * x for x in raw))
    return [round(x / norm, 8) for x in raw]


# /v1/moderations: an input containing a marker word (case-insensitive) is flagged in the
# marker's category. Markers: `MOCK_MODERATION_MARKERS` ("word:category,..."), else these.
MODERATION_MARKERS = {"kaboom": "violence", "meanie": "harassment"}
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)


def _moderation_markers() -> dict[str, str]:
    raw = os.environ.get("MOCK_MODERATION_MARKERS", "")
    pairs = [item.split(":", 1) for item in raw.split(",") if ":" in item]
    return {word.strip().lower(): cat.strip() for word, cat in pairs} or MODERATION_MARKERS


async def _moderations(ctx: _Ctx) -> web.StreamResponse:
    """OpenAI's moderation answer: one result per input item, all categories present."""
    value = ctx.body.get("input")
    if value is None:
        return _error(OPENAI, 400, ctx.request_id, "Missing required parameter: 'input'.")
    items = value if isinstance(value, list) else [value]
    if "mock-moderation-500" in orjson.dumps(items).decode():  # a failing endpoint, on demand
        return _error(OPENAI, 500, ctx.request_id, "The server had an error.")
    markers = _moderation_markers()
    results = []
    for item in items:
        text = item if isinstance(item, str) else str(
            item.get("text", "")) if isinstance(item, dict) else ""
        hit = {cat for word, cat in markers.items() if word in text.lower()}
        results.append({
            "flagged": bool(hit),
            "categories": {c: c in hit for c in MODERATION_CATEGORIES},
            "category_scores": {c: 0.97 if c in hit else 0.0001 for c in MODERATION_CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
        })
    return _json({"id": "modr-" + ctx.request_id, "model": ctx.model, "results": results},
                 "x-request-id", ctx.request_id)


async def _embeddings(ctx: _Ctx) -> web.StreamResponse:
    body = ctx.body
    value = body.get("input")
    if value is None:
        return _error(OPENAI, 400, ctx.request_id, "Missing required parameter: 'input'.")
    # input is a string, a list of strings, one token array, or a list of token arrays.
    items: list[Any]
    if isinstance(value, list) and value and not all(isinstance(x, int) for x in value):
        items = value
    else:
        items = [value]
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = _embedding_vector(item, index)
        embedding: list[float] | str = vector
        if as_base64:
            # The openai SDK asks for base64 by default: little-endian float32, base64-encoded.
            packed = struct.pack(f"<{EMBEDDING_DIMS}f", *vector)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt = count_input_tokens(value)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": ctx.model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        },
        "x-request-id",
        ctx.request_id,
    )


# --------------------------------------------------------------------------------------------
# OpenAI: Responses API
# --------------------------------------------------------------------------------------------


async def _responses(ctx: _Ctx) -> web.StreamResponse:
    body, c = ctx.body, ctx.controls
    words, truncated = _apply_limit(c.words, body.get("max_output_tokens"))
    text = " ".join(words)
    prompt = max(count_input_tokens(body.get("instructions"), body.get("input")), c.cached)
    output_tokens = len(words) + c.reasoning
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": c.cached, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": c.reasoning},
        "total_tokens": prompt + output_tokens,
    }
    resp_id = ctx.state.new_id("resp_")
    msg_id = ctx.state.new_id("msg_")
    created = int(time.time())
    final_status = "incomplete" if truncated else "completed"
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None

    def response(status: str, output: list[JSONObj], with_usage: bool) -> JSONObj:
        done = status != "in_progress"
        return {
            "id": resp_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "billing": {"payer": "developer"},
            "completed_at": created if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if truncated and done else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "model": ctx.model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "prompt_cache_retention": None,
            "reasoning": {"effort": effort, "summary": None},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage if with_usage else None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    # A reasoning item precedes the message when the model "thought", as with o-/gpt-5 models.
    reasoning_item: JSONObj | None = None
    if c.reasoning:
        reasoning_item = {"id": ctx.state.new_id("rs_"), "type": "reasoning", "summary": []}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    message = {
        "id": msg_id,
        "type": "message",
        "status": final_status,
        "content": [part],
        "role": "assistant",
    }
    output = [message] if reasoning_item is None else [reasoning_item, message]

    if body.get("stream") is not True:
        return _json(response(final_status, output, True), "x-request-id", ctx.request_id)

    events: list[bytes] = []

    def event(kind: str, fields: JSONObj) -> None:
        obj: JSONObj = {"type": kind, "sequence_number": len(events), **fields}
        events.append(_named_event(kind, obj))

    _, obfuscate = _stream_options(body)
    msg_index = len(output) - 1
    where = {"item_id": msg_id, "output_index": msg_index, "content_index": 0}
    event("response.created", {"response": response("in_progress", [], False)})
    event("response.in_progress", {"response": response("in_progress", [], False)})
    if reasoning_item is not None:
        event("response.output_item.added", {"output_index": 0, "item": reasoning_item})
        event("response.output_item.done", {"output_index": 0, "item": reasoning_item})
    event(
        "response.output_item.added",
        {"output_index": msg_index, "item": {**message, "status": "in_progress", "content": []}},
    )
    event("response.content_part.added", {**where, "part": {**part, "text": ""}})
    for i, piece in enumerate(_pieces(words)):
        delta: JSONObj = {**where, "delta": piece, "logprobs": []}
        if obfuscate:
            delta["obfuscation"] = _OBFUSCATION[i % len(_OBFUSCATION)]
        event("response.output_text.delta", delta)
    event("response.output_text.done", {**where, "text": text, "logprobs": []})
    event("response.content_part.done", {**where, "part": part})
    event("response.output_item.done", {"output_index": msg_index, "item": message})
    event(f"response.{final_status}", {"response": response(final_status, output, True)})
    return await _stream(ctx, OPENAI, events)


# --------------------------------------------------------------------------------------------
# Anthropic: Messages
# --------------------------------------------------------------------------------------------


async def _count_messages(ctx: _Ctx) -> web.StreamResponse:
    """Anthropic's `messages/count_tokens`: the prompt's input tokens, nothing generated."""
    body = ctx.body
    if not isinstance(body.get("messages"), list):
        return _error(ANTHROPIC, 400, ctx.request_id, "messages: Field required")
    tokens = count_input_tokens(body.get("system"), body.get("messages"))
    return _json({"input_tokens": tokens}, "request-id", ctx.request_id)


async def _messages(ctx: _Ctx) -> web.StreamResponse:
    body, c = ctx.body, ctx.controls
    # The real API rejects both omissions; so does the mock, to catch a body mangled in transit.
    if not isinstance(body.get("messages"), list):
        return _error(ANTHROPIC, 400, ctx.request_id, "messages: Field required")
    if "max_tokens" not in body:
        return _error(ANTHROPIC, 400, ctx.request_id, "max_tokens: Field required")
    words, truncated = _apply_limit(c.words, body.get("max_tokens"))
    stop_reason = "max_tokens" if truncated else "end_turn"
    usage = {
        # Anthropic reports cache reads and writes apart from input_tokens: at its worst, the
        # three add up to the worst prompt count.
        "input_tokens": max(0, worst_prompt_tokens(body) - c.cached - c.cache_write) if c.worst
        else count_input_tokens(body.get("system"), body.get("messages")),
        "cache_creation_input_tokens": c.cache_write,
        "cache_read_input_tokens": c.cached,
        "cache_creation": {
            "ephemeral_5m_input_tokens": c.cache_write,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": _worst_output(body, len(words)) if c.worst else len(words),
        "service_tier": "standard",
    }
    message: JSONObj = {
        "id": ctx.state.new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": ctx.model,
        "content": [{"type": "text", "text": " ".join(words)}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }
    if body.get("stream") is not True:
        return _json(message, "request-id", ctx.request_id)

    # message_start carries the input side (and a provisional output count of 1, as the real
    # API does); message_delta carries the final cumulative output_tokens.
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events = [
        _named_event("message_start", {"type": "message_start", "message": start}),
        _named_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ]
    for piece in _pieces(words):
        events.append(
            _named_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        )
    events.append(_named_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(
        _named_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
        )
    )
    events.append(_named_event("message_stop", {"type": "message_stop"}))
    return await _stream(ctx, ANTHROPIC, events)


# --------------------------------------------------------------------------------------------
# Google Gemini: generateContent, streamGenerateContent (SSE with alt=sse), countTokens
# --------------------------------------------------------------------------------------------


def _gemini_usage(body: JSONObj, visible: int, c: _Controls) -> JSONObj:
    """`usageMetadata` as the Gemini API reports it: the prompt count includes cached
    content; thinking tokens are reported apart from the candidates' tokens."""
    if c.worst:
        config = body.get("generationConfig") or {}
        cap = config.get("maxOutputTokens")
        choices = config.get("candidateCount") or 1
        prompt = worst_prompt_tokens({"messages": body.get("contents"),
                                      "system": body.get("systemInstruction"),
                                      "tools": body.get("tools")})
        candidates = (cap if isinstance(cap, int) else visible) * int(choices) - c.reasoning
    else:
        prompt = count_input_tokens(body.get("systemInstruction"), body.get("contents"))
        candidates = visible
    prompt = max(prompt, c.cached)
    usage: JSONObj = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": max(candidates, 0),
        "totalTokenCount": prompt + max(candidates, 0) + c.reasoning,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if c.cached:
        usage["cachedContentTokenCount"] = c.cached
    if c.reasoning:
        usage["thoughtsTokenCount"] = c.reasoning
    return usage


def _gemini_response(ctx: _Ctx, text: str, finish: str | None, usage: JSONObj) -> JSONObj:
    candidate: JSONObj = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": ctx.model,
            "responseId": ctx.request_id}


def _gemini_embedding(text_chars: int) -> JSONObj:
    return {"values": [round(0.001 * ((text_chars + i) % 997), 3) for i in range(8)]}


async def _gemini(ctx: _Ctx, method: str) -> web.StreamResponse:
    body, c = ctx.body, ctx.controls
    # Embeddings: the vectors only, no token counts (as the Gemini API answers them).
    if method == "embedContent":
        if not isinstance(body.get("content"), dict):
            return _error(GEMINI, 400, ctx.request_id, "* EmbedContentRequest.content: "
                          "content is not specified")
        return _json({"embedding": _gemini_embedding(len(orjson.dumps(body["content"])))},
                     "x-request-id", ctx.request_id)
    if method == "batchEmbedContents":
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return _error(GEMINI, 400, ctx.request_id, "* BatchEmbedContentsRequest.requests: "
                          "requests is not specified")
        return _json({"embeddings": [_gemini_embedding(len(orjson.dumps(r))) for r in requests]},
                     "x-request-id", ctx.request_id)
    if not isinstance(body.get("contents"), list) and method != "countTokens":
        return _error(GEMINI, 400, ctx.request_id, "* GenerateContentRequest.contents: "
                      "contents is not specified")
    if method == "countTokens":
        total = count_input_tokens(body.get("contents") or body.get("generateContentRequest"))
        return _json({"totalTokens": total,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]},
                     "x-request-id", ctx.request_id)
    config = body.get("generationConfig") or {}
    words, truncated = _apply_limit(c.words, config.get("maxOutputTokens"))
    finish = "MAX_TOKENS" if truncated else "STOP"
    usage = _gemini_usage(body, len(words), c)
    if method == "generateContent":
        return _json(_gemini_response(ctx, " ".join(words), finish, usage), "x-request-id",
                     ctx.request_id)
    if ctx.request.query.get("alt") != "sse":
        return _error(GEMINI, 400, ctx.request_id, "The mock streams only with alt=sse.")
    # Every chunk carries usageMetadata with the counts so far (the prompt from the first);
    # the last one has the totals and the finish reason.
    events = []
    pieces = _pieces(words) or [""]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        so_far = usage if last else {"promptTokenCount": usage["promptTokenCount"],
                                     "totalTokenCount": usage["promptTokenCount"]}
        events.append(_data_event(_gemini_response(ctx, piece, finish if last else None,
                                                   so_far)))
    return await _stream(ctx, GEMINI, events)


def _gemini_endpoint() -> Handler:
    """Gemini names the model and method in the path (`models/<model>:<method>`)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        body = _parse_body(await request.read())
        state.record(request, body)
        request_id = state.new_id("req_")
        model, _, method = request.match_info["call"].partition(":")
        if method not in ("generateContent", "streamGenerateContent", "countTokens",
                          "embedContent", "batchEmbedContents"):
            return _error(GEMINI, 404, request_id, f"Method not found: {method}")
        controls = await _controlled(GEMINI, request, state, body, request_id)
        if isinstance(controls, web.StreamResponse):
            return controls
        return await _gemini(_Ctx(request, state, body, controls, model, request_id), method)

    return handler


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


async def _controlled(dialect: str, request: web.Request, state: _State, body: Any,
                      request_id: str) -> _Controls | web.StreamResponse:
    """The steps every endpoint takes after recording the request, in the order that matters:
    the test's controls (delay, then a forced status), then a per-credential fault, then a body
    that is not a JSON object. The controls, or the answer that ends the call here."""
    try:
        controls = _parse_controls(request.headers)
    except _ControlError as exc:
        return _error(dialect, 400, request_id, str(exc))
    if controls.delay_s:
        await asyncio.sleep(controls.delay_s)
    if controls.status:
        return _error(dialect, controls.status, request_id, None, controls.retry_after)
    fault = state.fault_for(request.headers)
    if fault is not None:
        return _error(dialect, fault[0], request_id, None, fault[1])
    if not isinstance(body, dict):
        return _error(dialect, 400, request_id, "The request body is not a JSON object.")
    return controls


def _endpoint(dialect: str, build: Builder, *, azure: bool = False) -> Handler:
    """Wrap a builder with the steps every API endpoint shares, in the order that matters:
    record first (so even failed or delayed requests are visible), then delay, then fault."""

    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        body = _parse_body(await request.read())
        state.record(request, body)
        request_id = state.new_id("req_")
        controls = await _controlled(dialect, request, state, body, request_id)
        if isinstance(controls, web.StreamResponse):
            return controls
        model = body.get("model")
        if not isinstance(model, str) or not model:
            if not azure:
                return _error(dialect, 400, request_id, "You must provide a model parameter.")
            # Azure routes by deployment; the body's model is optional there.
            model = request.match_info["deployment"]
        return await build(_Ctx(request, state, body, controls, model, request_id))

    return handler


async def _list_requests(request: web.Request) -> web.StreamResponse:
    requests = list(request.app[STATE_KEY].requests)
    return web.Response(body=orjson.dumps(requests), headers={"Content-Type": _JSON_CT})


async def _clear_requests(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    cleared = len(state.requests)
    state.requests.clear()
    return web.Response(body=orjson.dumps({"cleared": cleared}), headers={"Content-Type": _JSON_CT})


async def _set_fault(request: web.Request) -> web.StreamResponse:
    spec = orjson.loads(await request.read())
    count = int(spec.get("count") or 0)
    request.app[STATE_KEY].faults[str(spec["credential"])] = [
        int(spec.get("status", 429)), count if count > 0 else -1, spec.get("retry_after")]
    return web.Response(body=b'{"ok":true}', headers={"Content-Type": _JSON_CT})


async def _clear_faults(request: web.Request) -> web.StreamResponse:
    request.app[STATE_KEY].faults.clear()
    return web.Response(body=b'{"ok":true}', headers={"Content-Type": _JSON_CT})


async def _health(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b'{"status":"ok"}', headers={"Content-Type": _JSON_CT})


async def _unmatched(request: web.Request) -> web.StreamResponse:
    # Recorded too: a request Envoy routed to the wrong path is exactly what a test wants to see.
    state = request.app[STATE_KEY]
    state.record(request, _parse_body(await request.read()))
    dialect = ANTHROPIC if "anthropic-version" in request.headers else OPENAI
    message = f"Invalid URL ({request.method} {request.path})"
    return _error(dialect, 404, state.new_id("req_"), message)


def create_app() -> web.Application:
    """The mock upstream application, with a fresh request ring buffer."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = _State()
    routes: list[tuple[str, Builder]] = [
        ("/chat/completions", _chat),
        ("/completions", _completions),
        ("/embeddings", _embeddings),
    ]
    for suffix, build in routes:
        app.router.add_post("/v1" + suffix, _endpoint(OPENAI, build))
        app.router.add_post(
            "/openai/deployments/{deployment}" + suffix, _endpoint(OPENAI, build, azure=True)
        )
    app.router.add_post("/v1/responses", _endpoint(OPENAI, _responses))
    app.router.add_post("/v1/moderations", _endpoint(OPENAI, _moderations))
    app.router.add_post("/v1/messages", _endpoint(ANTHROPIC, _messages))
    app.router.add_post("/v1/messages/count_tokens", _endpoint(ANTHROPIC, _count_messages))
    for version in ("v1", "v1beta"):
        app.router.add_post(f"/{version}/models/{{call}}", _gemini_endpoint())
    app.router.add_get("/__mock/requests", _list_requests)
    app.router.add_delete("/__mock/requests", _clear_requests)
    app.router.add_get("/__mock/health", _health)
    app.router.add_post("/__mock/faults", _set_fault)
    app.router.add_delete("/__mock/faults", _clear_faults)
    # Last, so it only sees what nothing above matched (including wrong methods).
    app.router.add_route("*", "/{tail:.*}", _unmatched)
    return app


async def start_mock_upstream(host: str, port: int) -> web.AppRunner:
    """Start serving on host:port (port 0 picks a free one; see ``runner.addresses``).

    The caller owns the runner and must ``await runner.cleanup()``.
    """
    # No access log: the mock is the fake provider in a throughput benchmark. A short shutdown
    # timeout: a mock has nothing worth draining, and a slow stream (x-mock-chunk-delay-ms)
    # still in flight must not hold up a test's teardown for aiohttp's default 60 s.
    runner = web.AppRunner(create_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    return runner


async def _serve(host: str, port: int) -> None:
    runner = await start_mock_upstream(host, port)
    try:
        bound_port = runner.addresses[0][1]
        print(f"mock upstream listening on http://{host}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.mock_upstream",
        description="Fake OpenAI/Anthropic upstream for Tollgate tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port to bind, 0 = any (8089)")
    args = parser.parse_args(argv)
    # uvloop.run installs uvloop's event loop for this run (the non-deprecated spelling of
    # uvloop.install() + asyncio.run()).
    uvloop.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
