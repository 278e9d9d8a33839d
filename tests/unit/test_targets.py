"""Credentials with their own base URL (core/targets.py): the proxy cluster, `:authority` and
path a call gets, through a real snapshot and exchange."""

from __future__ import annotations

import orjson
import pytest

from extproc.core.decisions import Continue, Deny
from extproc.core.exchange import ROUTING_HEADER, Reserve
from extproc.core.quota import interpret_reservation
from extproc.core.resources import Resource
from extproc.core.snapshot import build_snapshot
from extproc.core.targets import base_url_problem, target_of
from tests.unit.test_exchange import (
    MSG,
    SECRETS,
    STORED,
    _cred,
    _resource,
    request_headers,
    send_request,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("url", "cluster", "authority", "path"), [
    ("http://127.0.0.1:9001", "tollgate_dfp_http", "127.0.0.1:9001", "/v1/chat/completions"),
    ("http://127.0.0.1:9001/v1", "tollgate_dfp_http", "127.0.0.1:9001", "/v1/chat/completions"),
    ("https://llm.example.com/v1/", "tollgate_dfp_https", "llm.example.com",
     "/v1/chat/completions"),
    ("https://gw.example.com:8443/team/v1", "tollgate_dfp_https", "gw.example.com:8443",
     "/team/v1/chat/completions"),
    ("http://[::1]:8000/proxy", "tollgate_dfp_http", "[::1]:8000",
     "/proxy/v1/chat/completions"),
])
def test_a_base_url_names_cluster_authority_and_path(url: str, cluster: str, authority: str,
                                                     path: str) -> None:
    assert base_url_problem(url) is None
    target = target_of(url)
    assert (target.cluster, target.authority, target.path("/v1/chat/completions")) == (
        cluster, authority, path)


def _snapshot(builtin: list[Resource], credentials: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    upstream = _resource("Upstream", "chained", {
        "provider": "openai-compatible", "cluster": "openai", "models": ["chain-*"],
        "priority": 1, "credentials": credentials})
    return build_snapshot(1, builtin, [*STORED, upstream], SECRETS.get)


def test_a_lone_credential_with_a_base_url_goes_to_its_server(
    builtin_resources: list[Resource],
) -> None:
    snap = _snapshot(builtin_resources, [{**_cred("inner", "OPENAI_API_KEY"),
                                          "baseUrl": "http://127.0.0.1:9001/v1"}])
    _, decision = send_request(snap, request_headers(),
                               orjson.dumps({"model": "chain-1", "messages": MSG}))
    assert not isinstance(decision, Deny), decision
    proceed = decision.proceed if isinstance(decision, Reserve) else decision
    assert isinstance(proceed, Continue)
    sets = dict(proceed.headers.set)
    assert sets[ROUTING_HEADER] == "tollgate_dfp_http"
    assert sets[":authority"] == "127.0.0.1:9001"
    assert sets[":path"] == "/v1/chat/completions"
    assert sets["authorization"] == "Bearer sk-up"
    assert [k for k, _ in proceed.headers.set].count(ROUTING_HEADER) == 1


def test_a_pooled_credential_gets_its_own_target_once_chosen(
    builtin_resources: list[Resource],
) -> None:
    """In a pool the reserve script picks the credential; the one with a base URL goes to its
    server, the other to the Upstream's cluster."""
    snap = _snapshot(builtin_resources, [
        {**_cred("far", "OPENAI_API_KEY"), "baseUrl": "https://far.example.com/api/v1"},
        _cred("near", "ANTHROPIC_API_KEY")])
    for chosen, expected in ((1, ("tollgate_dfp_https", "far.example.com",
                                  "/api/v1/chat/completions")),
                             (2, ("openai", None, None))):
        exchange, reserve = send_request(snap, request_headers(),
                                         orjson.dumps({"model": "chain-1", "messages": MSG}))
        assert isinstance(reserve, Reserve), reserve
        reply = [1, 0, 0, 0] + [0, 0] * len(reserve.plan.windows) + [chosen, 1, 0]
        decision = exchange.on_reserved(reserve, interpret_reservation(reserve.plan, reply))
        assert isinstance(decision, Continue)
        sets = dict(decision.headers.set)
        assert (sets[ROUTING_HEADER], sets.get(":authority"), sets.get(":path")) == expected
        assert exchange.proxied is (chosen == 1)
