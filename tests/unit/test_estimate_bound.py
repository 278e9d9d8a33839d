"""The strict bound, as properties (hypothesis): for random request shapes and random usages
within what the provider can bill for them, the cost never exceeds the reservation.

"What the provider can bill" is the worst tokenizer the bound is built against (docs/budgets.md):
one prompt token per UTF-8 byte of text, one per token id, 4 per message and 3 per call (the fake
upstream's `x-mock-bill: worst`, `worst_prompt_tokens`), never more than the context window; and
output up to the request's cap (else the model's maximum) times its choices. The usage splits its
prompt arbitrarily into plain, cached, cache-written and one-hour-cache-written tokens, and its
output into plain and reasoning tokens."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.core.estimate import (
    Bounds,
    affordable_output,
    output_cap,
    prompt_bound,
    strict_estimate,
)
from extproc.core.pricing import LongContext, ModelPrice, price_usage
from extproc.core.request import Route, classify_path, parse_request
from extproc.core.resources import Resource, model_prices
from extproc.core.usage import Usage
from extproc.mock_upstream import worst_prompt_tokens

pytestmark = pytest.mark.unit

BOUNDS = Bounds()
text = st.text(max_size=300)  # any Unicode: multi-byte characters, escapes, surrogates' pairs
small = st.integers(min_value=1, max_value=5000)


def _chat_message() -> st.SearchStrategy[dict[str, Any]]:
    tool_call = st.fixed_dictionaries({
        "id": text, "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": text, "arguments": text}),
    })
    return st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]),
                               "content": text}),
        st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=4)}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                               "tool_calls": st.lists(tool_call, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": text, "content": text}),
    )


_json_schema = st.recursive(
    st.one_of(text, st.integers(-10**6, 10**6), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(text, inner, max_size=4)),
    max_leaves=20,
)
_tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text, "description": text, "parameters": st.dictionaries(text, _json_schema,
                                                                        max_size=4)})})
_cap = st.one_of(st.none(), small)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A random request of a random endpoint: (path, body)."""
    kind = draw(st.sampled_from(["chat", "completions", "embeddings", "messages", "responses"]))
    body: dict[str, Any] = {}
    if kind == "chat":
        body["messages"] = draw(st.lists(_chat_message(), min_size=1, max_size=6))
        if draw(st.booleans()):
            body["tools"] = draw(st.lists(_tool, min_size=1, max_size=3))
        if draw(st.booleans()):
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "r", "schema": draw(st.dictionaries(text, _json_schema, max_size=4))}}
        for name in ("max_tokens", "max_completion_tokens"):
            if (value := draw(_cap)) is not None:
                body[name] = value
        if draw(st.booleans()):
            body["n"] = draw(st.integers(1, 4))
        path = "/v1/chat/completions"
    elif kind == "completions":
        ids = st.lists(st.integers(0, 200_000), min_size=1, max_size=300)
        body["prompt"] = draw(st.one_of(text, st.lists(text, min_size=1, max_size=4), ids,
                                        st.lists(ids, min_size=1, max_size=3)))
        if (value := draw(_cap)) is not None:
            body["max_tokens"] = value
        if draw(st.booleans()):
            body["n"] = draw(st.integers(1, 3))
            body["best_of"] = body["n"] + draw(st.integers(0, 2))
        path = "/v1/completions"
    elif kind == "embeddings":
        ids = st.lists(st.integers(0, 100_000), min_size=1, max_size=200)
        body["input"] = draw(st.one_of(text, st.lists(text, min_size=1, max_size=5), ids,
                                       st.lists(ids, min_size=1, max_size=3)))
        path = "/v1/embeddings"
    elif kind == "messages":
        block = st.fixed_dictionaries({"type": st.just("text"), "text": text})
        body["messages"] = draw(st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "assistant"]),
            "content": st.one_of(text, st.lists(block, min_size=1, max_size=3))}),
            min_size=1, max_size=5))
        body["system"] = draw(st.one_of(text, st.lists(block, max_size=3)))
        if draw(st.booleans()):
            body["tools"] = draw(st.lists(st.fixed_dictionaries({
                "name": text, "description": text,
                "input_schema": st.dictionaries(text, _json_schema, max_size=3)}),
                min_size=1, max_size=3))
        body["max_tokens"] = draw(small)
        path = "/v1/messages"
    else:
        item = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                      "content": st.one_of(text, st.lists(
                                          st.fixed_dictionaries({"type": st.just("input_text"),
                                                                 "text": text}), max_size=3))})
        body["input"] = draw(st.one_of(text, st.lists(item, min_size=1, max_size=4)))
        if draw(st.booleans()):
            body["instructions"] = draw(text)
        if (value := draw(_cap)) is not None:
            body["max_output_tokens"] = value
        path = "/v1/responses"
    body["model"] = "m"
    return path, body


_rate = st.integers(min_value=0, max_value=200_000_000_000)  # up to $200 per 1M tokens (n$)
_optional_rate = st.one_of(st.none(), _rate)


@st.composite
def prices(draw: st.DrawFn) -> ModelPrice:
    long_context = None
    if draw(st.booleans()):
        long_context = LongContext(above=draw(st.integers(1, 5000)), input=draw(_rate),
                                   output=draw(_rate), cached_input=draw(_optional_rate),
                                   cache_write=draw(_optional_rate))
    return ModelPrice(
        input=draw(_rate), output=draw(_rate), cached_input=draw(_optional_rate),
        cache_write=draw(_optional_rate), reasoning=draw(_optional_rate),
        cache_write_1h=draw(_optional_rate), long_context=long_context,
        max_output_tokens=draw(st.one_of(st.none(), small)),
        context_window=draw(st.one_of(st.none(), st.integers(1, 50_000))),
    )


@st.composite
def usages_within(draw: st.DrawFn, max_input: int, max_output: int) -> Usage:
    total_in = draw(st.integers(0, max_input))
    cached = draw(st.integers(0, total_in))
    written = draw(st.integers(0, total_in - cached))
    out = draw(st.integers(0, max_output))
    return Usage(input=total_in, output=out, cached_input=cached, cache_write=written,
                 cache_write_1h=draw(st.integers(0, written)),
                 reasoning=draw(st.integers(0, out)))


def _bound(path: str, body: dict[str, Any], price: ModelPrice) -> tuple[int, int, int]:
    """(prompt bound, output bound, estimate) as the exchange plans them."""
    route = classify_path(path)
    assert isinstance(route, Route)
    facts = parse_request(route, orjson.dumps(body))
    assert not hasattr(facts, "status"), facts
    assert facts.shape is not None  # type: ignore[union-attr]
    shape = facts.shape  # type: ignore[union-attr]
    prompt = prompt_bound(shape, price, BOUNDS)
    out = 0 if path.endswith("embeddings") else (
        output_cap(facts.max_output_tokens, price, BOUNDS) * shape.choices)  # type: ignore[union-attr]
    return prompt, out, strict_estimate(price, prompt, out)


def _billable(path: str, body: dict[str, Any], price: ModelPrice) -> tuple[int, int]:
    """Most prompt and output tokens the provider can bill for this request."""
    prompt = worst_prompt_tokens(body)
    if price.context_window is not None:
        prompt = min(prompt, price.context_window)
    if path.endswith("embeddings"):
        return prompt, 0
    cap = next((body[n] for n in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                if n in body), None)
    model_max = price.max_output_tokens or price.context_window
    if cap is None:
        cap = model_max or BOUNDS.default_max_output_tokens
    elif model_max:
        cap = min(cap, model_max)  # the provider refuses a larger cap
    return prompt, cap * max(body.get("n", 1), body.get("best_of", 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests(), price=prices(), data=st.data())
def test_no_usage_within_the_caps_costs_more_than_the_reservation(
    request: tuple[str, dict[str, Any]], price: ModelPrice, data: st.DataObject
) -> None:
    path, body = request
    prompt, out, estimate = _bound(path, body, price)
    billable_in, billable_out = _billable(path, body, price)
    assert billable_in <= prompt and billable_out <= out
    usage = data.draw(usages_within(billable_in, billable_out))
    assert price_usage(price, usage).total_nanos <= estimate
    # the extremes, every token at each rate
    for extreme in (Usage(input=billable_in, output=billable_out),
                    Usage(input=billable_in, output=billable_out, cache_write=billable_in,
                          reasoning=billable_out),
                    Usage(input=billable_in, output=billable_out, cache_write=billable_in,
                          cache_write_1h=billable_in)):
        assert price_usage(price, extreme).total_nanos <= estimate


@settings(max_examples=200, deadline=None)
@given(request=requests(), price=prices(), budget=st.integers(0, 10**9), data=st.data())
def test_a_clamped_cap_fits_the_budget(
    request: tuple[str, dict[str, Any]], price: ModelPrice, budget: int, data: st.DataObject
) -> None:
    path, body = request
    prompt, _, _ = _bound(path, body, price)
    choices = max(body.get("n", 1), body.get("best_of", 1))
    cap = affordable_output(price, prompt, choices, budget)
    if cap == 0:
        return
    assert strict_estimate(price, prompt, cap * choices) <= budget
    usage = data.draw(usages_within(min(worst_prompt_tokens(body), prompt), cap * choices))
    assert price_usage(price, usage).total_nanos <= budget


def test_shipped_prices_keep_the_bound(builtin_resources: list[Resource]) -> None:
    """Every shipped model, at the extremes of a long chat: the bound holds with real rates."""
    (table,) = [r for r in builtin_resources if r.kind == "PriceTable"]
    body = {"model": "m", "max_tokens": 500, "messages": [
        {"role": "user", "content": "é" * 3000}, {"role": "assistant", "content": "x" * 100}]}
    for name, price in model_prices(table).items():
        _, _, estimate = _bound("/v1/chat/completions", body, price)
        billable_in, billable_out = _billable("/v1/chat/completions", body, price)
        worst = Usage(input=billable_in, output=billable_out, cache_write=billable_in,
                      cache_write_1h=billable_in)
        assert price_usage(price, worst).total_nanos <= estimate, name
