"""Failover to a backup Upstream, the parts without Envoy: when a failed try moves the call on
(core/retry.py `failover_due`), how the call is sent again for the backup (`Exchange.fail_over`:
the original body and path, the backup's credential and alias, a new request id), the board
that hands the call from its stream to Envoy's re-run (server/failover.py), and the route's
internal redirect policy (envoyconf)."""

from __future__ import annotations

import orjson
import pytest

from extproc import envoyconf
from extproc.core.decisions import Continue
from extproc.core.exchange import ROUTING_HEADER, TRY_HEADER, Exchange, Reserve
from extproc.core.quota import interpret_reservation
from extproc.core.resources import Resource
from extproc.core.retry import failover_due
from extproc.core.snapshot import Snapshot, build_snapshot
from extproc.server.failover import FailoverBoard, Live
from tests.unit.test_exchange import (
    MSG,
    REQUEST_ID,
    SECRETS,
    STORED,
    _cred,
    _resource,
    request_headers,
    send_request,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def snapshot(builtin_resources: list[Resource]) -> Snapshot:
    primary = _resource("Upstream", "east", {
        "provider": "openai-compatible", "cluster": "east", "models": ["shared-*"],
        "priority": 1, "credentials": [_cred("e", "OPENAI_API_KEY")],
    })
    backup = _resource("Upstream", "west", {
        "provider": "openai", "cluster": "west", "models": ["shared-*"], "priority": 2,
        "aliases": {"shared-fast": "gpt-4o-mini"},
        "credentials": [_cred("w", "ANTHROPIC_API_KEY")],
    })
    return build_snapshot(1, builtin_resources, [*STORED[:1], primary, backup], SECRETS.get)


def admitted(snapshot: Snapshot, path: str = "/v1/chat/completions") -> tuple[Exchange, bytes]:
    """A call to `east` (one credential, a backup: pooled), sent out with its credential."""
    body = orjson.dumps({"model": "shared-fast", "messages": MSG})
    exchange, decision = send_request(snapshot, request_headers(path=path), body)
    assert isinstance(decision, Reserve), decision
    proceed = exchange.on_reserved(decision, interpret_reservation(
        decision.plan, [1, 0, 0, 0, 1, 1, 0]))
    assert isinstance(proceed, Continue)
    assert exchange.upstream is not None and exchange.upstream.name == "east"
    return exchange, body


def test_a_call_with_a_backup_names_itself_to_the_failed_try_filter(snapshot: Snapshot) -> None:
    exchange, _ = admitted(snapshot)
    assert exchange.retries == 0  # one credential: not retried, but it may fail over
    assert [u.name for u in exchange.backups] == ["west"]
    assert exchange.credential is not None and exchange.credential.name == "e"


def test_only_a_retryable_failure_of_the_last_try_fails_over(snapshot: Snapshot) -> None:
    exchange, _ = admitted(snapshot)
    assert exchange.plan is not None
    now = exchange.plan.now_ms
    assert failover_due(exchange, 429, 1, now)
    assert failover_due(exchange, 503, 1, now)
    assert not failover_due(exchange, 400, 1, now)  # the request's own fault: everywhere
    assert not failover_due(exchange, 404, 1, now)
    assert not failover_due(exchange, 429, 1, now + 30_001)  # past the retry deadline
    exchange.retries = 1
    assert not failover_due(exchange, 429, 1, now)  # Envoy retries on the next credential
    assert failover_due(exchange, 429, 2, now)
    exchange.backups = []
    assert not failover_due(exchange, 429, 2, now)


def test_the_backup_gets_its_own_body_credential_and_route_under_a_new_id(
    snapshot: Snapshot,
) -> None:
    exchange, _ = admitted(snapshot)
    step = exchange.fail_over("next-id", 1_767_225_600.0)
    # No limit and no backup left: nothing to reserve, the credential goes at once.
    assert isinstance(step, Continue), step
    assert exchange.request_id == "next-id" and exchange.upstream is not None
    assert exchange.upstream.name == "west" and exchange.backups == []
    sets = dict(step.headers.set)
    assert sets[ROUTING_HEADER] == "west"
    assert sets[":path"] == "/v1/chat/completions"
    assert sets["authorization"] == "Bearer sk-ant"
    assert TRY_HEADER not in sets  # no backup left: nothing to name
    assert step.body is not None
    assert orjson.loads(step.body)["model"] == "gpt-4o-mini"  # the backup's alias
    assert exchange.status == 0 and not exchange.settled and not exchange.admitted
    assert exchange.fail_over("third", 1_767_225_600.0) is None  # no backup left


def test_the_body_the_client_sent_goes_again_when_the_backup_does_not_rewrite_it(
    builtin_resources: list[Resource],
) -> None:
    # east rewrites (alias), west does not: Envoy would replay east's body.
    east = _resource("Upstream", "east", {
        "provider": "openai", "cluster": "east", "models": ["shared-*"], "priority": 1,
        "aliases": {"shared-fast": "gpt-4o-mini"}, "credentials": [_cred("e", "OPENAI_API_KEY")],
    })
    west = _resource("Upstream", "west", {
        "provider": "openai", "cluster": "west", "models": ["shared-*"], "priority": 2,
        "credentials": [_cred("w", "ANTHROPIC_API_KEY")],
    })
    snap = build_snapshot(1, builtin_resources, [*STORED[:1], east, west], SECRETS.get)
    exchange, body = admitted(snap)
    step = exchange.fail_over("next-id", 1_767_225_600.0)
    proceed = step.proceed if isinstance(step, Reserve) else step
    assert isinstance(proceed, Continue)
    assert proceed.body == body


def test_the_board_hands_a_call_over_once_and_releases_its_hold(snapshot: Snapshot) -> None:
    released: list[tuple[str, int]] = []
    board = FailoverBoard(release=lambda live, status: released.append(
        (live.exchange.request_id, status)))
    exchange, _ = admitted(snapshot)
    first, second = object(), object()
    board.register(exchange, first, 0.0)
    live = board.find(REQUEST_ID)
    assert isinstance(live, Live) and live.exchange is exchange
    nonce = board.hand_over(live, 429)
    assert released == [(REQUEST_ID, 429)]  # before the re-run reserves for the backup
    assert len(nonce) == 32 and board.find(REQUEST_ID) is None
    assert board.take("forged") is None
    assert board.take(nonce) is live
    assert board.take(nonce) is None  # once
    # The failed stream ends: it settles nothing (the re-run does).
    assert board.leave(exchange, first)
    # The re-run registers the call again under its new id, and leaves normally.
    exchange.request_id = "next-id"
    board.register(exchange, second, 0.0)
    assert not board.leave(exchange, second)
    assert board.find("next-id") is None and not board.moved


def test_the_route_follows_only_the_failover_redirect() -> None:
    config = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    policy = route["internal_redirect_policy"]
    assert policy["redirect_response_codes"] == [307]
    assert policy["response_headers_to_copy"] == [envoyconf.FAILOVER_HEADER]
    assert policy["max_internal_redirects"] == envoyconf.MAX_FAILOVERS


def test_concurrent_retries_of_a_cluster_are_not_capped_at_envoys_default() -> None:
    # Envoy's default circuit breaker allows 3 concurrent retries per cluster: past that, a
    # failed try goes to the client unretried, and the failover after the last try never comes.
    config = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    for cluster in config["static_resources"]["clusters"]:
        for threshold in cluster.get("circuit_breakers", {}).get("thresholds", []):
            assert threshold["max_retries"] >= 10_000
