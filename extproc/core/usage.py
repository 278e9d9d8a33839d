"""Token usage as providers report it, normalised to one shape.

`Usage.input` is every prompt token, cached or not; `Usage.output` every completion token,
reasoning included. The detail counts (`cached_input`, `cache_write`, `reasoning`) are subsets
of those totals. Providers disagree on this (Anthropic's `input_tokens` excludes cache reads and
writes; OpenAI's `prompt_tokens` includes cached ones), so each provider module
(core/providers/) converts its own. Readers are tolerant: a missing or mistyped count is
0, never an exception.
"""

from __future__ import annotations

from typing import Any

from extproc.core.values import value_type


@value_type
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


def count(obj: Any, *path: str) -> int:
    """The non-negative integer at `path` inside `obj`, else 0."""
    for name in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(name)
    if isinstance(obj, bool) or not isinstance(obj, int) or obj < 0:
        return 0
    return obj
