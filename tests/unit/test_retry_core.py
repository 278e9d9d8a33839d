"""Retry on the next credential, the pure part: what the exchange tells Envoy and the per-try
filter (`x-envoy-max-retries`, `x-tollgate-try`), what the per-try filter reads back
(core/retry.py), and how the answer of a retry is settled for the credential that gave it."""

from __future__ import annotations

import orjson
import pytest

from extproc.core.decisions import Continue
from extproc.core.exchange import (
    ANSWERED_BY_HEADER,
    MAX_RETRIES_HEADER,
    TRY_HEADER,
    Exchange,
    Options,
    Reserve,
)
from extproc.core.quota import interpret_reservation
from extproc.core.resources import Resource
from extproc.core.retry import deadline_passed, parse_try
from extproc.core.snapshot import Snapshot, build_snapshot
from tests.unit.test_exchange import (
    MSG,
    REQUEST_ID,
    SECRETS,
    STORED,
    _resource,
    open_exchange,
    request_headers,
    send_request,
)

pytestmark = pytest.mark.unit
DEFAULT = Options()


@pytest.fixture(scope="module")
def snapshot(builtin_resources: list[Resource]) -> Snapshot:
    return build_snapshot(1, builtin_resources, STORED, SECRETS.get)


def admitted(snapshot: Snapshot, options: Options = DEFAULT,
             extra: dict[str, str] | None = None) -> tuple[Exchange, Continue]:
    """A call to the "primary" Upstream (a pool: p, then fallback fb) that the reserve script
    sent out with p."""
    exchange, decision = send_request(
        snapshot, request_headers(extra=extra),
        orjson.dumps({"model": "primary-1", "messages": MSG}), options)
    assert isinstance(decision, Reserve), decision
    proceed = exchange.on_reserved(decision, interpret_reservation(
        decision.plan, [1, 0, 0, 0, 1, 1, 0]))
    assert isinstance(proceed, Continue)
    return exchange, proceed


def test_a_pooled_call_may_be_retried_on_the_other_credentials(snapshot: Snapshot) -> None:
    exchange, proceed = admitted(snapshot)
    sets = dict(proceed.headers.set)
    assert sets["authorization"] == "Bearer sk-up"
    assert sets[MAX_RETRIES_HEADER] == "1"  # two credentials: one more try at most
    assert exchange.plan is not None
    deadline = exchange.plan.now_ms + 30_000
    assert sets[TRY_HEADER] == (f"{REQUEST_ID} {exchange.plan.estimate_tokens} {deadline} "
                                "primary primary-1")
    assert "sk-" not in sets[TRY_HEADER]  # never a secret


def test_retries_are_bounded_by_the_setting(snapshot: Snapshot) -> None:
    _, proceed = admitted(snapshot, Options(max_retries=0))
    sets = dict(proceed.headers.set)
    assert MAX_RETRIES_HEADER not in sets and TRY_HEADER not in sets


def test_a_call_with_one_credential_is_never_retried(snapshot: Snapshot) -> None:
    # Envoy's route says 0 retries; only the extproc's header raises it.
    _, decision = send_request(snapshot, request_headers(),
                               orjson.dumps({"model": "gpt-4o", "messages": MSG}))
    headers = decision.proceed.headers if isinstance(decision, Reserve) else decision.headers
    assert MAX_RETRIES_HEADER not in dict(headers.set)


def test_a_client_cannot_ask_for_retries_or_name_a_credential(snapshot: Snapshot) -> None:
    extra = {MAX_RETRIES_HEADER: "9", "x-envoy-retry-on": "4xx",
             "x-envoy-retriable-status-codes": "400", TRY_HEADER: "x 1 9 primary primary-1",
             "x-envoy-upstream-rq-per-try-timeout-ms": "1"}
    _, first = open_exchange(snapshot, request_headers(extra=extra))
    assert isinstance(first, Continue)
    assert set(extra) <= set(first.headers.remove)


def test_the_per_try_filter_reads_the_try_and_the_credential_that_failed(
    snapshot: Snapshot,
) -> None:
    _, proceed = admitted(snapshot)
    sent = dict(proceed.headers.set)
    attempt = parse_try({**sent, "x-envoy-attempt-count": "2"}, snapshot)
    assert attempt is not None
    assert [c.name for c in attempt.candidates] == ["p", "fb"]
    assert attempt.failed == 0 and attempt.after(0) == 1
    assert attempt.auth(1, snapshot) == (("authorization", "Bearer sk-ant"),)
    # Not a pooled call's try (no header, an unknown Upstream, a credential not of the pool):
    # the try goes on unchanged.
    assert parse_try({"authorization": "Bearer sk-up"}, snapshot) is None
    assert parse_try({**sent, TRY_HEADER: "r 1 2 nowhere m"}, snapshot) is None
    assert parse_try({**sent, "authorization": "Bearer other"}, snapshot) is None


def test_the_answer_of_a_retry_is_settled_for_the_credential_that_gave_it(
    snapshot: Snapshot,
) -> None:
    exchange, _ = admitted(snapshot)
    assert exchange.credential is not None and exchange.credential.name == "p"
    reply = exchange.on_response_headers({":status": "200", "content-type": "application/json",
                                          ANSWERED_BY_HEADER: "fb"})
    assert exchange.credential.name == "fb"
    assert ANSWERED_BY_HEADER in reply.headers.remove  # never shown to the client
    assert exchange.cooldown_due is None


def test_a_failed_last_try_is_settled_at_zero_and_rested_by_the_upstream_filter(
    snapshot: Snapshot,
) -> None:
    exchange, _ = admitted(snapshot)
    exchange.on_response_headers({":status": "429", "retry-after": "7",
                                  ANSWERED_BY_HEADER: "fb"})
    assert exchange.credential is not None and exchange.credential.name == "fb"
    assert exchange.cooldown_due is None  # the failed-try filter rests it, with its 7 s
    assert exchange.due is not None and exchange.due.cost_nanos == 0


def test_a_call_that_cannot_be_retried_rests_its_credential_here(snapshot: Snapshot) -> None:
    exchange, _ = admitted(snapshot, Options(max_retries=0))
    exchange.on_response_headers({":status": "429", "retry-after": "7"})
    assert exchange.cooldown_due == 7000


def test_past_the_deadline_the_filter_answers_and_nothing_is_rested_twice(
    snapshot: Snapshot,
) -> None:
    exchange, proceed = admitted(snapshot)
    attempt = parse_try(dict(proceed.headers.set), snapshot)
    assert attempt is not None
    deny = deadline_passed(attempt)
    assert deny.status == 504 and ("x-envoy-overloaded", "true") in deny.headers
    reply = exchange.on_response_headers({":status": "504", **dict(deny.headers)})
    assert exchange.cooldown_due is None  # the failed-try filter rested p already
    assert {"x-envoy-overloaded", ANSWERED_BY_HEADER} <= set(reply.headers.remove)
    assert exchange.due is not None and exchange.due.cost_nanos == 0


def test_a_credential_with_its_own_base_url_is_never_retried_from_or_onto(
    builtin_resources: list[Resource],
) -> None:
    """A try changes the auth header, not the destination: were a credential with a baseUrl
    part of the retries, its secret could go to the Upstream's cluster, or another credential's
    secret to its server. The pool "primary" with its fallback on a server of its own."""
    stored = [r for r in STORED if r.name != "primary"] + [_resource("Upstream", "primary", {
        "provider": "openai", "cluster": "primary", "models": ["primary-*"], "priority": 10,
        "credentials": [
            {"name": "fb", "secretRef": "ANTHROPIC_API_KEY", "isFallback": True,
             "baseUrl": "http://127.0.0.1:9/v1"},
            {"name": "p", "secretRef": "OPENAI_API_KEY"}]})]
    proxied = build_snapshot(1, builtin_resources, stored, SECRETS.get)
    # Sent out with p: the only other credential has its own server, so no retry at all.
    _, proceed = admitted(proxied)
    sets = dict(proceed.headers.set)
    assert sets["authorization"] == "Bearer sk-up"
    assert MAX_RETRIES_HEADER not in sets and TRY_HEADER not in sets
    # Even a try header naming this Upstream finds no second candidate on its cluster.
    attempt = parse_try({TRY_HEADER: f"{REQUEST_ID} 1 9999999999999 primary primary-1",
                         "authorization": "Bearer sk-up"}, proxied)
    assert attempt is None
    # Sent out with fb (the reserve script chose it): to its own server, never retried.
    exchange, decision = send_request(
        proxied, request_headers(), orjson.dumps({"model": "primary-1", "messages": MSG}))
    assert isinstance(decision, Reserve)
    proceed = exchange.on_reserved(decision, interpret_reservation(
        decision.plan, [1, 0, 0, 0, 2, 1, 0]))
    assert isinstance(proceed, Continue)
    sets = dict(proceed.headers.set)
    assert sets[":authority"] == "127.0.0.1:9"
    assert MAX_RETRIES_HEADER not in sets and TRY_HEADER not in sets
