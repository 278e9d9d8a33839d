"""Policy `moderation`, the pure part: what is sent, what a flag means, and validation."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.core.policy import moderation
from extproc.core.policy.engine import compile_policy
from extproc.core.quota import Selector
from extproc.core.resources import ResourceError, validate_document

pytestmark = pytest.mark.unit


def spec(**config: Any) -> dict[str, Any]:
    doc = {"apiVersion": "tollgate.io/v1alpha1", "kind": "Policy", "metadata": {"name": "p"},
           "spec": {"moderation": config}}
    return validate_document(doc).spec


def calls(*configs: dict[str, Any], body: dict[str, Any] | None = None) -> Any:
    policies = [compile_policy(f"p{i}", Selector(), spec(**c)) for i, c in enumerate(configs)]
    body = body or {"model": "m", "messages": [
        {"role": "system", "content": "be kind"}, {"role": "user", "content": "hi there"}]}
    return moderation.plan_calls(policies, "chat.completions", orjson.dumps(body))


def answer(*categories: set[str]) -> dict[str, Any]:
    return {"results": [{"flagged": bool(c), "categories": {
        name: name in c for name in ("violence", "harassment", "hate")}} for c in categories]}


def test_defaults_and_sent_body() -> None:
    assert spec()["moderation"] == {"action": "block", "categories": [],
                                     "model": "omni-moderation-latest", "upstream": "",
                                     "timeoutMs": 500, "onError": "open"}
    (call,) = calls({})
    assert orjson.loads(call.body) == {"model": "omni-moderation-latest",
                                       "input": ["be kind", "hi there"]}
    assert call.tokens == 4 and call.timeout_s == 0.5 and not call.fail_closed


def test_one_call_per_model_and_strictest_settings() -> None:
    same = calls({"timeoutMs": 500}, {"onError": "closed", "timeoutMs": 700})
    assert len(same) == 1 and same[0].fail_closed and same[0].timeout_s == 0.7
    assert len(calls({}, {"model": "other"})) == 2


def test_no_text_no_call() -> None:
    assert calls({}, body={"model": "m", "messages": [{"role": "user", "content": "  "}]}) == ()


@pytest.mark.parametrize(("config", "flags", "expected"), [
    ({}, [set()], None),
    ({}, [{"violence"}], ("block", 1)),
    ({"action": "audit"}, [set(), {"violence", "hate"}], ("audit", 2)),
    ({"categories": ["harassment"]}, [{"violence"}], None),
    ({"categories": ["harassment"]}, [{"harassment"}], ("block", 1)),
])
def test_judge(config: dict[str, Any], flags: list[set[str]],
               expected: tuple[str, int] | None) -> None:
    (call,) = calls(config)
    judged = moderation.judge(call, answer(*flags))
    assert judged is not None
    hits, refusal = judged
    if expected is None:
        assert hits == () and refusal is None
        return
    assert (hits[0].action, hits[0].count) == expected
    assert (refusal is not None) == (expected[0] == "block")
    if refusal is not None:
        assert refusal.rule == "moderation"
        assert any(name in refusal.reason for name in ("violence", "harassment"))


def test_not_an_answer_and_failures() -> None:
    (call,) = calls({})
    assert moderation.judge(call, {"error": "x"}) is None
    hits, refusal = moderation.failed(call)
    assert refusal is None and hits[0].action == "error"
    (closed,) = calls({"onError": "closed"})
    hits, refusal = moderation.failed(closed)
    assert refusal is not None and hits[0].action == "block"


@pytest.mark.parametrize("config", [
    {"action": "redact"}, {"onError": "maybe"}, {"timeoutMs": 10}, {"timeoutMs": 801},
    {"categories": [""]}, {"model": " "}, {"extra": 1},
])
def test_invalid(config: dict[str, Any]) -> None:
    with pytest.raises(ResourceError):
        spec(**config)
