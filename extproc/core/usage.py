"""Token usage as providers report it, normalised to one shape.

`Usage.input` is every prompt token, cached or not; `Usage.output` every completion token,
reasoning included. The detail counts (`cached_input`, `cache_write`, `reasoning`) are subsets
of those totals. Providers disagree on this (Anthropic's `input_tokens` excludes cache reads and
writes; OpenAI's `prompt_tokens` includes cached ones), so the conversion lives here, once.
Readers are tolerant: a missing or mistyped count is 0, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc.core.request import Endpoint


@dataclass(frozen=True, slots=True)
class Usage:
    input: int = 0
    output: int = 0
    cached_input: int = 0
    cache_write: int = 0
    reasoning: int = 0
    cache_write_1h: int = 0  # the part of cache_write kept for an hour (Anthropic bills 2x)

    @property
    def total(self) -> int:
        return self.input + self.output


def _count(obj: Any, *path: str) -> int:
    for name in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(name)
    if isinstance(obj, bool) or not isinstance(obj, int) or obj < 0:
        return 0
    return obj


def usage_from_openai(usage: Any) -> Usage:
    """Chat/completions/embeddings (`prompt_tokens`) or Responses (`input_tokens`) usage."""
    if not isinstance(usage, dict):
        return Usage()
    if "prompt_tokens" in usage:
        return Usage(
            input=_count(usage, "prompt_tokens"),
            output=_count(usage, "completion_tokens"),
            cached_input=_count(usage, "prompt_tokens_details", "cached_tokens"),
            reasoning=_count(usage, "completion_tokens_details", "reasoning_tokens"),
        )
    return Usage(
        input=_count(usage, "input_tokens"),
        output=_count(usage, "output_tokens"),
        cached_input=_count(usage, "input_tokens_details", "cached_tokens"),
        reasoning=_count(usage, "output_tokens_details", "reasoning_tokens"),
    )


def usage_from_anthropic(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    cached = _count(usage, "cache_read_input_tokens")
    written = _count(usage, "cache_creation_input_tokens")
    return Usage(
        input=_count(usage, "input_tokens") + cached + written,
        output=_count(usage, "output_tokens"),
        cached_input=cached,
        cache_write=written,
        cache_write_1h=min(written, _count(usage, "cache_creation", "ephemeral_1h_input_tokens")),
    )


def parse_response_usage(endpoint: Endpoint, body: bytes) -> Usage | None:
    """Usage from a JSON response body; None when the body has no usage or is not JSON."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    if endpoint is Endpoint.MESSAGES:
        return usage_from_anthropic(usage)
    return usage_from_openai(usage)
