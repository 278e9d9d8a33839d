"""One request/response pair driven through the four ext_proc phases against a real snapshot.

The snapshot is the shipped builtin.yaml plus the keys and upstreams below; provider secrets come
from a plain dict. Expected costs are worked out by hand from the builtin.yaml rates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import pytest

from extproc.core.decisions import BodyMode, Continue, Decision, Deny
from extproc.core.exchange import (
    REQUEST_ID_HEADER,
    ROUTING_HEADER,
    Exchange,
    Options,
    Reply,
    Reserve,
)
from extproc.core.keys import find_key, hash_key
from extproc.core.pricing import format_nanos
from extproc.core.providers.base import Endpoint
from extproc.core.quota import interpret_reservation
from extproc.core.resources import Resource, validate_document
from extproc.core.snapshot import Snapshot, build_snapshot
from extproc.core.usage import Usage

pytestmark = pytest.mark.unit

SECRETS = {"OPENAI_API_KEY": "sk-up", "ANTHROPIC_API_KEY": "sk-ant"}
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
REQUEST_ID = "req-1"

KEY = "tg-" + "m" * 43
LIMITED_KEY = "tg-" + "l" * 43
REVOKED_KEY = "tg-" + "r" * 43
EXPIRED_KEY = "tg-" + "e" * 43
EXPIRES_NOW_KEY = "tg-" + "n" * 43
ALL_KEYS = (KEY, LIMITED_KEY, REVOKED_KEY, EXPIRED_KEY, EXPIRES_NOW_KEY)

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
AZURE_PATH = "/openai/deployments/{}/chat/completions?api-version=2024-10-21"
MSG = [{"role": "user", "content": "hi"}]
DEFAULT = Options()


def _resource(kind: str, name: str, spec: dict[str, Any]) -> Resource:
    return validate_document(
        {"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": {"name": name},
         "spec": spec}
    )


def _cred(name: str, ref: str, fallback: bool = False) -> dict[str, Any]:
    return {"name": name, "secretRef": ref, "isFallback": fallback}


STORED = [
    _resource("VirtualKey", "main", {"keySha256": hash_key(KEY)}),
    _resource("VirtualKey", "limited", {"keySha256": hash_key(LIMITED_KEY),
                                        "models": ["gpt-4o*"]}),
    _resource("VirtualKey", "gone", {"keySha256": hash_key(REVOKED_KEY), "revoked": True}),
    _resource("VirtualKey", "old", {"keySha256": hash_key(EXPIRED_KEY),
                                    "expiresAt": "2025-12-31T23:59:59Z"}),
    _resource("VirtualKey", "ending", {"keySha256": hash_key(EXPIRES_NOW_KEY),
                                       "expiresAt": "2026-01-01T00:00:00Z"}),
    # clients say "fast"; the upstream is asked for gpt-4o-mini
    _resource("Upstream", "fast", {
        "provider": "openai", "cluster": "openai-fast", "models": ["fast"], "priority": 10,
        "aliases": {"fast": "gpt-4o-mini"}, "credentials": [_cred("d", "OPENAI_API_KEY")],
    }),
    # its only secret is not configured
    _resource("Upstream", "local", {
        "provider": "openai-compatible", "cluster": "local", "models": ["local-*"],
        "priority": 10, "credentials": [_cred("d", "LOCAL_API_KEY")],
    }),
    # primary secret missing: the fallback is used
    _resource("Upstream", "spare", {
        "provider": "openai", "cluster": "spare", "models": ["spare-*"], "priority": 10,
        "credentials": [_cred("fb", "ANTHROPIC_API_KEY", True), _cred("p", "MISSING_KEY")],
    }),
    # primary secret present: it wins over a fallback listed before it
    _resource("Upstream", "primary", {
        "provider": "openai", "cluster": "primary", "models": ["primary-*"], "priority": 10,
        "credentials": [_cred("fb", "ANTHROPIC_API_KEY", True), _cred("p", "OPENAI_API_KEY")],
    }),
    # after the built-in openai catch-all (1000), so only Azure paths reach it
    _resource("Upstream", "azure", {
        "provider": "azure-openai", "cluster": "azure-openai", "models": ["gpt-4o"],
        "priority": 2000, "credentials": [_cred("d", "OPENAI_API_KEY")],
    }),
]


@pytest.fixture(scope="module")
def snapshot(builtin_resources: list[Resource]) -> Snapshot:
    return build_snapshot(1, builtin_resources, STORED, SECRETS.get)


def request_headers(
    path: str = CHAT_PATH,
    *,
    method: str = "POST",
    key: str | None = KEY,
    via: str = "authorization",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    headers = {":path": path, ":method": method, "content-type": "application/json"}
    if key is not None:
        headers[via] = f"Bearer {key}" if via == "authorization" else key
    headers.update(extra or {})
    return headers


def open_exchange(
    snapshot: Snapshot,
    headers: Mapping[str, str],
    *,
    end_of_stream: bool = False,
    options: Options = DEFAULT,
) -> tuple[Exchange, Decision | Reply]:
    exchange = Exchange(REQUEST_ID, options)
    presented = find_key(headers)
    record = snapshot.keys_by_hash.get(hash_key(presented.value)) if presented else None
    decision = exchange.on_request_headers(
        headers, presented, record, snapshot, end_of_stream, NOW
    )
    return exchange, decision


def send_request(
    snapshot: Snapshot, headers: Mapping[str, str], body: bytes, options: Options = DEFAULT
) -> tuple[Exchange, Decision]:
    exchange, first = open_exchange(snapshot, headers, options=options)
    assert isinstance(first, Continue), first
    return exchange, exchange.on_request_body(body, snapshot, NOW)


def _with_model(body: bytes, model: str) -> bytes:
    doc = orjson.loads(body)
    doc["model"] = model
    return orjson.dumps(doc)


def _all_set_values(decision: Continue) -> list[str]:
    return [value for _, value in decision.headers.set]


# ---- request headers -------------------------------------------------------------------------


def test_spoofed_internal_headers_and_accept_encoding_are_removed(snapshot: Snapshot) -> None:
    spoofed = {
        ROUTING_HEADER: "anthropic",
        "x-tollgate-cost": "0.000000000",
        REQUEST_ID_HEADER: "fake",
        "accept-encoding": "gzip, br",
    }
    exchange, decision = open_exchange(snapshot, request_headers(extra=spoofed))
    assert isinstance(decision, Continue)
    assert set(decision.headers.remove) == set(spoofed)
    assert decision.headers.set == ()
    # the routing header is then set by Tollgate itself, to the real upstream's cluster
    body_decision = exchange.on_request_body(
        orjson.dumps({"model": "gpt-4o", "messages": MSG}), snapshot, NOW
    )
    assert isinstance(body_decision, Continue)
    assert dict(body_decision.headers.set)[ROUTING_HEADER] == "openai"


def test_pay_i_proxy_path_becomes_ours_and_its_headers_are_removed(snapshot: Snapshot) -> None:
    annotations = {"xproxy-usecase-name": "uc", "xproxy-request-tags": "t",
                   "xproxy-account-name": "acme"}
    exchange, decision = open_exchange(snapshot, request_headers(
        "/api/v1/proxy/openai/v1/chat/completions", extra=annotations))
    assert isinstance(decision, Continue)
    assert dict(decision.headers.set) == {":path": "/v1/chat/completions"}
    assert set(decision.headers.remove) == set(annotations)
    assert exchange.annotations.use_case_name == "uc"
    assert exchange.annotations.account_name == "acme"
    _, refused = open_exchange(snapshot, request_headers("/api/v1/proxy/aws.bedrock/model/x"))
    assert isinstance(refused, Deny) and refused.status == 501


def test_clean_request_headers_need_no_edit(snapshot: Snapshot) -> None:
    _, decision = open_exchange(snapshot, request_headers())
    assert isinstance(decision, Continue)
    assert not decision.headers
    assert decision.body is None


SMALL = Options(max_body_bytes=100)


@pytest.mark.parametrize(
    ("headers", "end_of_stream", "status", "code", "message"),
    [
        (request_headers("/v1/files"), False, 404, "unknown_endpoint", "/v1/files"),
        # the path is checked first, and the query string is not echoed
        (request_headers("/v1/files?purpose=batch", key=None), False, 404, "unknown_endpoint",
         "/v1/files."),
        (request_headers(key=None), False, 401, "missing_api_key", "Missing API key"),
        (request_headers(MESSAGES_PATH, key=None), False, 401, "missing_api_key", "x-api-key"),
        (request_headers(extra={"authorization": "Basic dXNlcjpwYXNz"}, key=None), False, 401,
         "missing_api_key", "Missing API key"),
        (request_headers(key="tg-unknown"), False, 401, "invalid_api_key", "Incorrect"),
        (request_headers(key=REVOKED_KEY), False, 401, "invalid_api_key", "revoked"),
        (request_headers(key=EXPIRED_KEY), False, 401, "invalid_api_key", "expired"),
        (request_headers(key=EXPIRES_NOW_KEY), False, 401, "invalid_api_key", "expired"),
        (request_headers(key=REVOKED_KEY, via="x-api-key"), False, 401, "invalid_api_key",
         "revoked"),
        (request_headers(method="GET"), False, 405, "method_not_allowed", "POST"),
        (request_headers("/v1/models", method="POST"), False, 405, "method_not_allowed", "GET"),
        (request_headers(extra={"content-encoding": "gzip"}), False, 415,
         "unsupported_content_encoding", "gzip"),
        (request_headers(extra={"content-encoding": "br"}), False, 415,
         "unsupported_content_encoding", "br"),
        (request_headers(extra={"content-length": "101"}), False, 413, "request_too_large",
         "100 bytes"),
        (request_headers(), True, 400, "invalid_request", "empty"),
    ],
)
def test_request_header_denials(
    snapshot: Snapshot,
    headers: dict[str, str],
    end_of_stream: bool,
    status: int,
    code: str,
    message: str,
) -> None:
    exchange, decision = open_exchange(
        snapshot, headers, end_of_stream=end_of_stream, options=SMALL
    )
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (status, code)
    assert message in decision.message
    assert "purpose" not in decision.message
    assert (REQUEST_ID_HEADER, REQUEST_ID) in exchange.deny_headers()


@pytest.mark.parametrize(
    "extra",
    [{"content-length": "100"}, {"content-encoding": "identity"}, {"content-length": "abc"}],
)
def test_request_headers_within_limits_pass(snapshot: Snapshot, extra: dict[str, str]) -> None:
    _, decision = open_exchange(snapshot, request_headers(extra=extra), options=SMALL)
    assert isinstance(decision, Continue)


def _model_ids(reply: Decision | Reply) -> list[str]:
    assert isinstance(reply, Reply)
    assert reply.status == 200
    doc = orjson.loads(reply.body)
    assert doc["object"] == "list"
    for entry in doc["data"]:
        assert entry["object"] == "model"
        assert entry["created"] == int(NOW)
    return [entry["id"] for entry in doc["data"]]


def test_models_lists_only_models_the_key_may_use(snapshot: Snapshot) -> None:
    _, reply = open_exchange(snapshot, request_headers("/v1/models", method="GET",
                                                       key=LIMITED_KEY))
    # the limited key's pattern is gpt-4o*; the default table has gpt-4o and gpt-4o-mini
    assert _model_ids(reply) == ["gpt-4o", "gpt-4o-mini"]


def test_models_lists_every_priced_model_for_an_unrestricted_key(
    snapshot: Snapshot, builtin_resources: list[Resource]
) -> None:
    (table,) = [r for r in builtin_resources if r.kind == "PriceTable"]
    _, reply = open_exchange(
        snapshot, request_headers("/v1/models?limit=100", method="GET", via="x-api-key")
    )
    # every priced model, and the exact alias `fast` of the stored Upstream "fast"
    assert _model_ids(reply) == [*sorted(table.spec["models"]), "fast"]


# ---- request body ----------------------------------------------------------------------------

OPENAI_SETS = {ROUTING_HEADER: "openai", "authorization": "Bearer sk-up"}
OPENAI_REMOVES = {"x-api-key", "api-key", "x-goog-api-key", "xproxy-api-key"}
ANTHROPIC_SETS = {
    ROUTING_HEADER: "anthropic", "x-api-key": "sk-ant", "anthropic-version": "2023-06-01"
}
ANTHROPIC_REMOVES = {"authorization", "api-key", "x-goog-api-key", "xproxy-api-key"}


@pytest.mark.parametrize(
    ("path", "golden_name", "via", "sets", "removes"),
    [
        (CHAT_PATH, "openai_chat", "authorization", OPENAI_SETS, OPENAI_REMOVES),
        (CHAT_PATH, "openai_chat", "x-api-key", OPENAI_SETS, OPENAI_REMOVES),
        ("/v1/completions", "openai_completions", "authorization", OPENAI_SETS, OPENAI_REMOVES),
        ("/v1/embeddings", "openai_embeddings", "authorization", OPENAI_SETS, OPENAI_REMOVES),
        ("/v1/responses", "openai_responses", "x-api-key", OPENAI_SETS, OPENAI_REMOVES),
        (MESSAGES_PATH, "anthropic_messages", "x-api-key", ANTHROPIC_SETS, ANTHROPIC_REMOVES),
        (MESSAGES_PATH, "anthropic_messages", "authorization", ANTHROPIC_SETS,
         ANTHROPIC_REMOVES),
    ],
)
def test_virtual_key_is_swapped_for_the_upstream_credential(
    snapshot: Snapshot,
    golden: Callable[[str], bytes],
    path: str,
    golden_name: str,
    via: str,
    sets: dict[str, str],
    removes: set[str],
) -> None:
    headers = request_headers(path, via=via)
    _, decision = send_request(snapshot, headers, golden(f"{golden_name}.request.json"))
    assert isinstance(decision, Continue), decision
    assert dict(decision.headers.set) == sets
    assert set(decision.headers.remove) == removes
    assert decision.clear_route_cache is True
    assert decision.body is None  # no alias: the client's bytes go upstream unchanged
    # the header that carried the virtual key is either removed or overwritten
    assert via in decision.headers.remove or dict(decision.headers.set)[via] != headers[via]
    # no name is both removed and set (the result would depend on Envoy's order)
    assert not set(decision.headers.remove) & set(dict(decision.headers.set))
    assert not any(KEY in value for value in _all_set_values(decision))


def test_azure_deployment_gets_the_api_key_header(snapshot: Snapshot) -> None:
    _, decision = send_request(
        snapshot, request_headers(AZURE_PATH.format("gpt-4o")), orjson.dumps({"messages": MSG})
    )
    assert isinstance(decision, Continue), decision
    assert dict(decision.headers.set) == {ROUTING_HEADER: "azure-openai", "api-key": "sk-up"}
    assert set(decision.headers.remove) == {"authorization", "x-api-key", "x-goog-api-key",
                                              "xproxy-api-key"}


@pytest.mark.parametrize(
    ("path", "golden_name", "own", "sets"),
    [
        (CHAT_PATH, "openai_chat", {"authorization": "Bearer sk-client-own"},
         {ROUTING_HEADER: "openai"}),
        (MESSAGES_PATH, "anthropic_messages", {"x-api-key": "sk-ant-client-own"},
         {ROUTING_HEADER: "anthropic", "anthropic-version": "2023-06-01"}),
    ],
)
def test_bring_your_own_key_passes_client_credentials_through(
    snapshot: Snapshot,
    golden: Callable[[str], bytes],
    path: str,
    golden_name: str,
    own: dict[str, str],
    sets: dict[str, str],
) -> None:
    headers = request_headers(path, via="xproxy-api-key", extra=own)
    _, decision = send_request(snapshot, headers, golden(f"{golden_name}.request.json"))
    assert isinstance(decision, Continue), decision
    assert dict(decision.headers.set) == sets
    assert decision.headers.remove == ("xproxy-api-key",)
    (own_header,) = own
    assert own_header not in decision.headers.remove
    assert own_header not in dict(decision.headers.set)
    assert not any(KEY in value for value in _all_set_values(decision))


def test_a_lone_usable_credential_is_used_directly(snapshot: Snapshot) -> None:
    # "spare": the primary has no secret, so the fallback is the only candidate: no pool,
    # no reservation, its key goes out at once.
    _, decision = send_request(
        snapshot, request_headers(), orjson.dumps({"model": "spare-1", "messages": MSG})
    )
    assert isinstance(decision, Continue), decision
    assert dict(decision.headers.set)["authorization"] == "Bearer sk-ant"


def test_a_pool_lets_the_reservation_choose_primary_first(snapshot: Snapshot) -> None:
    # "primary": two usable credentials make a pool. Candidates are ordered primaries first,
    # whatever the configured order, and no credential is chosen before the reservation.
    exchange, decision = send_request(
        snapshot, request_headers(), orjson.dumps({"model": "primary-1", "messages": MSG})
    )
    assert isinstance(decision, Reserve), decision
    assert [(c.name, c.primary) for c in decision.plan.credentials] == [("p", True),
                                                                         ("fb", False)]
    assert "authorization" not in dict(decision.proceed.headers.set)
    # The script chose the fallback (say every primary was cooling down): its key goes out.
    reply = [1, 0, 0, 0, 2, 1, 0]
    proceed = exchange.on_reserved(decision, interpret_reservation(decision.plan, reply))
    assert isinstance(proceed, Continue)
    assert dict(proceed.headers.set)["authorization"] == "Bearer sk-ant"
    assert exchange.credential is not None and exchange.credential.name == "fb"


@pytest.mark.parametrize(
    ("headers", "body", "status", "code", "message"),
    [
        # the limited key may use gpt-4o* only
        (request_headers(key=LIMITED_KEY), {"model": "gpt-5-mini", "messages": MSG}, 403,
         "model_not_allowed", "'gpt-5-mini'"),
        (request_headers(MESSAGES_PATH, key=LIMITED_KEY, via="x-api-key"),
         {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": MSG}, 403,
         "model_not_allowed", "'claude-sonnet-4-5'"),
        # the azure upstream serves only gpt-4o
        (request_headers(AZURE_PATH.format("gpt-5")), {"messages": MSG}, 404,
         "model_not_found", "'gpt-5'"),
        (request_headers(), {"model": "local-llama", "messages": MSG}, 503,
         "upstream_credential_unavailable", "'local'"),
        (request_headers(), {"model": 5, "messages": MSG}, 400, "invalid_request", "'model'"),
        (request_headers(), {"model": "gpt-4o"}, 400, "invalid_request", "'messages'"),
    ],
)
def test_request_body_denials(
    snapshot: Snapshot,
    headers: dict[str, str],
    body: dict[str, Any],
    status: int,
    code: str,
    message: str,
) -> None:
    _, decision = send_request(snapshot, headers, orjson.dumps(body))
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (status, code)
    assert message in decision.message


def test_model_allowed_by_pattern_passes(snapshot: Snapshot) -> None:
    body = orjson.dumps({"model": "gpt-4o-mini-2024-07-18", "messages": MSG})
    _, decision = send_request(snapshot, request_headers(key=LIMITED_KEY), body)
    assert isinstance(decision, Continue), decision


def test_body_larger_than_limit_is_413(snapshot: Snapshot) -> None:
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 80}]})
    assert len(body) > 100
    _, decision = send_request(snapshot, request_headers(), body, options=SMALL)
    assert isinstance(decision, Deny)
    assert decision.status == 413


def test_alias_rewrites_the_model_in_the_body(snapshot: Snapshot) -> None:
    sent = {"model": "fast", "messages": MSG, "temperature": 0.2, "max_tokens": 9}
    _, decision = send_request(snapshot, request_headers(), orjson.dumps(sent))
    assert isinstance(decision, Continue), decision
    assert decision.body is not None
    assert orjson.loads(decision.body) == {**sent, "model": "gpt-4o-mini"}
    assert dict(decision.headers.set)[ROUTING_HEADER] == "openai-fast"


# ---- response headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "mode"),
    [
        ("200", "application/json", BodyMode.BUFFERED),
        ("200", "application/json; charset=utf-8", BodyMode.BUFFERED),
        ("201", "application/json", BodyMode.BUFFERED),
        ("200", "text/event-stream", BodyMode.STREAMED),
        ("200", "text/event-stream; charset=utf-8", BodyMode.STREAMED),
        ("200", "", None),
        ("400", "application/json", None),
        ("429", "application/json", None),
        ("500", "application/json", None),
        ("500", "text/event-stream", None),
        ("abc", "application/json", None),
    ],
)
def test_response_headers(
    snapshot: Snapshot, golden: Callable[[str], bytes], status: str, content_type: str,
    mode: BodyMode | None,
) -> None:
    exchange, _ = send_request(snapshot, request_headers(), golden("openai_chat.request.json"))
    decision = exchange.on_response_headers({":status": status, "content-type": content_type})
    assert (REQUEST_ID_HEADER, REQUEST_ID) in decision.headers.set
    assert decision.response_body_mode is mode


def _stream_body(golden: Callable[[str], bytes], include_usage: bool) -> bytes:
    doc = orjson.loads(golden("openai_chat.request.json"))
    doc["stream"] = True
    if include_usage:
        doc["stream_options"] = {"include_usage": True}
    return orjson.dumps(doc)


@pytest.mark.parametrize(("setting", "include_usage", "passes"), [
    (True, True, True),     # the client asked for usage: nothing to rewrite
    (True, False, False),   # Tollgate asked for it and hides the chunk again: held
    (False, True, False),   # the setting is off: every stream is held
])
def test_a_stream_passes_through_only_when_nothing_in_it_changes(
    snapshot: Snapshot, golden: Callable[[str], bytes], setting: bool, include_usage: bool,
    passes: bool,
) -> None:
    options = dataclasses.replace(DEFAULT, stream_passthrough=setting)
    exchange, _ = send_request(snapshot, request_headers(), _stream_body(golden, include_usage),
                               options)
    decision = exchange.on_response_headers({":status": "200",
                                             "content-type": "text/event-stream"})
    assert exchange.passthrough is passes
    assert (("x-tollgate-stream", "passthrough") in decision.headers.set) is passes
    # Held: the body comes to the extproc chunk by chunk; passthrough: Envoy's default, NONE.
    assert decision.response_body_mode is (None if passes else BodyMode.STREAMED)


def test_a_providers_own_passthrough_marker_never_reaches_the_client(
    snapshot: Snapshot, golden: Callable[[str], bytes],
) -> None:
    exchange, _ = send_request(snapshot, request_headers(), _stream_body(golden, False))
    decision = exchange.on_response_headers({":status": "200",
                                             "content-type": "text/event-stream",
                                             "x-tollgate-stream": "passthrough"})
    assert exchange.passthrough is False
    assert "x-tollgate-stream" in decision.headers.remove
    assert decision.response_body_mode is BodyMode.STREAMED


# ---- response body ---------------------------------------------------------------------------


def _respond(
    snapshot: Snapshot,
    path: str,
    request_body: bytes,
    response_body: bytes,
    options: Options = DEFAULT,
) -> tuple[Exchange, Continue]:
    exchange, decision = send_request(snapshot, request_headers(path), request_body, options)
    assert isinstance(decision, Continue), decision
    head = exchange.on_response_headers({":status": "200", "content-type": "application/json"})
    assert head.response_body_mode is BodyMode.BUFFERED
    exchange.admitted = True
    exchange.on_response_body(response_body)
    # No limits apply in these snapshots: the settlement reports no limit states.
    return exchange, exchange.response_body_reply(response_body, ())


@pytest.mark.parametrize(
    ("path", "name", "model", "usage", "input_nanos", "output_nanos"),
    [
        # (tokens * $ per 1M tokens = micro-dollars; * 1000 = nano-dollars, exact)
        # gpt-5-mini {input: 0.25, cachedInput: 0.025, output: 2.00}:
        # in: (1289 - 1152) * 0.25 = 34.25, 1152 * 0.025 = 28.8; 63.05 micro = 63_050 n$
        # out: 136 * 2.00 = 272 (the 128 reasoning tokens at the output rate)
        (CHAT_PATH, "openai_chat", None,
         Usage(input=1289, output=136, cached_input=1152, reasoning=128), 63_050, 272_000),
        # gpt-5-mini: in (1310 - 1024) * 0.25 = 71.5, 1024 * 0.025 = 25.6; 97.1 micro
        # out: 72 * 2.00 = 144
        ("/v1/responses", "openai_responses", None,
         Usage(input=1310, output=72, cached_input=1024, reasoning=64), 97_100, 144_000),
        # gpt-3.5-turbo-instruct {input: 1.50, output: 2.00}: 9 * 1.5 = 13.5; 21 * 2 = 42
        ("/v1/completions", "openai_completions", None, Usage(input=9, output=21),
         13_500, 42_000),
        # text-embedding-3-small {input: 0.02, output: 0}: 9 * 0.02 = 0.18 micro = 180 n$
        ("/v1/embeddings", "openai_embeddings", None, Usage(input=9), 180, 0),
        # claude-sonnet-4-5 {input: 3.00, cachedInput: 0.30, cacheWrite: 3.75, output: 15.00}:
        # in: 23 * 3 = 69, 2048 * 0.30 = 614.4, 1536 * 3.75 = 5760; 6443.4 micro
        # out: 19 * 15 = 285
        (MESSAGES_PATH, "anthropic_messages", "claude-sonnet-4-5-20250929",
         Usage(input=3607, output=19, cached_input=2048, cache_write=1536), 6_443_400, 285_000),
    ],
)
def test_response_is_priced(
    snapshot: Snapshot,
    golden: Callable[[str], bytes],
    path: str,
    name: str,
    model: str | None,
    usage: Usage,
    input_nanos: int,
    output_nanos: int,
) -> None:
    request_body = golden(f"{name}.request.json")
    if model is not None:
        request_body = _with_model(request_body, model)
    model = orjson.loads(request_body)["model"]
    response_body = golden(f"{name}.response.json")
    exchange, decision = _respond(snapshot, path, request_body, response_body)
    total = input_nanos + output_nanos

    headers = dict(decision.headers.set)
    assert headers["x-tollgate-cost"] == format_nanos(total)
    assert headers["x-tollgate-cost-input"] == format_nanos(input_nanos)
    assert headers["x-tollgate-cost-output"] == format_nanos(output_nanos)
    assert headers["x-tollgate-input-tokens"] == str(usage.input)
    assert headers["x-tollgate-output-tokens"] == str(usage.output)
    assert headers["x-tollgate-total-tokens"] == str(usage.input + usage.output)
    assert headers.get("x-tollgate-cached-input-tokens") == (
        str(usage.cached_input) if usage.cached_input else None
    )
    assert headers.get("x-tollgate-cache-write-tokens") == (
        str(usage.cache_write) if usage.cache_write else None
    )
    assert headers.get("x-tollgate-reasoning-tokens") == (
        str(usage.reasoning) if usage.reasoning else None
    )
    assert "x-tollgate-warning" not in headers

    assert decision.body is not None
    doc = orjson.loads(decision.body)
    result = doc.pop("xproxy_result")
    assert doc == orjson.loads(response_body)  # the provider's fields are intact
    assert result["cost_nanos"] == {"input": input_nanos, "output": output_nanos,
                                     "total": total}
    assert result["usage"]["input_tokens"] == usage.input
    assert result["usage"]["output_tokens"] == usage.output
    assert (result["model"], result["key"], result["priced"], result["request_id"]) == (
        model, "main", True, REQUEST_ID
    )
    assert result["upstream"] == ("anthropic" if path == MESSAGES_PATH else "openai")
    assert exchange.priced is not None and exchange.priced.usage == usage


def test_unknown_model_is_priced_at_zero_with_a_warning(
    snapshot: Snapshot, golden: Callable[[str], bytes]
) -> None:
    # the golden Anthropic request, for a model builtin.yaml does not price; no Block limit
    # applies, so the default policy lets it through at zero, reported
    request = orjson.loads(golden("anthropic_messages.request.json"))
    request["model"] = "claude-unpriced-9"
    _, decision = _respond(
        snapshot, MESSAGES_PATH, orjson.dumps(request),
        golden("anthropic_messages.response.json"),
    )
    headers = dict(decision.headers.set)
    assert headers["x-tollgate-cost"] == "0.000000000"
    assert "unknown-model-priced-at-zero" in headers["x-tollgate-warning"]
    assert headers["x-tollgate-input-tokens"] == "3607"  # usage is still reported
    assert decision.body is not None
    result = orjson.loads(decision.body)["xproxy_result"]
    assert result["priced"] is False
    assert result["cost_nanos"]["total"] == 0
    assert "unknown-model-priced-at-zero" in result["warnings"]


def test_response_without_usage_is_flagged(snapshot: Snapshot) -> None:
    request = orjson.dumps({"model": "gpt-4o", "messages": MSG})
    _, decision = _respond(snapshot, CHAT_PATH, request, b'{"id": "x", "choices": []}')
    headers = dict(decision.headers.set)
    assert headers["x-tollgate-warning"] == "no-usage-in-response"
    assert headers["x-tollgate-cost"] == "0.000000000"
    assert headers["x-tollgate-total-tokens"] == "0"


def test_result_object_can_be_disabled(
    snapshot: Snapshot, golden: Callable[[str], bytes]
) -> None:
    _, decision = _respond(
        snapshot, CHAT_PATH, golden("openai_chat.request.json"),
        golden("openai_chat.response.json"), Options(result_object=False),
    )
    assert decision.body is None  # the body goes to the client untouched
    # same gpt-5-mini arithmetic as above: 63.05 + 272 = 335.05 micro-dollars
    assert dict(decision.headers.set)["x-tollgate-cost"] == "0.000335050"


def test_non_object_json_body_is_left_alone(snapshot: Snapshot) -> None:
    request = orjson.dumps({"model": "gpt-4o", "messages": MSG})
    _, decision = _respond(snapshot, CHAT_PATH, request, b"[1, 2, 3]")
    assert decision.body is None
    assert "x-tollgate-cost" in dict(decision.headers.set)


# ---- error bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "anthropic"), [(MESSAGES_PATH, True), (CHAT_PATH, False)])
def test_deny_body_style_follows_the_api(snapshot: Snapshot, path: str, anthropic: bool) -> None:
    exchange, decision = open_exchange(snapshot, request_headers(path, key=None))
    assert isinstance(decision, Deny)
    assert exchange.anthropic_style is anthropic
    doc = orjson.loads(decision.body(exchange.anthropic_style))
    assert doc["error"] == {
        "message": decision.message,
        "type": "authentication_error",
        "code": "missing_api_key",
    }
    if anthropic:
        assert doc["type"] == "error"
    else:
        assert "type" not in doc


def test_client_anthropic_version_is_kept(
    snapshot: Snapshot, golden: Callable[[str], bytes]
) -> None:
    headers = {**request_headers(MESSAGES_PATH, via="x-api-key"), "anthropic-version": "2099-01-01"}
    _, decision = send_request(snapshot, headers, golden("anthropic_messages.request.json"))
    assert isinstance(decision, Continue), decision
    assert "anthropic-version" not in dict(decision.headers.set)
    assert "anthropic-version" not in decision.headers.remove


def test_azure_client_without_an_azure_upstream_is_told_so(
    builtin_resources: list[Resource],
) -> None:
    keys_only = [r for r in STORED if r.kind == "VirtualKey"]
    plain = build_snapshot(1, builtin_resources, keys_only, SECRETS.get)
    _, decision = send_request(
        plain, request_headers(AZURE_PATH.format("gpt-4o")), orjson.dumps({"messages": MSG})
    )
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (404, "model_not_found")
    assert "No Azure OpenAI upstream is configured" in decision.message


def test_an_alias_is_served_without_listing_it_in_models(
    builtin_resources: list[Resource],
) -> None:
    aliased = _resource("Upstream", "east", {
        "provider": "openai", "cluster": "east", "models": ["gpt-4o", "gpt-4o-mini"],
        "priority": 10, "aliases": {"quick": "gpt-4o-mini"},
        "credentials": [_cred("d", "OPENAI_API_KEY")],
    })
    snap = build_snapshot(1, builtin_resources, [*STORED[:1], aliased], SECRETS.get)
    _, decision = send_request(snap, request_headers(),
                               orjson.dumps({"model": "quick", "messages": MSG}))
    assert isinstance(decision, Continue), decision
    assert dict(decision.headers.set)[ROUTING_HEADER] == "east"
    assert decision.body is not None and orjson.loads(decision.body)["model"] == "gpt-4o-mini"


def test_a_glob_alias_serves_every_matching_name_as_its_target(
    builtin_resources: list[Resource],
) -> None:
    aliased = _resource("Upstream", "east", {
        "provider": "openai", "cluster": "east", "models": ["gpt-4o"],
        "priority": 10, "aliases": {"fast*": "gpt-4o-mini", "fast-exact": "gpt-4o"},
        "credentials": [_cred("d", "OPENAI_API_KEY")],
    })
    snap = build_snapshot(1, builtin_resources, [*STORED[:1], aliased], SECRETS.get)
    for name, target in (("fast", "gpt-4o-mini"), ("fast-v2", "gpt-4o-mini"),
                         ("fast-exact", "gpt-4o")):
        _, decision = send_request(snap, request_headers(),
                                   orjson.dumps({"model": name, "messages": MSG}))
        assert isinstance(decision, Continue), decision
        assert dict(decision.headers.set)[ROUTING_HEADER] == "east"
        assert decision.body is not None and orjson.loads(decision.body)["model"] == target


def test_the_next_upstream_is_tried_when_the_first_has_no_credential(
    builtin_resources: list[Resource],
) -> None:
    primary = _resource("Upstream", "primary", {
        "provider": "openai-compatible", "cluster": "east", "models": ["shared-*"],
        "priority": 1, "credentials": [_cred("gone", "NOT_SET_ANYWHERE")],
    })
    backup = _resource("Upstream", "backup", {
        "provider": "openai", "cluster": "west", "models": ["shared-*"], "priority": 2,
        "aliases": {"shared-fast": "gpt-4o-mini"},
        "credentials": [_cred("d", "OPENAI_API_KEY")],
    })
    snap = build_snapshot(1, builtin_resources, [*STORED[:1], primary, backup], SECRETS.get)
    assert [u.name for u in snap.upstreams_for(Endpoint.CHAT, "shared-fast", False)] == [
        "primary", "backup"]  # the built-in `*` upstream is no backup
    exchange, decision = send_request(snap, request_headers(),
                                      orjson.dumps({"model": "shared-fast", "messages": MSG}))
    assert not isinstance(decision, Deny), decision
    assert exchange.upstream is not None and exchange.upstream.name == "backup"
    proceed = decision.proceed if not isinstance(decision, Continue) else decision
    assert dict(proceed.headers.set)[ROUTING_HEADER] == "west"
    assert proceed.body is not None and orjson.loads(proceed.body)["model"] == "gpt-4o-mini"


def test_a_denied_model_is_refused_whatever_the_key_allows(snapshot: Snapshot) -> None:
    options = Options(denied_models=("gpt-4o-m*",))
    _, decision = send_request(snapshot, request_headers(),
                               orjson.dumps({"model": "gpt-4o-mini", "messages": MSG}), options)
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code) == (403, "model_denied")
    _, allowed = send_request(snapshot, request_headers(),
                              orjson.dumps({"model": "gpt-4o", "messages": MSG}), options)
    assert not isinstance(allowed, Deny)


def _keyed_snapshot(builtin: list[Resource], key: str, allowed: list[str],
                    *extra: Resource) -> Snapshot:
    return build_snapshot(1, builtin, [
        *STORED, *extra,
        _resource("VirtualKey", "restricted", {"keySha256": hash_key(key),
                                               "allowedUpstreams": allowed}),
    ], SECRETS.get)


def test_allowed_upstreams_restrict_routing_to_those_upstreams(
    builtin_resources: list[Resource],
) -> None:
    """`allowedUpstreams`: the forbidden pool of a model is skipped for its allowed backup;
    a model only a forbidden Upstream serves is a 403 in the dialect's shape (Anthropic's
    on /v1/messages), never the built-in `*` route nobody chose for it."""
    key = "tg-" + "u" * 43
    pool = _resource("Upstream", "pool", {
        "provider": "openai", "cluster": "east", "models": ["shared-*"], "priority": 1,
        "credentials": [_cred("a", "OPENAI_API_KEY")]})
    backup = _resource("Upstream", "backup", {
        "provider": "openai", "cluster": "west", "models": ["shared-*"], "priority": 2,
        "credentials": [_cred("b", "OPENAI_API_KEY")]})
    snap = _keyed_snapshot(builtin_resources, key, ["back*", "anthropic"], pool, backup)
    exchange, decision = send_request(snap, request_headers(key=key),
                                      orjson.dumps({"model": "shared-1", "messages": MSG}))
    assert not isinstance(decision, Deny), decision
    assert exchange.upstream is not None and exchange.upstream.name == "backup"
    assert exchange.backups == []
    # gpt-4o is served by the built-in openai Upstream only, which this key may not use
    _, refused = send_request(snap, request_headers(key=key),
                              orjson.dumps({"model": "gpt-4o", "messages": MSG}))
    assert isinstance(refused, Deny)
    assert (refused.status, refused.code) == (403, "upstream_not_allowed")
    assert "gpt-4o" in refused.message
    # only the built-in `*` route serves claude-x on chat/completions: forbidden too
    only_pool = _keyed_snapshot(builtin_resources, key, ["pool"], pool)
    _, missing = send_request(only_pool, request_headers(key=key),
                              orjson.dumps({"model": "claude-x", "messages": MSG}))
    assert isinstance(missing, Deny) and missing.status == 403  # openai `*` serves it
    # the same refusal on Anthropic's path, in Anthropic's error shape
    exchange, refused = send_request(
        only_pool, request_headers(MESSAGES_PATH, key=key, via="x-api-key"),
        orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": MSG}))
    assert isinstance(refused, Deny) and refused.code == "upstream_not_allowed"
    body = orjson.loads(exchange.error_body(refused))
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"


def test_allowed_upstreams_keep_the_default_route_when_allowed(
    builtin_resources: list[Resource],
) -> None:
    """A key allowed only the built-in `openai` Upstream reaches gpt-4o through it even where
    a more specific pool (which it may not use) serves the model."""
    key = "tg-" + "v" * 43
    pool = _resource("Upstream", "pool", {
        "provider": "openai", "cluster": "east", "models": ["gpt-4o"], "priority": 1,
        "credentials": [_cred("a", "OPENAI_API_KEY")]})
    snap = _keyed_snapshot(builtin_resources, key, ["openai"], pool)
    exchange, decision = send_request(snap, request_headers(key=key),
                                      orjson.dumps({"model": "gpt-4o", "messages": MSG}))
    assert not isinstance(decision, Deny), decision
    assert exchange.upstream is not None and exchange.upstream.name == "openai"


def test_models_lists_what_routing_reaches_for_the_key(
    builtin_resources: list[Resource],
) -> None:
    """/v1/models follows routing: a key allowed only the `second` Upstream lists its aliases
    and exact models (not a priced gpt-4o it cannot reach), a key allowed only `openai` lists
    no `claude-*` (the built-in `*` route does not make a Claude model OpenAI's), an alias to a
    denied model is not listed, a glob alias is not (its target is), and /v1/models/{id} agrees
    with the list."""
    key = "tg-" + "w" * 43
    second = _resource("Upstream", "second", {
        "provider": "openai-compatible", "cluster": "second", "models": ["special-*", "solo"],
        "aliases": {"fast2": "special-large", "bad": "o1-pro", "turbo*": "special-small"},
        "credentials": [_cred("d", "OPENAI_API_KEY")]})
    options = Options(denied_models=("o1-pro*",))
    snap = _keyed_snapshot(builtin_resources, key, ["second"], second)
    _, reply = open_exchange(snap, request_headers("/v1/models", method="GET", key=key),
                             options=options)
    assert _model_ids(reply) == ["fast2", "special-small", "solo"]
    _, found = open_exchange(snap, request_headers("/v1/models/solo", method="GET", key=key),
                             options=options)
    assert isinstance(found, Reply) and orjson.loads(found.body)["id"] == "solo"
    _, missing = open_exchange(snap, request_headers("/v1/models/gpt-4o", method="GET",
                                                     key=key), options=options)
    assert isinstance(missing, Deny) and missing.status == 404
    only_openai = _keyed_snapshot(builtin_resources, key, ["openai"])
    _, reply = open_exchange(only_openai, request_headers("/v1/models", method="GET", key=key))
    ids = _model_ids(reply)
    assert "gpt-4o" in ids and "text-embedding-3-small" in ids
    assert not [i for i in ids if i.startswith(("claude-", "gemini-"))]
    only_anthropic = _keyed_snapshot(builtin_resources, key, ["anthropic"])
    _, reply = open_exchange(only_anthropic, request_headers("/v1/models", method="GET",
                                                             key=key))
    ids = _model_ids(reply)
    assert ids and all(i.startswith("claude-") for i in ids)


def test_envoys_own_error_keeps_the_request_id_its_body_names(snapshot: Snapshot) -> None:
    """Envoy answered (e.g. a 413 from its buffer limit) while the request headers were still at
    the extproc: the reply's body and header carry Envoy's stream id, and the extproc's
    response phase leaves that header, so the client reads one id."""
    exchange, _ = open_exchange(snapshot, request_headers())
    reply = exchange.on_response_headers({":status": "413", "content-type": "application/json",
                                          "x-tollgate-request-id": "envoy-stream-7"})
    assert "x-tollgate-request-id" not in dict(reply.headers.set)
    # A reply without one (Envoy's route 404) gets Tollgate's id, as before.
    reply = exchange.on_response_headers({":status": "404"})
    assert dict(reply.headers.set)["x-tollgate-request-id"] == REQUEST_ID
