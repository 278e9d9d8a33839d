"""Gemini's native API in the core: paths, the key in the query string, request facts, usage
from JSON and from SSE, errors in Google's shape, the strict bound for its request shape, and
the shipped prices (with 2.5 Pro's long-context tier)."""

from __future__ import annotations

import functools
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.core import providers
from extproc.core.decisions import Deny
from extproc.core.estimate import Bounds, output_cap, prompt_bound, strict_estimate
from extproc.core.exchange import _set_output_cap
from extproc.core.pricing import ModelPrice, PriceBook, price_usage
from extproc.core.providers import Endpoint, RewriteInput, Route
from extproc.core.providers.gemini import SseReader, usage_from_gemini
from extproc.core.request import RequestFacts, parse_request
from extproc.core.resources import model_prices, upstream_spec, validate_document
from extproc.core.sse import parse_event
from extproc.core.streams import StreamMeter
from extproc.core.usage import Usage
from extproc.mock_upstream import worst_prompt_tokens
from extproc.server.state import builtin_resources

pytestmark = pytest.mark.unit

GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


@pytest.mark.parametrize(("path", "route"), [
    (GEN, Route(Endpoint.GENERATE, model="gemini-2.5-flash")),
    (STREAM, Route(Endpoint.STREAM_GENERATE, model="gemini-2.5-flash")),
    ("/v1/models/gemini-2.5-pro:countTokens", Route(Endpoint.COUNT_TOKENS, model="gemini-2.5-pro")),
    ("/v1beta/models/gemini-2.0-flash:generateContent?key=abc",
     Route(Endpoint.GENERATE, model="gemini-2.0-flash")),
    # the models list and one model (client.models.list() / .get()), answered by Tollgate
    ("/v1beta/models?pageSize=5", Route(Endpoint.GEMINI_MODELS)),
    ("/v1beta/models/gemini-2.5-flash", Route(Endpoint.GEMINI_MODELS, model="gemini-2.5-flash")),
])
def test_gemini_paths(path: str, route: Route) -> None:
    assert providers.classify_path(path) == route


@pytest.mark.parametrize("path", [
    "/v1beta/models/gemini-2.5-flash:predict",  # Vertex's embeddings method: not served
    "/v1beta/models:generateContent",
    "/v1/models",  # OpenAI's models list, not Gemini's
])
def test_other_paths_are_not_gemini(path: str) -> None:
    route = providers.classify_path(path)
    assert route is None or route.endpoint not in providers.get("gemini").endpoints


def test_key_in_the_query_is_found_and_taken_out() -> None:
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=tg-abc"
    assert providers.key_from_path(path) == "tg-abc"
    assert providers.key_from_path("/v1/chat/completions?key=tg-abc") is None  # not OpenAI's
    upstream = upstream_spec(validate_document({
        "apiVersion": "tollgate.io/v1alpha1", "kind": "Upstream", "metadata": {"name": "g"},
        "spec": {"provider": "gemini", "cluster": "gemini"}}))
    route = providers.classify_path(path)
    assert route is not None
    gemini = providers.get("gemini")
    assert gemini.rewrite(RewriteInput(upstream, route, path, "m", frozenset())) == [
        (":path", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")]
    # Bring-your-own-key: the key in the query is the client's own Google key; it stays.
    assert gemini.rewrite(RewriteInput(upstream, route, path, "m", frozenset(), True)) == []
    assert (gemini.auth_header, gemini.auth_value("AIza")) == ("x-goog-api-key", "AIza")


def _facts(path: str, body: dict[str, Any]) -> RequestFacts:
    route = providers.classify_path(path)
    assert route is not None
    facts = parse_request(route, orjson.dumps(body))
    assert isinstance(facts, RequestFacts), facts
    return facts


def test_request_facts_come_from_path_and_generation_config() -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hello there"}]}],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "generationConfig": {"maxOutputTokens": 77, "candidateCount": 2}}
    facts = _facts(STREAM, body)
    assert (facts.model, facts.stream, facts.max_output_tokens) == ("gemini-2.5-flash", True, 77)
    assert facts.prompt_chars == len("Hello there") + len("Be brief.")
    assert facts.shape is not None and facts.shape.choices == 2
    assert _facts(GEN, body).stream is False


def test_missing_contents_and_bad_cap_are_400() -> None:
    route = providers.classify_path(GEN)
    assert route is not None
    missing = parse_request(route, b'{"generationConfig": {}}')
    assert isinstance(missing, Deny) and "contents" in missing.message
    bad = parse_request(route, orjson.dumps({"contents": [], "generationConfig": {
        "maxOutputTokens": "many"}}))
    assert isinstance(bad, Deny) and "generationConfig.maxOutputTokens" in bad.message


def test_media_parts() -> None:
    image = {"inlineData": {"mimeType": "image/png", "data": "A" * 4000}}
    facts = _facts(GEN, {"contents": [{"parts": [{"text": "What is this?"}, image]}]})
    assert facts.shape is not None and facts.shape.images == 1
    assert not facts.shape.unbounded
    by_reference = {"fileData": {"mimeType": "video/mp4", "fileUri": "files/abc"}}
    facts = _facts(GEN, {"contents": [{"parts": [by_reference]}]})
    assert facts.shape is not None and facts.shape.unbounded
    cached = _facts(GEN, {"contents": [], "cachedContent": "cachedContents/x"})
    assert cached.shape is not None and cached.shape.unbounded


def test_clamp_writes_the_nested_cap() -> None:
    body = orjson.dumps({"contents": [], "generationConfig": {"temperature": 0.5}})
    field, new = _set_output_cap(Endpoint.GENERATE, body, 42)
    assert field == "generationConfig.maxOutputTokens"
    assert orjson.loads(new)["generationConfig"] == {"temperature": 0.5, "maxOutputTokens": 42}


META = {"promptTokenCount": 120, "candidatesTokenCount": 30, "cachedContentTokenCount": 100,
        "thoughtsTokenCount": 50, "toolUsePromptTokenCount": 5, "totalTokenCount": 205}


def test_usage_metadata() -> None:
    # The prompt count includes cached content; thinking is output; tool-use prompt is input.
    assert usage_from_gemini(META) == Usage(input=125, output=80, cached_input=100, reasoning=50)
    assert usage_from_gemini({"promptTokenCount": "x"}) == Usage()
    body = orjson.dumps({"candidates": [], "usageMetadata": META})
    assert providers.parse_response_usage(Endpoint.GENERATE, body) == usage_from_gemini(META)
    # streamGenerateContent without alt=sse answers a JSON array: the last usage counts.
    array = orjson.dumps([{"usageMetadata": {"promptTokenCount": 1}}, {"usageMetadata": META}])
    assert providers.parse_response_usage(Endpoint.STREAM_GENERATE, array) == usage_from_gemini(
        META)
    assert providers.parse_response_usage(Endpoint.COUNT_TOKENS, b'{"totalTokens": 9}') == Usage()


def _chunk(text: str, usage: dict[str, int], finish: str | None = None) -> bytes:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}}
    if finish:
        candidate["finishReason"] = finish
    return b"data: " + orjson.dumps({"candidates": [candidate], "usageMetadata": usage}) + (
        b"\r\n\r\n")


def test_stream_carries_the_result_in_its_final_chunk() -> None:
    first = _chunk("Hel", {"promptTokenCount": 120})
    last = _chunk("lo", META, "STOP")
    meter = StreamMeter(Endpoint.STREAM_GENERATE, hide_usage_chunk=False)
    step = meter.feed(first + last[:10], False)
    assert step.forward == first and not step.finished  # the first goes on at once
    step = meter.feed(last[10:], True)
    assert step.forward == b"" and step.finished
    assert meter.usage == usage_from_gemini(META)
    assert meter.output_chars == len("Hello")
    closing = meter.closing(b'{"cost":1}')
    assert not closing.startswith(b":")  # no SSE comment: google-genai would choke on it
    doc = orjson.loads(parse_event(closing).data)
    assert doc["xproxy_result"] == {"cost": 1} and doc["usageMetadata"] == META


def test_an_event_after_the_final_chunk_releases_it() -> None:
    reader = SseReader()
    last = _chunk("Hi", META, "STOP")
    assert reader.observe(parse_event(last)) == (None, False)
    trailing = _chunk("", META)
    assert reader.observe(parse_event(trailing)) == (last + trailing, False)


def test_errors_in_googles_shape() -> None:
    deny = Deny(429, "budget_exceeded", "Budget exhausted.", extra={"limit": "m"})
    doc = orjson.loads(providers.owner(Endpoint.GENERATE).error_body(deny))
    assert doc["error"]["code"] == 429
    assert doc["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert doc["error"]["message"] == "Budget exhausted."
    assert doc["error"]["details"][0]["reason"] == "budget_exceeded"
    unauthenticated = orjson.loads(providers.owner(Endpoint.COUNT_TOKENS).error_body(
        Deny(401, "invalid_api_key", "no")))
    assert unauthenticated["error"]["status"] == "UNAUTHENTICATED"


@functools.cache
def _book() -> PriceBook:
    prices: dict[str, ModelPrice] = {}
    for resource in builtin_resources():
        if resource.kind == "PriceTable":
            prices.update(model_prices(resource))
    return PriceBook(prices)


def test_shipped_prices_and_long_context_tier() -> None:
    book = _book()
    for model in ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
                  "gemini-2.0-flash"):
        price = book.lookup(model)
        assert price is not None and price.max_output_tokens and price.context_window, model
    pro = book.lookup("gemini-2.5-pro")
    assert pro is not None
    # 1M output tokens with a short prompt: $10; with a prompt above 200k tokens: $15 (and
    # every input token at $2.50 instead of $1.25).
    assert price_usage(pro, Usage(input=1000, output=1_000_000)).total_nanos == (
        1000 * 1250 + 10_000_000_000)
    assert price_usage(pro, Usage(input=200_001, output=1_000_000)).total_nanos == (
        200_001 * 2500 + 15_000_000_000)


# ---- the strict bound holds for Gemini request shapes -------------------------------------

BOUNDS = Bounds()
text = st.text(max_size=200)
_part = st.one_of(
    st.fixed_dictionaries({"text": text}),
    st.fixed_dictionaries({"functionCall": st.fixed_dictionaries({
        "name": text, "args": st.dictionaries(text, text, max_size=3)})}),
    st.fixed_dictionaries({"functionResponse": st.fixed_dictionaries({
        "name": text, "response": st.dictionaries(text, text, max_size=3)})}),
)


@st.composite
def gemini_requests(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": draw(st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "model"]),
        "parts": st.lists(_part, min_size=1, max_size=4)}), min_size=1, max_size=5))}
    if draw(st.booleans()):
        body["systemInstruction"] = {"parts": draw(st.lists(_part, min_size=1, max_size=2))}
    if draw(st.booleans()):
        body["tools"] = [{"functionDeclarations": draw(st.lists(st.fixed_dictionaries({
            "name": text, "description": text}), min_size=1, max_size=3))}]
    config: dict[str, Any] = {}
    if draw(st.booleans()):
        config["maxOutputTokens"] = draw(st.integers(1, 70_000))
    if draw(st.booleans()):
        config["candidateCount"] = draw(st.integers(1, 4))
    if config:
        body["generationConfig"] = config
    return body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=gemini_requests(), model=st.sampled_from(
    ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.0-flash"]))
def test_no_gemini_bill_within_the_caps_exceeds_the_reservation(
    body: dict[str, Any], model: str
) -> None:
    price = _book().lookup(model)
    assert price is not None
    facts = _facts(f"/v1beta/models/{model}:generateContent", body)
    assert facts.shape is not None
    prompt = prompt_bound(facts.shape, price, BOUNDS)
    out = output_cap(facts.max_output_tokens, price, BOUNDS) * facts.shape.choices
    estimate = strict_estimate(price, prompt, out)
    # The worst tokenizer: a token per byte of every string, 4 per content, 3 per call; the
    # model writes (thinking included) up to its cap for every candidate.
    billed_in = worst_prompt_tokens({"messages": body["contents"],
                                     "system": body.get("systemInstruction"),
                                     "tools": body.get("tools")})
    config = body.get("generationConfig", {})
    cap = min(config.get("maxOutputTokens", price.max_output_tokens),
              price.max_output_tokens or 10**9)
    billed_out = cap * config.get("candidateCount", 1)
    assert billed_in <= prompt and billed_out <= out
    worst = Usage(input=billed_in, output=billed_out, reasoning=billed_out)
    assert price_usage(price, worst).total_nanos <= estimate


@pytest.mark.parametrize("path", [
    "/v1beta1/publishers/google/models/gemini-2.5-flash:generateContent",
    "/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-flash"
    ":generateContent",
])
def test_vertex_paths_are_gemini_routes_rewritten_to_the_gemini_api(path: str) -> None:
    from extproc.core.providers import classify_path, gemini
    from extproc.core.providers.base import RewriteInput

    route = classify_path(path)
    assert route is not None and route.model == "gemini-2.5-flash"
    sets = gemini.PROVIDER.rewrite(RewriteInput(
        None, route, path + "?alt=sse&key=tg-x", "gemini-2.5-flash",  # type: ignore[arg-type]
        frozenset(), False))
    assert sets == [(":path", "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse")]
    assert gemini.PROVIDER.key_from_path(path + "?key=tg-x") == "tg-x"
    assert classify_path(path.replace("google", "anthropic")) is None


def test_embed_paths_are_embedding_endpoints_priced_from_the_request_when_google_counts_none(
) -> None:
    from extproc.core.providers import classify_path, gemini

    for method, endpoint in (("embedContent", Endpoint.EMBED_CONTENT),
                             ("batchEmbedContents", Endpoint.BATCH_EMBED_CONTENTS)):
        route = classify_path(f"/v1beta/models/gemini-embedding-001:{method}")
        assert route is not None and route.endpoint is endpoint and endpoint.embeds
        assert gemini.PROVIDER.usage_from_json(endpoint, {"embeddings": []}) is None
        assert gemini.PROVIDER.usage_from_json(
            endpoint, {"usageMetadata": {"promptTokenCount": 9}}) == Usage(input=9)
