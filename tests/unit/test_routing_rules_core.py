"""Routing rules that restrict or name what a key reaches: an Upstream's `allowedGroups`, glob
aliases in the models list, Gemini's own models list, and which statuses rest a credential."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.core.decisions import Deny
from extproc.core.exchange import Exchange, Reply
from extproc.core.keys import hash_key, may_route
from extproc.core.providers.gemini import page_request
from extproc.core.resources import (
    DEFAULT_COOLDOWN_STATUSES,
    Resource,
    ResourceError,
    key_record,
    upstream_spec,
)
from extproc.core.snapshot import Snapshot, build_snapshot
from tests.unit.test_exchange import (
    MSG,
    SECRETS,
    STORED,
    _cred,
    _resource,
    open_exchange,
    request_headers,
    send_request,
)

pytestmark = pytest.mark.unit

DEV_KEY = "tg-" + "d" * 43
OPS_KEY = "tg-" + "o" * 43
OTHER_NS_KEY = "tg-" + "x" * 43
STUCK_KEY = "tg-" + "s" * 43


def _namespaced(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> Resource:
    plain = _resource(kind, name, spec)
    return Resource(plain.kind, plain.name, plain.spec, namespace)


def _group_snapshot(builtin: list[Resource], *extra: Resource) -> Snapshot:
    """`private` (priority 1) serves gpt-4o to the `dev` group only; the built-in openai `*`
    Upstream serves it to everyone else."""
    private = _resource("Upstream", "private", {
        "provider": "openai", "cluster": "private", "models": ["gpt-4o", "team-*"],
        "priority": 1, "allowedGroups": ["dev"],
        "credentials": [_cred("d", "OPENAI_API_KEY")]})
    return build_snapshot(1, builtin, [
        *STORED, private, *extra,
        _resource("VirtualKey", "dev", {"keySha256": hash_key(DEV_KEY), "group": "dev"}),
        _resource("VirtualKey", "ops", {"keySha256": hash_key(OPS_KEY), "group": "ops"}),
        _namespaced("VirtualKey", "far", "team-b",
                    {"keySha256": hash_key(OTHER_NS_KEY), "group": "dev"}),
    ], SECRETS.get)


def _routed_to(snapshot: Snapshot, key: str, model: str) -> str | Deny:
    exchange, decision = send_request(snapshot, request_headers(key=key),
                                      orjson.dumps({"model": model, "messages": MSG}))
    if isinstance(decision, Deny):
        return decision
    assert exchange.upstream is not None
    return exchange.upstream.name


def _ids(reply: object) -> list[str]:
    assert isinstance(reply, Reply) and reply.status == 200, reply
    return [m["id"] for m in orjson.loads(reply.body)["data"]]


def test_allowed_groups_validate_and_qualify_bare_groups_in_the_upstreams_namespace() -> None:
    spec = {"provider": "openai", "cluster": "c", "allowedGroups": ["dev*", "team-b/ops",
                                                                     "*/sre"]}
    upstream = upstream_spec(_namespaced("Upstream", "u", "team-a", spec))
    assert upstream.allowed_groups == (("team-a", "dev*"), ("team-b", "ops"), ("*", "sre"))
    with pytest.raises(ResourceError, match="allowedGroups"):
        _resource("Upstream", "bad", {"provider": "openai", "cluster": "c",
                                      "allowedGroups": ["a/b/c"]})
    with pytest.raises(ResourceError, match="allowedGroups"):
        _resource("Upstream", "bad", {"provider": "openai", "cluster": "c",
                                      "allowedGroups": [""]})


def test_may_route_needs_both_the_key_and_the_upstream_to_agree() -> None:
    def key(group: str, namespace: str = "default", allowed: tuple[str, ...] = ()) -> Any:
        spec = {"keySha256": "0" * 64, "group": group, "allowedUpstreams": list(allowed)}
        return key_record(_namespaced("VirtualKey", "k", namespace, spec))

    open_to_all = upstream_spec(_resource("Upstream", "all", {"provider": "openai",
                                                              "cluster": "c"}))
    devs = upstream_spec(_resource("Upstream", "devs", {
        "provider": "openai", "cluster": "c", "allowedGroups": ["dev", "*/sre"]}))
    assert may_route(key(""), open_to_all) and may_route(key("x", "team-b"), open_to_all)
    assert may_route(key("dev"), devs) and not may_route(key("ops"), devs)
    assert not may_route(key(""), devs)  # a key without a group is in no group
    assert not may_route(key("dev", "team-b"), devs)  # bare `dev`: the default namespace's
    assert may_route(key("sre", "team-b"), devs) and may_route(key("sre"), devs)
    assert not may_route(key("dev", allowed=("all",)), devs)  # the key's own list says no


def test_allowed_groups_route_the_groups_keys_and_pass_the_others_to_the_default_route(
    builtin_resources: list[Resource],
) -> None:
    snap = _group_snapshot(builtin_resources)
    assert _routed_to(snap, DEV_KEY, "gpt-4o") == "private"
    assert _routed_to(snap, OPS_KEY, "gpt-4o") == "openai"  # as if `private` did not exist
    assert _routed_to(snap, OTHER_NS_KEY, "gpt-4o") == "openai"  # team-b's dev is not dev
    assert _routed_to(snap, DEV_KEY, "team-1") == "private"
    # for the others, `team-1` is a name like any other: the default route's (as with a key's
    # allowedUpstreams that allows `openai`)
    assert _routed_to(snap, OPS_KEY, "team-1") == "openai"
    # a key that may use only `private`, of a group `private` does not take: 403, before any
    # reservation, in the dialect's shape
    snap = _group_snapshot(builtin_resources, _resource("VirtualKey", "stuck", {
        "keySha256": hash_key(STUCK_KEY), "group": "ops", "allowedUpstreams": ["private"]}))
    refused = _routed_to(snap, STUCK_KEY, "gpt-4o")
    assert isinstance(refused, Deny) and (refused.status, refused.code) == (
        403, "upstream_not_allowed")


def test_allowed_groups_shape_the_models_list(builtin_resources: list[Resource]) -> None:
    snap = _group_snapshot(builtin_resources, _resource("Upstream", "named", {
        "provider": "openai", "cluster": "named", "models": ["dev-only"],
        "allowedGroups": ["dev"], "credentials": [_cred("d", "OPENAI_API_KEY")]}))
    _, dev = open_exchange(snap, request_headers("/v1/models", method="GET", key=DEV_KEY))
    _, ops = open_exchange(snap, request_headers("/v1/models", method="GET", key=OPS_KEY))
    assert "dev-only" in _ids(dev) and "dev-only" not in _ids(ops)
    assert "gpt-4o" in _ids(ops)  # through the built-in route
    _, missing = open_exchange(snap, request_headers("/v1/models/dev-only", method="GET",
                                                     key=OPS_KEY))
    assert isinstance(missing, Deny) and missing.status == 404


def test_glob_aliases_list_their_targets_and_retrieve_answers_the_names_they_match(
    builtin_resources: list[Resource],
) -> None:
    """`turbo*` is no model id: not listed. Its target is (the key can call it by name), and
    `models.retrieve("turbo-9")` answers `turbo-9` (a call for it would work) unless the key's
    own `models` patterns or the deny list say no."""
    key = "tg-" + "g" * 43
    second = _resource("Upstream", "second", {
        "provider": "openai-compatible", "cluster": "second", "models": ["special-*"],
        "aliases": {"turbo*": "special-small", "old*": "o1-pro"},
        "credentials": [_cred("d", "OPENAI_API_KEY")]})
    snap = build_snapshot(1, builtin_resources, [*STORED, second, _resource(
        "VirtualKey", "g", {"keySha256": hash_key(key), "allowedUpstreams": ["second"]})],
        SECRETS.get)

    def get(path: str) -> object:
        from extproc.core.exchange import Options

        return open_exchange(snap, request_headers(path, method="GET", key=key),
                             options=Options(denied_models=("o1-pro*",)))[1]

    assert _ids(get("/v1/models")) == ["special-small"]
    found = get("/v1/models/turbo-9")
    assert isinstance(found, Reply) and orjson.loads(found.body)["id"] == "turbo-9"
    assert isinstance(get("/v1/models/turbo*"), Reply)  # the pattern itself matches too
    assert isinstance(get("/v1/models/old-1"), Deny)  # its target is denied
    assert isinstance(get("/v1/models/nothing"), Deny)


def _gemini_get(snap: Snapshot, path: str, key: str = DEV_KEY) -> tuple[Exchange, object]:
    return open_exchange(snap, request_headers(path, method="GET", key=key,
                                               via="x-goog-api-key"))


def test_gemini_models_list_and_get_in_googles_shape(builtin_resources: list[Resource]) -> None:
    snap = _group_snapshot(builtin_resources, _resource("Upstream", "g-alias", {
        "provider": "gemini", "cluster": "gemini", "models": ["gemini-*"], "priority": 5,
        "aliases": {"quick": "gemini-2.5-flash-lite"},
        "credentials": [_cred("d", "OPENAI_API_KEY")]}))
    _, reply = _gemini_get(snap, "/v1beta/models")
    assert isinstance(reply, Reply) and reply.status == 200
    doc = orjson.loads(reply.body)
    names = [m["name"] for m in doc["models"]]
    assert "models/gemini-2.5-flash" in names and "models/quick" in names
    assert not [n for n in names if not n.startswith(("models/gemini-", "models/quick"))]
    assert "nextPageToken" not in doc
    flash = next(m for m in doc["models"] if m["name"] == "models/gemini-2.5-flash")
    assert flash["inputTokenLimit"] == 1048576 and flash["outputTokenLimit"] == 65536
    assert "generateContent" in flash["supportedGenerationMethods"]
    embedding = next(m for m in doc["models"] if m["name"] == "models/gemini-embedding-001")
    assert embedding["supportedGenerationMethods"] == ["embedContent", "batchEmbedContents"]
    # pages: the token is where the next page starts
    _, first = _gemini_get(snap, "/v1beta/models?pageSize=2")
    assert isinstance(first, Reply)
    page = orjson.loads(first.body)
    assert [m["name"] for m in page["models"]] == names[:2] and page["nextPageToken"] == "2"
    _, rest = _gemini_get(snap, "/v1beta/models?pageSize=100&pageToken=2")
    assert isinstance(rest, Reply)
    assert [m["name"] for m in orjson.loads(rest.body)["models"]] == names[2:]
    # one model; an alias names its target's limits
    _, one = _gemini_get(snap, "/v1beta/models/quick")
    assert isinstance(one, Reply) and orjson.loads(one.body)["name"] == "models/quick"
    assert orjson.loads(one.body)["outputTokenLimit"] == 65536
    exchange, missing = _gemini_get(snap, "/v1beta/models/gpt-4o")
    assert isinstance(missing, Deny) and missing.status == 404
    assert orjson.loads(exchange.error_body(missing))["error"]["status"] == "NOT_FOUND"
    exchange, bad = _gemini_get(snap, "/v1beta/models?pageSize=x")
    assert isinstance(bad, Deny) and bad.status == 400
    _, posted = open_exchange(snap, request_headers("/v1beta/models", key=DEV_KEY,
                                                    via="x-goog-api-key"))
    assert isinstance(posted, Deny) and posted.status == 405


def test_page_request_reads_size_and_token() -> None:
    assert page_request("", 50, 1000) == (0, 50)
    assert page_request("pageSize=0&pageToken=", 50, 1000) == (0, 50)
    assert page_request("pageSize=5000&pageToken=7", 50, 1000) == (7, 1000)
    assert page_request("pageSize=-1", 50, 1000) is None


def test_anthropics_529_rests_a_credential_wherever_503_does() -> None:
    def statuses(provider: str, cooldown: dict[str, Any] | None = None) -> tuple[int, ...]:
        spec: dict[str, Any] = {"provider": provider, "cluster": "c"}
        if cooldown is not None:
            spec["cooldown"] = cooldown
        return upstream_spec(_resource("Upstream", "u", spec)).cooldown_statuses

    assert statuses("anthropic") == (*DEFAULT_COOLDOWN_STATUSES, 529)
    assert 529 not in statuses("anthropic", {"statuses": [429]})  # as written: no 503
    assert statuses("anthropic", {"statuses": [503, 529]}) == (503, 529)
    assert statuses("openai") == DEFAULT_COOLDOWN_STATUSES
    # a spec stored before the rule (its normalised status list without 529) gets it too
    stored = Resource("Upstream", "old", {"provider": "anthropic", "cluster": "anthropic",
                                          "cooldown": {"statuses": [429, 503]}})
    assert upstream_spec(stored).cooldown_statuses == (429, 503, 529)
