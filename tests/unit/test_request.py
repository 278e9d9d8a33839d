"""Which API a path is, and the facts (or the 400) a request body yields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from extproc.core.decisions import Deny
from extproc.core.request import (
    MAX_JSON_DEPTH,
    MAX_OUTPUT_TOKENS,
    Endpoint,
    RequestFacts,
    Route,
    classify_path,
    parse_request,
)

pytestmark = pytest.mark.unit

CHAT = Route(Endpoint.CHAT)
COMPLETIONS = Route(Endpoint.COMPLETIONS)
EMBEDDINGS = Route(Endpoint.EMBEDDINGS)
RESPONSES = Route(Endpoint.RESPONSES)
MESSAGES = Route(Endpoint.MESSAGES)


# ---- classify_path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat/completions", Route(Endpoint.CHAT)),
        ("/v1/completions", Route(Endpoint.COMPLETIONS)),
        ("/v1/embeddings", Route(Endpoint.EMBEDDINGS)),
        ("/v1/responses", Route(Endpoint.RESPONSES)),
        ("/v1/messages", Route(Endpoint.MESSAGES)),
        ("/v1/models", Route(Endpoint.MODELS)),
        # query strings and a trailing slash do not change the endpoint
        ("/v1/chat/completions?foo=bar", Route(Endpoint.CHAT)),
        ("/v1/messages?beta=true", Route(Endpoint.MESSAGES)),
        ("/v1/models?limit=5", Route(Endpoint.MODELS)),
        ("/v1/chat/completions/", Route(Endpoint.CHAT)),
        ("/v1/chat/completions?next=/v1/messages", Route(Endpoint.CHAT)),
        # Azure OpenAI: the deployment comes from the path
        (
            "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21",
            Route(Endpoint.CHAT, azure_deployment="my-gpt4o"),
        ),
        (
            "/openai/deployments/emb/embeddings?api-version=2024-10-21",
            Route(Endpoint.EMBEDDINGS, azure_deployment="emb"),
        ),
        ("/openai/deployments/d1/completions", Route(Endpoint.COMPLETIONS, azure_deployment="d1")),
        ("/openai/deployments/d1/responses", Route(Endpoint.RESPONSES, azure_deployment="d1")),
    ],
)
def test_classify_path_known(path: str, expected: Route) -> None:
    assert classify_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "/v1",
        "/v1/",
        "/v1/chat",
        "/v1/files",
        "/v1/images/generations",
        "/v1/models/a/b",
        "/v2/chat/completions",
        "/chat/completions",
        "/health?path=/v1/chat/completions",
        "/openai/deployments/",
        "/openai/deployments//chat/completions",
        "/openai/deployments/dep",
        "/openai/deployments/dep/images/generations?api-version=2024-10-21",
        "/openai/deployments/dep/messages",
    ],
)
def test_classify_path_unknown_is_none(path: str) -> None:
    assert classify_path(path) is None


def test_models_retrieve_and_anthropic_count_tokens_are_classified() -> None:
    assert classify_path("/v1/models/gpt-4o") == Route(Endpoint.MODELS, model="gpt-4o")
    assert classify_path("/v1/models/ft:gpt-4o:org::x1") == Route(
        Endpoint.MODELS, model="ft:gpt-4o:org::x1")
    assert classify_path("/v1/messages/count_tokens") == Route(Endpoint.MESSAGES_COUNT_TOKENS)


# ---- parse_request on the golden bodies ------------------------------------------------------


def _chat_chars(doc: dict[str, Any]) -> int:
    return sum(len(m["content"]) for m in doc["messages"])


def _responses_chars(doc: dict[str, Any]) -> int:
    parts = [p for item in doc["input"] for p in item["content"]]
    return sum(len(p["text"]) for p in parts) + len(doc["instructions"])


def _anthropic_chars(doc: dict[str, Any]) -> int:
    return sum(len(s["text"]) for s in doc["system"]) + _chat_chars(doc)


@pytest.mark.parametrize(
    ("name", "route", "model", "max_output", "user", "chars"),
    [
        # chat carries max_completion_tokens (the field that supersedes max_tokens)
        ("openai_chat", CHAT, "gpt-5-mini", 512, None, _chat_chars),
        (
            "openai_completions", COMPLETIONS, "gpt-3.5-turbo-instruct", 64, None,
            lambda d: len(d["prompt"]),
        ),
        (
            "openai_embeddings", EMBEDDINGS, "text-embedding-3-small", None, None,
            lambda d: sum(len(s) for s in d["input"]),
        ),
        ("openai_responses", RESPONSES, "gpt-5-mini", 1024, None, _responses_chars),
        # Anthropic has no `user`; metadata.user_id stands in for it
        ("anthropic_messages", MESSAGES, "claude-sonnet-4-6", 1024, "user-4f2a9c",
         _anthropic_chars),
    ],
)
def test_parse_golden_request(
    golden: Callable[[str], bytes],
    name: str,
    route: Route,
    model: str,
    max_output: int | None,
    user: str | None,
    chars: Callable[[dict[str, Any]], int],
) -> None:
    body = golden(f"{name}.request.json")
    facts = parse_request(route, body)
    assert isinstance(facts, RequestFacts), facts
    assert facts.endpoint is route.endpoint
    assert facts.model == model
    assert facts.max_output_tokens == max_output
    assert facts.stream is False
    assert facts.include_usage is False
    assert facts.user == user
    assert facts.prompt_chars > 0
    assert facts.prompt_chars == chars(orjson.loads(body))
    # the estimate rounds up: no prompt is estimated at zero tokens
    assert facts.prompt_tokens_estimate == -(-facts.prompt_chars // 4)


def _facts(route: Route, doc: dict[str, Any]) -> RequestFacts:
    facts = parse_request(route, orjson.dumps(doc))
    assert isinstance(facts, RequestFacts), facts
    return facts


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("route", "doc", "expected"),
    [
        # max_completion_tokens beats max_tokens on chat, whichever order they come in
        (CHAT, {"model": "m", "messages": MSG, "max_tokens": 50, "max_completion_tokens": 100},
         100),
        (CHAT, {"model": "m", "messages": MSG, "max_completion_tokens": 100, "max_tokens": 50},
         100),
        (CHAT, {"model": "m", "messages": MSG, "max_tokens": 50}, 50),
        (CHAT, {"model": "m", "messages": MSG, "max_completion_tokens": None, "max_tokens": 7}, 7),
        (CHAT, {"model": "m", "messages": MSG}, None),
        # Responses reads only max_output_tokens
        (RESPONSES, {"model": "m", "input": "hi", "max_output_tokens": 300}, 300),
        (RESPONSES, {"model": "m", "input": "hi", "max_tokens": 300}, None),
        (COMPLETIONS, {"model": "m", "prompt": "hi", "max_tokens": 16}, 16),
        (MESSAGES, {"model": "m", "messages": MSG, "max_tokens": 1}, 1),
        # embeddings have no output cap at all
        (EMBEDDINGS, {"model": "m", "input": "hi", "max_tokens": 16}, None),
    ],
)
def test_max_output_field_per_endpoint(
    route: Route, doc: dict[str, Any], expected: int | None
) -> None:
    assert _facts(route, doc).max_output_tokens == expected


@pytest.mark.parametrize(
    ("doc", "stream", "include_usage"),
    [
        ({}, False, False),
        ({"stream": None}, False, False),
        ({"stream": False}, False, False),
        ({"stream": True}, True, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, True, False),
        # only a real `true` counts
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, True, False),
        ({"stream": True, "stream_options": {}}, True, False),
    ],
)
def test_stream_and_include_usage(doc: dict[str, Any], stream: bool, include_usage: bool) -> None:
    facts = _facts(CHAT, {"model": "gpt-4o", "messages": MSG, **doc})
    assert (facts.stream, facts.include_usage) == (stream, include_usage)


@pytest.mark.parametrize(
    ("route", "doc", "user"),
    [
        (CHAT, {"model": "m", "messages": MSG, "user": "u-1"}, "u-1"),
        (CHAT, {"model": "m", "messages": MSG, "metadata": {"user_id": "ignored"}}, None),
        (MESSAGES, {"model": "m", "messages": MSG, "metadata": {"user_id": "u-2"}}, "u-2"),
        (MESSAGES, {"model": "m", "messages": MSG, "metadata": {"user_id": 7}}, None),
        (MESSAGES, {"model": "m", "messages": MSG, "metadata": "u-3"}, None),
        (MESSAGES, {"model": "m", "messages": MSG, "user": "u-4", "metadata": {"user_id": "x"}},
         "u-4"),
    ],
)
def test_user(route: Route, doc: dict[str, Any], user: str | None) -> None:
    assert _facts(route, doc).user == user


def test_azure_deployment_stands_in_for_missing_model() -> None:
    route = Route(Endpoint.CHAT, azure_deployment="my-gpt4o")
    assert _facts(route, {"messages": MSG}).model == "my-gpt4o"
    # a model in the body still wins
    assert _facts(route, {"model": "gpt-4o", "messages": MSG}).model == "gpt-4o"


@pytest.mark.parametrize("field", ["previous_response_id", "prompt"])
def test_responses_input_may_be_replaced(field: str) -> None:
    facts = _facts(RESPONSES, {"model": "gpt-5", field: "resp_123"})
    assert facts.model == "gpt-5"


def test_non_text_parts_count_towards_the_prompt() -> None:
    text = {"role": "user", "content": [{"type": "text", "text": "describe"}]}
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
    text_only = _facts(CHAT, {"model": "m", "messages": [text]})
    with_image = _facts(CHAT, {"model": "m", "messages": [image]})
    assert text_only.prompt_chars == len("describe")
    assert with_image.prompt_chars > text_only.prompt_chars


# ---- the 400 table ---------------------------------------------------------------------------


def _body(doc: Any) -> bytes:
    return orjson.dumps(doc)


def _chat(**fields: Any) -> bytes:
    return _body({"model": "gpt-4o", "messages": MSG, **fields})


@pytest.mark.parametrize(
    ("route", "body", "named"),
    [
        (CHAT, b"", "empty"),
        (CHAT, b"{", "not valid JSON"),
        (CHAT, b"model=gpt-4o", "not valid JSON"),
        (CHAT, b'{"model": "gpt-4o\xff", "messages": []}', "UTF-8"),
        (CHAT, b"[]", "JSON object"),
        (CHAT, b'"gpt-4o"', "JSON object"),
        (CHAT, b"null", "JSON object"),
        (CHAT, _body({"messages": MSG}), "'model'"),
        (CHAT, _body({"model": None, "messages": MSG}), "'model'"),
        (CHAT, _body({"model": 4, "messages": MSG}), "'model'"),
        (CHAT, _body({"model": ["gpt-4o"], "messages": MSG}), "'model'"),
        (CHAT, _body({"model": "", "messages": MSG}), "'model'"),
        (CHAT, _body({"model": "   ", "messages": MSG}), "'model'"),
        (CHAT, _body({"model": "gpt-4o"}), "'messages'"),
        (MESSAGES, _body({"model": "claude-sonnet-4-5", "max_tokens": 10}), "'messages'"),
        (COMPLETIONS, _body({"model": "gpt-3.5-turbo-instruct"}), "'prompt'"),
        (EMBEDDINGS, _body({"model": "text-embedding-3-small"}), "'input'"),
        (RESPONSES, _body({"model": "gpt-5"}), "'input'"),
        (CHAT, _body({"model": "gpt-4o", "messages": "hi"}), "'messages'"),
        (CHAT, _body({"model": "gpt-4o", "messages": {"role": "user"}}), "'messages'"),
        (MESSAGES, _body({"model": "c", "messages": None, "max_tokens": 1}), "'messages'"),
        (CHAT, _chat(max_tokens=-1), "'max_tokens'"),
        (CHAT, _chat(max_tokens=0), "'max_tokens'"),
        (CHAT, _chat(max_tokens="100"), "'max_tokens'"),
        (CHAT, _chat(max_tokens=True), "'max_tokens'"),
        (CHAT, _chat(max_tokens=1.5), "'max_tokens'"),
        (CHAT, _chat(max_completion_tokens=-5), "'max_completion_tokens'"),
        (MESSAGES, _chat(max_tokens=-1), "'max_tokens'"),
        (COMPLETIONS, _body({"model": "m", "prompt": "p", "max_tokens": "8"}), "'max_tokens'"),
        (RESPONSES, _body({"model": "m", "input": "i", "max_output_tokens": False}),
         "'max_output_tokens'"),
        (CHAT, _chat(stream="true"), "'stream'"),
        (CHAT, _chat(stream=1), "'stream'"),
        (CHAT, _chat(user=123), "'user'"),
        (CHAT, _chat(user={"id": "u"}), "'user'"),
        (CHAT, _chat(stream=True, stream_options="include_usage"), "'stream_options'"),
        (CHAT, _chat(stream=True, stream_options=[]), "'stream_options'"),
    ],
)
def test_malformed_request_is_400_naming_the_problem(
    route: Route, body: bytes, named: str
) -> None:
    result = parse_request(route, body)
    assert isinstance(result, Deny)
    assert result.status == 400
    assert result.error_type == "invalid_request_error"
    assert named in result.message


# ---- bounds on what a client sends -----------------------------------------------------------


def _nested_body(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    """A chat body whose deepest container is `depth` levels down (the top object is 1)."""
    inner = depth - 3  # object > messages list > message object > content
    return (b'{"model":"gpt-4o","messages":[{"role":"user","content":'
            + opener * inner + b"1" + closer * inner + b"}]}")


@pytest.mark.parametrize(
    ("depth", "ok"),
    [(10, True), (MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False), (600, False),
     (1000, False), (2000, False)],  # 2000 is past orjson's own limit: still a clear 400
)
def test_nesting_depth_is_bounded(depth: int, ok: bool) -> None:
    result = parse_request(CHAT, _nested_body(depth))
    if ok:
        assert isinstance(result, RequestFacts)
    else:
        assert isinstance(result, Deny) and result.status == 400
        assert "deeper than" in result.message or "depth limit" in result.message


def test_nesting_through_objects_is_bounded_too() -> None:
    body = _nested_body(600, b'{"a":', b"}")
    result = parse_request(CHAT, body)
    assert isinstance(result, Deny) and "deeper than 128 levels" in result.message


def test_many_shallow_brackets_are_fine() -> None:
    """More brackets than the bound, none deep: the walk runs and finds nothing."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "[{"}]}] * 200
    assert isinstance(parse_request(CHAT, _body({"model": "gpt-4o", "messages": messages})),
                      RequestFacts)


@pytest.mark.parametrize(
    ("route", "field", "value", "ok"),
    [
        (CHAT, "max_tokens", MAX_OUTPUT_TOKENS, True),
        (CHAT, "max_tokens", MAX_OUTPUT_TOKENS + 1, False),
        (CHAT, "max_tokens", 10**17, False),
        (CHAT, "max_tokens", 2**63 - 1, False),
        (CHAT, "max_completion_tokens", 10**17, False),
        (MESSAGES, "max_tokens", 10**17, False),
        (RESPONSES, "max_output_tokens", 10**17, False),
    ],
)
def test_output_cap_range(route: Route, field: str, value: int, ok: bool) -> None:
    doc: dict[str, Any] = {"model": "m", field: value}
    doc.update({"input": "i"} if route is RESPONSES else {"messages": MSG})
    result = parse_request(route, _body(doc))
    if ok:
        assert isinstance(result, RequestFacts) and result.max_output_tokens == value
    else:
        assert isinstance(result, Deny) and result.status == 400
        assert f"'{field}' must be an integer from 1 to {MAX_OUTPUT_TOKENS}" in result.message


@pytest.mark.parametrize(
    ("route", "doc", "fragment"),
    [
        (CHAT, {"model": "gpt-4o", "messages": MSG, "user": "u" * 257}, "'user'"),
        (MESSAGES, {"model": "c", "messages": MSG, "max_tokens": 1,
                    "metadata": {"user_id": "u" * 257}}, "'user'"),
        (CHAT, {"model": "m" * 257, "messages": MSG}, "'model'"),
    ],
)
def test_client_strings_are_length_bounded(
    route: Route, doc: dict[str, Any], fragment: str
) -> None:
    result = parse_request(route, _body(doc))
    assert isinstance(result, Deny) and result.status == 400
    assert fragment in result.message and "at most 256 characters" in result.message


def test_client_strings_at_the_bound_pass() -> None:
    result = parse_request(CHAT, _body({"model": "m" * 256, "messages": MSG, "user": "u" * 256}))
    assert isinstance(result, RequestFacts) and result.user == "u" * 256
