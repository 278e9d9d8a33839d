"""Policies at the two places a body passes: the request on its way up, the JSON response on
its way back. Both parse the body only when a policy applies, and serialise it again only
when a redaction changed it."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from extproc.core.decisions import Deny
from extproc.core.policy.autoreply import ENDPOINTS
from extproc.core.policy.engine import (
    REQUEST,
    RESPONSE,
    AutoReply,
    CompiledPolicy,
    Hit,
    Refusal,
    auto_reply,
    check_rules,
    reflection_policies,
    scan,
)
from extproc.core.policy.rules import RuleFacts
from extproc.core.policy.texts import request_slots, response_slots
from extproc.core.values import value_type


@value_type
class Outcome:
    refusal: Deny | None = None
    body: bytes | None = None  # the rewritten body, when a redaction changed it
    hits: tuple[Hit, ...] = ()
    reply: AutoReply | None = None  # answer with this instead of calling the provider
    reflection: tuple[CompiledPolicy, ...] = ()  # response-side checks made for this request


def refusal_deny(refusal: Refusal, side: str) -> Deny:
    what = "Request refused" if side == REQUEST else "Response withheld"
    return Deny(400, "policy_violation",
                f"{what} by policy '{refusal.policy}' (rule '{refusal.rule}'): {refusal.reason}.",
                extra={"policy": refusal.policy, "rule": refusal.rule})


def on_request(policies: Sequence[CompiledPolicy], endpoint: str, facts: RuleFacts,
               body: bytes) -> Outcome:
    broken = check_rules(policies, facts)
    if broken is not None:
        return Outcome(refusal=refusal_deny(broken, REQUEST),
                       hits=(Hit(broken.policy, broken.rule, "block", REQUEST, 1),))
    replies = endpoint in ENDPOINTS and any(p.reply_matcher for p in policies)
    reflects = any(p.reflection for p in policies)
    if not replies and not reflects and not any(REQUEST in p.sides for p in policies):
        return Outcome()
    doc = orjson.loads(body)  # parsed before (parse_request): valid JSON object
    slots = request_slots(endpoint, doc)
    result = scan(policies, REQUEST, slots)
    if result.blocked is not None:
        hit = Hit(result.blocked.policy, result.blocked.rule, "block", REQUEST, 1)
        return Outcome(refusal=refusal_deny(result.blocked, REQUEST), hits=(*result.hits, hit))
    answer = auto_reply(policies, slots) if replies else None
    if answer is not None:
        return Outcome(hits=(*result.hits, Hit(answer.policy, answer.name, "reply", REQUEST, 1)),
                       reply=answer)
    reflection, unmarked = reflection_policies(policies, slots) if reflects else ((), False)
    return Outcome(body=orjson.dumps(doc) if result.changed or unmarked else None,
                   hits=result.hits, reflection=reflection)


def on_response(policies: Sequence[CompiledPolicy], endpoint: str, body: bytes) -> Outcome:
    if not any(RESPONSE in p.sides for p in policies):
        return Outcome()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Outcome()
    if not isinstance(doc, dict):
        return Outcome()
    result = scan(policies, RESPONSE, response_slots(endpoint, doc))
    if result.blocked is not None:
        hit = Hit(result.blocked.policy, result.blocked.rule, "block", RESPONSE, 1)
        return Outcome(refusal=refusal_deny(result.blocked, RESPONSE), hits=(*result.hits, hit))
    return Outcome(body=orjson.dumps(doc) if result.changed else None, hits=result.hits)
