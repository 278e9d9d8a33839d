"""Moderation: a Policy may send the request's text to the provider's moderation endpoint
(OpenAI `POST /v1/moderations`) before the call, and block or audit on a flag.

This module is the pure part: which calls a request needs (one per distinct moderation
model and upstream among the policies that ask), the body of each call, and what an answer
means for each policy. The HTTP call itself is made by the server (server/moderation.py),
because ext_proc cannot send a second request through Envoy's stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from extproc.core.policy.engine import REQUEST, CompiledPolicy, Hit, Refusal
from extproc.core.policy.texts import request_slots
from extproc.core.values import value_type

RULE = "moderation"
# The endpoint reports no usage: tokens are estimated from characters (about 4 a token, the
# usual figure for English), only to price the call when a PriceTable prices its model.
CHARS_PER_TOKEN = 4


@value_type
class ModerationCall:
    model: str
    upstream: str  # the Upstream whose credential is sent ("" = the request's)
    timeout_s: float
    fail_closed: bool  # an unreachable or failing endpoint refuses the request
    policies: tuple[CompiledPolicy, ...]  # those that asked for this model and upstream
    body: bytes  # {"model": ..., "input": [texts]}
    chars: int

    @property
    def tokens(self) -> int:
        return -(-self.chars // CHARS_PER_TOKEN)


def plan_calls(policies: Sequence[CompiledPolicy], endpoint: str,
               body: bytes) -> tuple[ModerationCall, ...]:
    """The moderation calls this request needs (none when no policy asks or it has no text).
    `body` is the request as it goes upstream (after redaction)."""
    asking = [p for p in policies if p.moderation is not None]
    if not asking:
        return ()
    doc = orjson.loads(body)
    texts = [slot.text for slot in request_slots(endpoint, doc) if slot.text.strip()]
    if not texts:
        return ()
    groups: dict[tuple[str, str], list[CompiledPolicy]] = {}
    for policy in asking:
        config = policy.moderation
        assert config is not None
        groups.setdefault((config["model"], config.get("upstream", "")), []).append(policy)
    calls = []
    for (model, upstream), members in groups.items():
        configs = [p.moderation for p in members if p.moderation is not None]
        calls.append(ModerationCall(
            model=model, upstream=upstream,
            timeout_s=max(c["timeoutMs"] for c in configs) / 1000,
            fail_closed=any(c["onError"] == "closed" for c in configs),
            policies=tuple(members),
            body=orjson.dumps({"model": model, "input": texts}),
            chars=sum(len(t) for t in texts)))
    return tuple(calls)


def flagged_categories(answer: Any, wanted: Sequence[str]) -> list[str] | None:
    """The categories that count as a flag in an OpenAI moderation answer: any flagged result
    (all its true categories), or with `wanted` only those categories. None when the answer is
    not a moderation answer."""
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
        return None
    found: list[str] = []
    for result in answer["results"]:
        if not isinstance(result, dict):
            return None
        categories = result.get("categories") or {}
        if not isinstance(categories, dict):
            return None
        true = [name for name, value in categories.items() if value is True]
        if wanted:
            found += [name for name in wanted if categories.get(name) is True]
        elif result.get("flagged") is True:
            found += true or ["flagged"]
    return list(dict.fromkeys(found))


def judge(call: ModerationCall, answer: Any) -> tuple[tuple[Hit, ...], Refusal | None] | None:
    """What the answer means for each policy of the call: hits (audits and blocks), the first
    block as a refusal. None when the answer is not a moderation answer."""
    hits: list[Hit] = []
    for policy in call.policies:
        config = policy.moderation
        assert config is not None
        found = flagged_categories(answer, config.get("categories") or ())
        if found is None:
            return None
        if not found:
            continue
        hits.append(Hit(policy.id, RULE, config["action"], REQUEST, len(found)))
        if config["action"] == "block":
            return tuple(hits), Refusal(
                policy.id, RULE,
                f"the request was flagged by moderation ({', '.join(found)})")
    return tuple(hits), None


def failed(call: ModerationCall) -> tuple[tuple[Hit, ...], Refusal | None]:
    """The endpoint did not answer usefully: refuse when a policy fails closed, else pass and
    record an `error` hit per policy."""
    if call.fail_closed:
        policy = next(p for p in call.policies
                      if p.moderation is not None and p.moderation["onError"] == "closed")
        return ((Hit(policy.id, RULE, "block", REQUEST, 1),),
                Refusal(policy.id, RULE, "the moderation endpoint did not answer"))
    return tuple(Hit(p.id, RULE, "error", REQUEST, 1) for p in call.policies), None
