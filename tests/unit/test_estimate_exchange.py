"""The strict bound and its policies as the exchange applies them: images and input the body does
not carry, models without a price, clamping to the remaining budget, one model identity."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from extproc.core.decisions import Continue, Deny
from extproc.core.exchange import Exchange, Options, Reserve
from extproc.core.keys import find_key, hash_key
from extproc.core.quota import interpret_reservation
from extproc.core.resources import Resource, validate_document
from extproc.core.snapshot import Snapshot, build_snapshot

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 14, 13, 45, 30, tzinfo=UTC).timestamp()
STRICT = "tg-" + "s" * 43  # a strict Block limit that clamps (max $1, at least 50 tokens)
PLAIN = "tg-" + "p" * 43  # no limit
CHAT = "/v1/chat/completions"


def _resource(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    return validate_document({"apiVersion": "tollgate.io/v1alpha1", "kind": kind,
                              "metadata": {"name": name}, "spec": spec})


def _upstream(name: str, pattern: str, unpriced: str) -> Resource:
    return _resource("Upstream", name, {
        "provider": "openai", "cluster": "openai", "models": [pattern], "priority": 10,
        "unpriced": unpriced, "credentials": [{"name": "d", "secretRef": "OPENAI_API_KEY"}]})


STORED = [
    _resource("VirtualKey", "strict", {"keySha256": hash_key(STRICT)}),
    _resource("VirtualKey", "plain", {"keySha256": hash_key(PLAIN)}),
    _resource("Limit", "budget", {"type": "Block", "max": 1, "onInsufficient": "clamp",
                                  "minOutputTokens": 50, "selector": {"keys": ["strict"]}}),
    _resource("Limit", "gpt-4o-only", {"type": "Allow", "max": 1,
                                       "selector": {"keys": ["strict"], "models": ["gpt-4o"]}}),
    _upstream("refusing", "refuse-*", "refuse"),
    _upstream("zeroing", "zero-*", "zero"),
    _upstream("standin", "standin-*", "price-as: gpt-4o"),
    _upstream("ghost", "ghost-*", "price-as: no-such-model"),
]


@pytest.fixture(scope="module")
def snapshot(builtin_resources: list[Resource]) -> Snapshot:
    secrets = {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-a"}
    return build_snapshot(1, builtin_resources, STORED, secrets.get)


def send(snapshot: Snapshot, key: str, body: dict[str, Any], path: str = CHAT,
         options: Options | None = None) -> tuple[Exchange, Any]:
    exchange = Exchange("req-1", options or Options())
    headers = {":path": path, ":method": "POST", "authorization": f"Bearer {key}"}
    presented = find_key(headers)
    assert presented is not None
    record = snapshot.keys_by_hash.get(hash_key(presented.value))
    first = exchange.on_request_headers(headers, presented, record, snapshot, False, NOW)
    assert isinstance(first, Continue), first
    return exchange, exchange.on_request_body(orjson.dumps(body), snapshot, NOW)


def chat(model: str = "gpt-4o", content: Any = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# ---- images and input the body does not carry ----------------------------------------------


def test_an_image_costs_its_models_formula_not_its_bytes(snapshot: Snapshot) -> None:
    url = {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}
    body = chat("gpt-4o-mini", [{"type": "text", "text": "what is it?"}, url], max_tokens=10)
    exchange, decision = send(snapshot, STRICT, body)
    assert isinstance(decision, Reserve)
    # gpt-4o-mini's imageTokens (48,169: its formula at the largest size) replace the URL's bytes
    expected = len(orjson.dumps(body)) - len(orjson.dumps(url)) + 48_169 + 64
    assert exchange.prompt_bound == expected
    # a 300 KB base64 image on gpt-4o costs the default per-image bound, not 300k tokens
    data = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 300_000}}
    exchange, decision = send(snapshot, STRICT, chat(content=[data], max_tokens=10))
    assert isinstance(decision, Reserve)
    assert exchange.prompt_bound < 300_000 // 10
    assert exchange.prompt_bound >= 4096  # Options.image_tokens


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "gpt-4o", "input": "more", "previous_response_id": "r1",
                           "max_output_tokens": 10}),
        ("/v1/responses", {"model": "gpt-4o", "prompt": {"id": "pmpt_1"},
                           "max_output_tokens": 10}),
        (CHAT, chat(content=[{"type": "file", "file": {"file_id": "file-1"}}], max_tokens=10)),
        ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": 10, "input": [
            {"role": "user", "content": [{"type": "input_file", "file_url": "https://x"}]}]}),
    ],
)
def test_input_the_body_does_not_carry_is_bounded_by_the_context_window(
    snapshot: Snapshot, path: str, body: dict[str, Any]
) -> None:
    exchange, decision = send(snapshot, STRICT, body, path=path)
    assert isinstance(decision, Reserve)
    assert exchange.prompt_bound == 128_000  # gpt-4o's context window


def test_long_prompts_reserve_at_the_long_context_rates(snapshot: Snapshot) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100,
            "messages": [{"role": "user", "content": "x" * 250_000}]}
    _, decision = send(snapshot, STRICT, body, path="/v1/messages")
    assert isinstance(decision, Reserve)
    prompt = len(orjson.dumps(body)) + 64
    # above 200k tokens: one-hour cache writes at 2 x $6.00, output at $22.50
    # (in nano-dollars: $ per 1M tokens x 1000 per token)
    assert decision.plan.estimate_nanos == prompt * 12_000 + 100 * 22_500


# ---- models without a price ----------------------------------------------------------------


def test_unpriced_model_is_refused_when_a_block_limit_applies(snapshot: Snapshot) -> None:
    _, decision = send(snapshot, STRICT, chat("o9-pro", max_tokens=80_000))
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (400, "model_not_priced")
    assert "'o9-pro' has no price" in decision.message and "PriceTable" in decision.message
    # no Block limit: let through at zero (reported when priced), as before
    _, decision = send(snapshot, PLAIN, chat("o9-pro", max_tokens=10))
    assert isinstance(decision, Continue)


def test_unpriced_policies_of_an_upstream(snapshot: Snapshot) -> None:
    _, refused = send(snapshot, PLAIN, chat("refuse-me", max_tokens=10))
    assert isinstance(refused, Deny) and refused.code == "model_not_priced"
    assert "upstream 'refusing' refuses unpriced models" in refused.message
    # zero is an explicit opt-in, even under a Block limit: nothing is held for it
    exchange, zero = send(snapshot, STRICT, chat("zero-me", max_tokens=10))
    assert isinstance(zero, Reserve) and zero.plan.estimate_nanos == 0
    # price-as: priced (and bounded) as gpt-4o
    exchange, standin = send(snapshot, STRICT, chat("standin-x", max_tokens=10))
    _, gpt_4o = send(snapshot, STRICT, chat("gpt-4o", max_tokens=10))
    assert isinstance(standin, Reserve) and isinstance(gpt_4o, Reserve)
    assert exchange.priced_as == "gpt-4o"
    assert standin.plan.estimate_nanos == gpt_4o.plan.estimate_nanos + 3 * 2_500  # 3 bytes
    # a stand-in without a price is never free
    _, ghost = send(snapshot, PLAIN, chat("ghost-x", max_tokens=10))
    assert isinstance(ghost, Deny) and ghost.code == "model_not_priced"


def test_global_policy_applies_when_the_upstream_says_default(snapshot: Snapshot) -> None:
    _, refused = send(snapshot, PLAIN, chat("o9-pro", max_tokens=10),
                      options=Options(unpriced="refuse"))
    assert isinstance(refused, Deny) and refused.code == "model_not_priced"
    _, zero = send(snapshot, STRICT, chat("o9-pro", max_tokens=10),
                   options=Options(unpriced="zero"))
    assert isinstance(zero, Reserve) and zero.plan.estimate_nanos == 0


# ---- clamping --------------------------------------------------------------------------------


def _refused_with(reserve: Reserve, spent: int) -> Any:
    """The reserve script's refusal by the first limit, with `spent` already spent there."""
    reply = [0, 1, 1, -1]
    for charge in reserve.plan.limits:
        reply += [spent if charge.limit.name == "budget" else 0, 0]
    return interpret_reservation(reserve.plan, reply)


def test_clamp_rewrites_the_cap_to_what_the_budget_affords(snapshot: Snapshot) -> None:
    exchange, reserve = send(snapshot, STRICT, chat(max_tokens=100_000))
    assert isinstance(reserve, Reserve)
    # $1 max, $0.99 spent: $0.01 left = 10,000,000 nano-dollars; gpt-4o output is $10 / 1M
    # tokens = 10,000 n$ per token, input $2.50 = 2,500 n$ per token
    reservation = _refused_with(reserve, 990_000_000)
    assert reservation.blocked_limit == "budget"
    clamped = exchange.clamp(reserve, reservation, NOW)
    assert clamped is not None
    granted = orjson.loads(clamped.body)["max_tokens"]
    prompt_nanos = exchange.prompt_bound * 2_500
    assert granted == (10_000_000 - prompt_nanos) // 10_000
    assert clamped.plan.estimate_nanos <= 10_000_000
    assert clamped.proceed.body == clamped.body  # the body goes upstream rewritten
    assert exchange.clamped is not None and exchange.clamped.result() == {
        "field": "max_tokens", "requested": 100_000, "granted": granted, "limit": "budget"}
    headers = dict(exchange.on_response_headers({":status": "200",
                                                 "content-type": "application/json"}).headers.set)
    assert headers["x-tollgate-clamped"] == f"max_tokens={granted}; limit=budget"


def test_clamp_adds_the_cap_when_the_request_had_none(snapshot: Snapshot) -> None:
    exchange, reserve = send(snapshot, STRICT, chat())
    assert isinstance(reserve, Reserve)
    clamped = exchange.clamp(reserve, _refused_with(reserve, 990_000_000), NOW)
    assert clamped is not None
    assert orjson.loads(clamped.body)["max_completion_tokens"] > 50


def test_no_clamp_below_the_minimum(snapshot: Snapshot) -> None:
    exchange, reserve = send(snapshot, STRICT, chat(max_tokens=100_000))
    assert isinstance(reserve, Reserve)
    # 40 tokens of gpt-4o output = 400,000 nano-dollars: less than 50 tokens' worth is left
    prompt_nanos = exchange.prompt_bound * 2_500
    assert exchange.clamp(reserve, _refused_with(reserve, 1_000_000_000 - prompt_nanos - 400_000),
                          NOW) is None
    assert exchange.clamped is None


# ---- one model identity ----------------------------------------------------------------------


def test_dated_names_are_their_base_model_for_limits(snapshot: Snapshot) -> None:
    exchange, decision = send(snapshot, STRICT, chat("gpt-4o-2024-08-06", max_tokens=10))
    assert isinstance(decision, Reserve)
    assert exchange.model_identity == "gpt-4o"
    assert {c.limit.name for c in decision.plan.limits} == {"budget", "gpt-4o-only"}
    assert decision.body == orjson.dumps(chat("gpt-4o-2024-08-06", max_tokens=10))
    exchange, decision = send(snapshot, STRICT, chat("gpt-4o-mini-2024-07-18", max_tokens=10))
    assert isinstance(decision, Reserve) and exchange.model_identity == "gpt-4o-mini"
    assert {c.limit.name for c in decision.plan.limits} == {"budget"}
