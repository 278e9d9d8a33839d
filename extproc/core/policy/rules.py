"""Request rules: one table entry per rule, checked before anything is reserved.

Each entry is (name, check): `check(facts, setting)` returns why the request breaks the rule,
or None. A rule whose setting is unset (None, False, empty) does not apply. Adding a rule is one
entry here plus its field in `resources._request_rules` (and the CRD).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from extproc.core.values import value_type


@value_type
class RuleFacts:
    """What request rules look at (taken from `RequestFacts` and the effective user)."""

    model: str
    max_output_tokens: int | None
    prompt_chars: int
    user: str


def _max_tokens(facts: RuleFacts, limit: int) -> str | None:
    if facts.max_output_tokens is None:
        return f"the request must set an output cap (max_tokens) of at most {limit}"
    if facts.max_output_tokens > limit:
        return f"max_tokens {facts.max_output_tokens} is above the allowed {limit}"
    return None


def _max_prompt_chars(facts: RuleFacts, limit: int) -> str | None:
    if facts.prompt_chars > limit:
        return f"the prompt has {facts.prompt_chars} characters, more than the allowed {limit}"
    return None


def _require_user(facts: RuleFacts, required: bool) -> str | None:
    if required and not facts.user:
        return ("the request must name its end user (body 'user', or Anthropic "
                "'metadata.user_id')")
    return None


def _disabled_models(facts: RuleFacts, patterns: list[str]) -> str | None:
    if any(fnmatch.fnmatchcase(facts.model, p) for p in patterns):
        return f"model '{facts.model}' is disabled"
    return None


REQUEST_RULES: tuple[tuple[str, Callable[[RuleFacts, Any], str | None]], ...] = (
    ("disabledModels", _disabled_models),
    ("requireUser", _require_user),
    ("maxTokens", _max_tokens),
    ("maxPromptChars", _max_prompt_chars),
)


def broken_rule(settings: dict[str, Any], facts: RuleFacts) -> tuple[str, str] | None:
    """The first rule the request breaks, as (rule name, reason), or None."""
    for name, check in REQUEST_RULES:
        setting = settings.get(name)
        if setting is None or setting is False or setting == []:
            continue
        reason = check(facts, setting)
        if reason is not None:
            return name, reason
    return None
