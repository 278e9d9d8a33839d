"""Status of RateLimits and Upstreams from live Redis state, made by the gateway's own scripts
(reserve, cool down) against a real Redis, standalone and Cluster."""

from __future__ import annotations

import time

import pytest

from extproc.core.quota import CredentialCharge, Subject, plan_reservation
from extproc.core.resources import rate_limit_spec, validate_document
from extproc.operator.handlers import live_status
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import Store

pytestmark = pytest.mark.redis


def resource(kind: str, ns: str, name: str, spec: dict[str, object]) -> object:
    return validate_document({"apiVersion": "tollgate.io/v1alpha1", "kind": kind,
                              "metadata": {"name": name, "namespace": ns}, "spec": spec})


async def test_rate_limit_status_shows_the_busiest_identity_and_in_flight(store: Store) -> None:
    rl_resource = resource("RateLimit", "team-a", "per-key",
                           {"per": "key", "requestsPerMinute": 100, "tokensPerMinute": 10_000,
                            "concurrent": 5})
    rl = rate_limit_spec(rl_resource)  # type: ignore[arg-type]
    quota = QuotaStore(store.redis, store.keys, stream_maxlen=1000)
    now = time.time()
    for i, key in enumerate(["team-a/ci", "team-a/ci", "team-a/ci", "team-a/web"]):
        subject = Subject(key=key, group="", user="", tags=(), model="gpt-4o", ip="",
                          namespace="team-a")
        plan = plan_reservation(request_id=f"r{i}", now=now, limits=[], rate_limits=[rl],
                                subject=subject, estimate_nanos=0, estimate_tokens=100,
                                hold_seconds=600)
        reply = await quota.reserve(plan, b"")
        assert reply[0] == 1
    status = await live_status(store, rl_resource)  # type: ignore[arg-type]
    assert status == {"identities": 2, "busiest": "team-a/ci", "window": "1m",
                      "requestsInWindow": 3, "tokensInWindow": 300, "requestsLastMinute": 3,
                      "tokensLastMinute": 300, "inFlight": 4}


async def test_rate_limit_status_counts_over_its_own_window(store: Store) -> None:
    """`window: 1h`: the status counts the hour's requests (a minute's numbers are not
    written), and a same-named 1m window's hash does not leak into it."""
    hourly = resource("RateLimit", "team-a", "hourly",
                      {"per": "key", "window": "1h", "requests": 100, "tokens": 10_000})
    minute = resource("RateLimit", "team-a", "hourly", {"per": "key", "requests": 100})
    quota = QuotaStore(store.redis, store.keys, stream_maxlen=1000)
    subject = Subject(key="team-a/ci", group="", user="", tags=(), model="gpt-4o", ip="",
                      namespace="team-a")
    now = time.time()
    # two requests 20 minutes ago and one now: all three inside the hour
    for i, (res, at) in enumerate([(hourly, now - 1200), (hourly, now - 1200), (hourly, now),
                                   (minute, now)]):
        plan = plan_reservation(request_id=f"h{i}", now=at, limits=[],
                                rate_limits=[rate_limit_spec(res)],  # type: ignore[arg-type]
                                subject=subject, estimate_nanos=0, estimate_tokens=50,
                                hold_seconds=600)
        assert (await quota.reserve(plan, b""))[0] == 1
    status = await live_status(store, hourly)  # type: ignore[arg-type]
    assert status == {"identities": 1, "busiest": "team-a/ci", "window": "1h",
                      "requestsInWindow": 3, "tokensInWindow": 150, "inFlight": 0}


async def test_upstream_status_lists_credentials_cooling_down_and_until_when(
    store: Store,
) -> None:
    upstream = resource("Upstream", "default", "pool", {
        "provider": "openai", "cluster": "openai",
        "credentials": [{"name": "a", "secretRef": "A"}, {"name": "b", "secretRef": "B"}]})
    assert await live_status(store, upstream) == {"coolingDown": []}  # type: ignore[arg-type]
    quota = QuotaStore(store.redis, store.keys, stream_maxlen=1000)
    before = time.time()
    ms, _ = await quota.cool_down(CredentialCharge("pool", "a", "A", "gpt-4o", True, None, None),
                                  30_000, 600_000, 0)
    status = await live_status(store, upstream)  # type: ignore[arg-type]
    (entry,) = status["coolingDown"]
    assert (entry["credential"], entry["model"]) == ("a", "gpt-4o")
    from datetime import datetime

    until = datetime.fromisoformat(entry["until"].replace("Z", "+00:00")).timestamp()
    assert before + ms / 1000 - 1 <= until <= time.time() + ms / 1000 + 1


async def test_policy_status_counts_what_the_gateway_recorded(store: Store) -> None:
    """The recorder the gateway runs writes the counts; the operator's status reads them."""
    from extproc.core.policy.engine import Hit
    from extproc.server.policy_hits import PolicyHitRecorder

    policy = resource("Policy", "team-a", "content", {"wordLists": [
        {"name": "jb", "lists": ["jailbreak"], "action": "block"},
        {"name": "swear", "lists": ["profanity"], "action": "redact"}]})
    assert await live_status(store, policy) == {  # type: ignore[arg-type]
        "blocked": 0, "redacted": 0, "audited": 0, "rules": {}}
    recorder = PolicyHitRecorder(store)
    recorder.record([Hit("team-a/content", "jb", "block", "request", 1)])
    recorder.record([Hit("team-a/content", "swear", "redact", "request", 3),
                     Hit("team-a/content", "swear", "redact", "response", 1)])
    recorder.record([Hit("team-b/other", "x", "audit", "request", 1)])
    await recorder.flush()
    status = await live_status(store, policy)  # type: ignore[arg-type]
    assert status == {"blocked": 1, "redacted": 2, "audited": 0,
                      "rules": {"jb:block": 1, "swear:redact": 2}}
