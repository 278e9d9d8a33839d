"""The operator's handlers, called with real kopf objects (Body, Patch, Memo, a logger) against
the Redis of a running gateway (real Envoy, extproc, Redis; the official openai SDK as client).
What the handlers write must be what the gateway enforces, within about a second."""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

import kopf
import openai
import pytest

from extproc.core.keys import generate_key, hash_key
from extproc.launch import Stack
from extproc.operator import handlers
from extproc.store.redis_store import Store
from tests.e2e.conftest import chat_body, wait_for_status
from tests.operator.conftest import custom_resource, namespace

pytestmark = pytest.mark.e2e


def client_for(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def call(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(**chat_body(max_tokens=10), **extra)


def limits_header(raw: Any) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for entry in filter(None, raw.headers.get("x-tollgate-limits", "").split(", ")):
        name, *fields = entry.split(";")
        out[name] = dict(f.split("=", 1) for f in fields)
    return out


def until(check: Any, timeout: float = 4.0) -> Any:
    """Configuration reaches the gateway's workers within about a second; poll a real call."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


async def create_key(memo: kopf.Memo, logger: logging.Logger, stack: Stack, ns: str,
                     name: str, **spec: Any) -> str:
    """A VirtualKey custom resource carrying the hash of a key made here; waits until the
    gateway accepts the key."""
    key = generate_key()
    patch = kopf.Patch()
    body = custom_resource("VirtualKey", ns, name, {"keySha256": hash_key(key), **spec})
    await handlers.on_change(body=body, patch=patch, logger=logger, memo=memo)
    assert patch["status"]["conditions"][0]["status"] == "True"
    assert patch["status"]["id"] == f"{ns}/{name}"
    accepted = wait_for_status(stack, key, lambda s: s != 401, model="probe-model")
    assert accepted.status_code != 401
    return key


async def test_limit_create_update_delete_reach_the_gateway(
    stack: Stack, memo: kopf.Memo, logger: logging.Logger
) -> None:
    ns = namespace()
    key = await create_key(memo, logger, stack, ns, "app")
    client = client_for(stack, key)
    limit_id = f"{ns}/budget"
    spec = {"type": "Block", "max": 5, "period": "month", "selector": {"keys": ["app"]}}

    # create -> the gateway applies it to this key's requests
    patch = kopf.Patch()
    await handlers.on_change(body=custom_resource("Limit", ns, "budget", spec), patch=patch,
                             logger=logger, memo=memo)
    condition = patch["status"]["conditions"][0]
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "Accepted", "True", "Stored")
    assert condition["observedGeneration"] == 1
    raw = until(lambda: limit_id in limits_header(call(client)) and call(client))
    assert limits_header(raw)[limit_id]["max"] == "5.000000000"

    # resume (operator restart) of an unchanged resource: accepted, nothing rewritten
    store: Store = memo.store
    generation = await store.generation()
    patch = kopf.Patch()
    await handlers.on_change(body=custom_resource("Limit", ns, "budget", spec), patch=patch,
                             logger=logger, memo=memo)
    assert patch["status"]["conditions"][0]["status"] == "True"
    assert await store.generation() == generation

    # update max -> enforced on the next requests (here: nothing left, so refused)
    patch = kopf.Patch()
    await handlers.on_change(body=custom_resource("Limit", ns, "budget", {**spec, "max": 0},
                                                  generation=2),
                             patch=patch, logger=logger, memo=memo)
    assert patch["status"]["conditions"][0]["observedGeneration"] == 2

    def refused() -> Any:
        try:
            call(client)
        except openai.RateLimitError as exc:
            return exc
        return None

    error = until(refused)
    assert error is not None, "the lowered max was never enforced"
    assert error.response.json()["error"]["limit_id"] == limit_id

    # delete (the finalizer) -> gone from Redis and from the gateway
    await handlers.on_delete(body=custom_resource("Limit", ns, "budget", spec), logger=logger,
                             memo=memo)
    assert await store.get("Limit", limit_id) is None
    raw = until(lambda: (r := _ok(client)) is not None and limit_id not in limits_header(r)
                and r)
    assert raw and limit_id not in limits_header(raw)


def _ok(client: openai.OpenAI) -> Any:
    try:
        return call(client)
    except openai.RateLimitError:
        return None


async def test_invalid_resource_writes_nothing_and_says_why(
    stack: Stack, memo: kopf.Memo, logger: logging.Logger
) -> None:
    ns = namespace()
    store: Store = memo.store
    before = await store.generation()
    patch = kopf.Patch()
    body = custom_resource("Limit", ns, "broken", {"type": "Block", "max": 1, "period": "year"})
    with pytest.raises(kopf.PermanentError) as info:  # retrying the same spec cannot help
        await handlers.on_change(body=body, patch=patch, logger=logger, memo=memo)
    condition = patch["status"]["conditions"][0]
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "Accepted", "False", "Invalid")
    assert "spec.period" in condition["message"] and "must be one of" in condition["message"]
    assert condition["message"] == str(info.value)
    assert await store.get("Limit", f"{ns}/broken") is None
    assert await store.generation() == before

    # An invalid update of an accepted resource leaves the accepted version in force.
    good = {"type": "Allow", "max": 2}
    await handlers.on_change(body=custom_resource("Limit", ns, "kept", good), patch=kopf.Patch(),
                             logger=logger, memo=memo)
    with pytest.raises(kopf.PermanentError):
        await handlers.on_change(
            body=custom_resource("Limit", ns, "kept", {"type": "Allow", "max": -1}, 2),
            patch=kopf.Patch(), logger=logger, memo=memo)
    kept = await store.get("Limit", f"{ns}/kept")
    assert kept is not None and kept.spec["max"] == 2


async def test_a_replica_without_the_lease_writes_nothing(
    stack: Stack, memo: kopf.Memo, logger: logging.Logger
) -> None:
    ns = namespace()
    await memo.lease.release()  # as after losing it
    with pytest.raises(kopf.TemporaryError):  # retrying later (once it holds it) may help
        await handlers.on_change(body=custom_resource("Limit", ns, "x", {"type": "Allow",
                                                                          "max": 1}),
                                 patch=kopf.Patch(), logger=logger, memo=memo)
    assert await memo.store.get("Limit", f"{ns}/x") is None


async def test_same_name_in_two_namespaces_is_two_limits_with_their_own_spend(
    stack: Stack, memo: kopf.Memo, logger: logging.Logger
) -> None:
    team_a, team_b = namespace(), namespace()
    key_a = await create_key(memo, logger, stack, team_a, "ci")
    key_b = await create_key(memo, logger, stack, team_b, "ci")
    # Same name, no selector: each covers the keys of its own namespace only.
    for ns, maximum in ((team_a, 10), (team_b, 20)):
        await handlers.on_change(
            body=custom_resource("Limit", ns, "monthly", {"type": "Allow", "max": maximum,
                                                          "period": "month"}),
            patch=kopf.Patch(), logger=logger, memo=memo)
    client_a, client_b = client_for(stack, key_a), client_for(stack, key_b)
    first = until(lambda: f"{team_a}/monthly" in limits_header(r := call(client_a)) and r)
    assert set(limits_header(first)) == {f"{team_a}/monthly"}
    costs = [Decimal(first.headers["x-tollgate-cost"])]
    for _ in range(3):
        raw = call(client_a)
        assert set(limits_header(raw)) == {f"{team_a}/monthly"}
        costs.append(Decimal(raw.headers["x-tollgate-cost"]))
    b_first = until(lambda: f"{team_b}/monthly" in limits_header(r := call(client_b)) and r)
    assert set(limits_header(b_first)) == {f"{team_b}/monthly"}
    b_cost = Decimal(b_first.headers["x-tollgate-cost"])

    # Status write-back: the live spend of each, after real traffic. Settlement runs off the
    # request path, so wait until every cost is recorded.
    async def status_of(ns: str, current: dict[str, Any] | None = None) -> dict[str, Any]:
        patch = kopf.Patch()
        body = custom_resource("Limit", ns, "monthly", {}, status=current)
        await handlers.sync_status(body=body, patch=patch, memo=memo)
        return dict(patch.get("status", {}))

    deadline = time.monotonic() + 10
    while True:
        status_a = await status_of(team_a)
        if Decimal(status_a["spent"]) == sum(costs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert Decimal(status_a["spent"]) == sum(costs)
    assert status_a["held"] == "0.000000000"
    assert status_a["max"] == "10.000000000"
    assert Decimal(status_a["remaining"]) == 10 - sum(costs)
    assert status_a["state"] == "ok"
    assert status_a["requests"] == {"ok": 4, "exceeded": 0, "overrun": 0, "blocked": 0}
    assert status_a["period"].startswith("month:")
    assert status_a["lastSynced"].endswith("Z")
    deadline = time.monotonic() + 10
    while True:
        status_b = await status_of(team_b)
        if Decimal(status_b["spent"]) == b_cost or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert Decimal(status_b["spent"]) == b_cost
    assert status_b["requests"]["ok"] == 1

    # Rate-bounded: an unchanged status with a recent lastSynced is not sent again.
    assert await status_of(team_a, current=status_a) == {}


async def test_limit_ids_header_resolves_bare_names_in_the_keys_namespace(
    stack: Stack, memo: kopf.Memo, logger: logging.Logger
) -> None:
    ns, other = namespace(), namespace()
    key = await create_key(memo, logger, stack, ns, "tool", allowRequestLimits=True)
    # Selects no key: applies only when a request names it.
    for where in (ns, other):
        await handlers.on_change(
            body=custom_resource("Limit", where, "extra", {"type": "Allow", "max": 1,
                                                           "selector": {"keys": ["nobody"]}}),
            patch=kopf.Patch(), logger=logger, memo=memo)
    client = client_for(stack, key)

    def named(ids: str) -> dict[str, dict[str, str]]:
        return limits_header(call(client, extra_headers={"x-tollgate-limit-ids": ids}))

    assert until(lambda: f"{ns}/extra" in named("extra"))
    assert set(named("extra")) == {f"{ns}/extra"}  # bare: the key's own namespace
    assert set(named(f"{other}/extra")) == {f"{other}/extra"}  # explicit namespace


async def test_virtual_key_status_and_revocation_through_the_resource(
    stack: Stack, memo: kopf.Memo, logger: logging.Logger
) -> None:
    ns = namespace()
    key = await create_key(memo, logger, stack, ns, "temp")
    patch = kopf.Patch()
    await handlers.sync_status(body=custom_resource("VirtualKey", ns, "temp", {}), patch=patch,
                               memo=memo)
    assert patch["status"]["state"] == "active"
    await handlers.on_change(
        body=custom_resource("VirtualKey", ns, "temp",
                             {"keySha256": hash_key(key), "revoked": True}, 2),
        patch=kopf.Patch(), logger=logger, memo=memo)
    assert wait_for_status(stack, key, lambda s: s == 401).status_code == 401
    patch = kopf.Patch()
    await handlers.sync_status(body=custom_resource("VirtualKey", ns, "temp", {}), patch=patch,
                               memo=memo)
    assert patch["status"]["state"] == "revoked"


async def test_an_upstream_naming_an_unknown_cluster_is_not_accepted(
    memo: kopf.Memo, logger: logging.Logger
) -> None:
    """With the clusters of the generated Envoy configuration known (TOLLGATE_ENVOY_CLUSTERS),
    an Upstream naming another is Accepted=False (UnknownCluster) and not stored; one naming a
    configured cluster is stored; TOLLGATE_ALLOW_UNKNOWN_CLUSTERS turns the check off."""
    ns = namespace()
    store: Store = memo.store
    checked = kopf.Memo(store=store, lease=memo.lease, secrets=None,
                        known_clusters=handlers.known_clusters_setting(
                            {"TOLLGATE_ENVOY_CLUSTERS": "local-llm=http://vllm.ml:8000"}))
    spec = {"provider": "openai-compatible", "cluster": "nowhere", "models": ["m"]}
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError):
        await handlers.on_change(body=custom_resource("Upstream", ns, "lost", spec),
                                 patch=patch, logger=logger, memo=checked)
    condition = patch["status"]["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "UnknownCluster")
    assert "Envoy cluster 'nowhere'" in condition["message"]
    assert "TOLLGATE_ENVOY_CLUSTERS" in condition["message"]
    assert await store.get("Upstream", f"{ns}/lost") is None
    patch = kopf.Patch()
    await handlers.on_change(body=custom_resource("Upstream", ns, "found",
                                                  {**spec, "cluster": "local-llm"}),
                             patch=patch, logger=logger, memo=checked)
    assert patch["status"]["conditions"][0]["status"] == "True"
    assert handlers.known_clusters_setting({"TOLLGATE_ALLOW_UNKNOWN_CLUSTERS": "true"}) is None
