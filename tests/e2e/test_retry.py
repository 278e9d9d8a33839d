"""Retry on the next credential through real Envoy and the official openai SDK (its own retries
off): a 429 or 5xx from one credential of a pool is retried on the next before anything
reaches the client; the request is settled once, for the answer; the failed credential rests,
and a second gateway on the same Redis sees it; a stream is retried before its first byte;
when every credential fails, the provider's own error reaches the client and nothing stays
held."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis

from extproc import envoyconf
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import Stack, free_port
from extproc.store.keyschema import KeySchema
from tests.e2e.conftest import CliRunner, chat_body, replica, spent_and_held
from tests.e2e.test_pools import (  # noqa: F401 (a fixture)
    clear_second,
    keys_used,
    second_gateway,
    second_requests,
    upstream_doc,
    wait_routed,
)

pytestmark = pytest.mark.e2e

FIRST, SECOND = "sk-pool-1", "sk-pool-2"  # POOL_KEY_1, POOL_KEY_2 in the e2e environment


def fault(port: int, credential: str, status: int, count: int = 0,
          retry_after: str | None = None) -> None:
    """The fake provider answers `status` to the next `count` calls with `credential`
    (0: every call until cleared)."""
    httpx.post(f"http://127.0.0.1:{port}/__mock/faults", timeout=5, json={
        "credential": credential, "status": status, "count": count, "retry_after": retry_after})


def clear_faults(port: int) -> None:
    httpx.delete(f"http://127.0.0.1:{port}/__mock/faults", timeout=5)


def pool(cli: CliRunner, prefix: str) -> tuple[str, str]:
    """An Upstream on the second fake provider serving a new model with credential `c1`
    (primary: every call tries it first) and `c2` (fallback). Returns (upstream, model)."""
    model = f"{prefix}-{uuid.uuid4().hex[:6]}"
    name = f"retry-{model[-6:]}"
    cli("apply", "-f", "-", stdin=upstream_doc(name, model, """\
    - {name: c1, secretRef: POOL_KEY_1}
    - {name: c2, secretRef: POOL_KEY_2, isFallback: true}
""") + f"""---
apiVersion: tollgate.io/v1alpha1
kind: PriceTable
metadata: {{name: {name}}}
spec:
  models:
    {model}: {{input: 1000, output: 2000}}
""")
    return name, model


def tracked_key(cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
                ) -> tuple[str, str]:
    """A key with an Allow limit on it (which makes every call reserve and settle).
    Returns (key, limit)."""
    name, key = new_named_key()
    limit = f"retry-{uuid.uuid4().hex[:6]}"
    cli("apply", "-f", "-", stdin=f"""apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: {limit}}}
spec: {{type: Allow, max: 100, period: month, selector: {{keys: [{name}]}}}}
""")
    return key, limit


def settled(cli: CliRunner, limit: str, expected: Decimal) -> tuple[Decimal, Decimal]:
    """Spent and held once the settlements (written in batches) are in; bounded wait."""
    deadline = time.monotonic() + 10
    while True:
        spent, held = spent_and_held(cli, limit)
        if (spent == expected and held == 0) or time.monotonic() > deadline:
            return spent, held
        time.sleep(0.2)


def routed_pool(stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
                second_upstream: int, prefix: str
                ) -> tuple[str, str, openai.OpenAI, Decimal]:
    """A pool Upstream (see `pool`), a tracked key, an SDK client (no SDK retries) once calls
    reach the pool, and the key's limit's spend before the test's own calls.
    Returns (model, limit, client, spent before)."""
    _, model = pool(cli, prefix)
    key, limit = tracked_key(cli, new_named_key)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    wait_routed(client, model, second_upstream)
    spent_before, _ = settled(cli, limit, spent_and_held(cli, limit)[0])
    return model, limit, client, spent_before


def usage_events(e2e_env: dict[str, str], redis_url: str,
                 request_ids: set[str]) -> list[usage_pb2.UsageEvent]:
    client = redis.Redis.from_url(redis_url)
    stream = KeySchema(e2e_env["TOLLGATE_REDIS_TAG"]).usage_stream
    events = [usage_pb2.UsageEvent.FromString(fields[b"event"])
              for _, fields in client.xrange(stream)]
    return [e for e in events if e.request_id in request_ids]


def cooling(e2e_env: dict[str, str], redis_url: str, upstream: str, credential: str,
            model: str) -> int:
    """Milliseconds the credential still rests for the model (what `tollgate` and the
    operator read, store/live_state.py); <= 0 when it does not."""
    key = KeySchema(e2e_env["TOLLGATE_REDIS_TAG"]).cooldown(upstream, credential, model)
    return int(redis.Redis.from_url(redis_url).pttl(key))


@pytest.fixture
def faults(second_upstream: int) -> Any:
    clear_faults(second_upstream)
    yield
    clear_faults(second_upstream)


def test_a_429_under_load_is_retried_on_the_next_credential_and_settled_once(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, second_gateway: str,  # noqa: F811 (the fixture, imported)
    e2e_env: dict[str, str], redis_url: str,
    faults: Any,
) -> None:
    upstream, model = pool(cli, "r429")
    key, limit = tracked_key(cli, new_named_key)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    wait_routed(client, model, second_upstream)
    spent_before, _ = settled(cli, limit, spent_and_held(cli, limit)[0])
    # The provider rate-limits c1 from now on.
    fault(second_upstream, FIRST, 429, retry_after="20")

    def one(i: int) -> Any:
        return client.chat.completions.with_raw_response.create(
            **chat_body(model, max_tokens=5, user=f"u{i}"))

    with ThreadPoolExecutor(max_workers=8) as pool_:
        answers = list(pool_.map(one, range(24)))  # raises on any client-visible error

    assert all(a.http_response.status_code == 200 for a in answers)
    for a in answers:
        assert a.parse().choices[0].message.content  # a real answer each time
        assert "x-tollgate-credential" not in a.headers  # internal, never shown
    seen = Counter(keys_used(second_upstream))
    # Every answer came from c2, once per request; c1 was tried (and failed) at most once
    # per request, and not at all once its cooldown was in place.
    assert seen[SECOND] == 24
    assert 1 <= seen[FIRST] <= 24
    # One settlement per request, at the answer's cost: the limit's spend grew by exactly the
    # costs the client was told, and nothing is held.
    costs = sum(Decimal(a.headers["x-tollgate-cost"]) for a in answers)
    assert costs > 0
    spent, held = settled(cli, limit, spent_before + costs)
    assert (spent - spent_before, held) == (costs, 0)
    ids = {a.headers["x-tollgate-request-id"] for a in answers}
    events = usage_events(e2e_env, redis_url, ids)
    assert sorted(e.request_id for e in events) == sorted(ids)  # each settled once
    assert {e.status for e in events} == {200}
    # c1 rests (for this model), in Redis for every replica ...
    assert cooling(e2e_env, redis_url, upstream, "c1", model) > 0
    assert cooling(e2e_env, redis_url, upstream, "c2", model) <= 0
    # ... and a second gateway on the same Redis goes straight to c2: no failed try at all.
    clear_second(second_upstream)
    there = openai.OpenAI(base_url=f"{second_gateway}/v1", api_key=key, max_retries=0)
    for _ in range(4):
        there.chat.completions.create(**chat_body(model, max_tokens=5))
    assert keys_used(second_upstream) == [SECOND] * 4


def test_a_5xx_is_retried_on_the_next_credential(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, faults: Any,
) -> None:
    model, limit, client, spent_before = routed_pool(stack, cli, new_named_key,
                                                     second_upstream, "r5xx")
    fault(second_upstream, FIRST, 503, count=1)
    raw = client.chat.completions.with_raw_response.create(**chat_body(model, max_tokens=5))
    assert raw.parse().choices[0].message.content
    assert keys_used(second_upstream) == [FIRST, SECOND]
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost > 0
    assert settled(cli, limit, spent_before + cost) == (spent_before + cost, 0)


def test_a_stream_is_retried_before_its_first_byte(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, faults: Any,
) -> None:
    model, limit, client, spent_before = routed_pool(stack, cli, new_named_key,
                                                     second_upstream, "rsse")
    fault(second_upstream, FIRST, 429, count=1)
    stream = client.chat.completions.create(**chat_body(model), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock upstream."
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 5
    result = (chunks[-1].model_extra or {})["xproxy_result"]
    cost = Decimal(result["cost_nanos"]["total"]) / 10**9
    assert cost > 0
    assert keys_used(second_upstream) == [FIRST, SECOND]
    assert settled(cli, limit, spent_before + cost) == (spent_before + cost, 0)


def test_when_every_credential_fails_the_providers_error_reaches_the_client(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, faults: Any,
) -> None:
    model, limit, client, spent_before = routed_pool(stack, cli, new_named_key,
                                                     second_upstream, "rall")
    fault(second_upstream, FIRST, 429)
    fault(second_upstream, SECOND, 429)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**chat_body(model, max_tokens=5))
    # The fake provider's own error body (OpenAI's shape), not one the gateway made up.
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.type == "requests"
    # Each credential tried once (the pool has two), then the hold released at zero cost.
    assert keys_used(second_upstream) == [FIRST, SECOND]
    assert settled(cli, limit, spent_before) == (spent_before, 0)
    assert second_requests(second_upstream)


@pytest.fixture
def impatient_gateway(
    stack: Stack, e2e_env: dict[str, str], tmp_path: Path, second_upstream: int
) -> Iterator[str]:
    """A replica whose retry deadline has always passed (TOLLGATE_RETRY_DEADLINE_MS=0)."""
    with replica(stack, {**e2e_env, "TOLLGATE_RETRY_DEADLINE_MS": "0"}, tmp_path,
                 [envoyconf.ClusterSpec("second", "127.0.0.1", second_upstream)]) as (url, _):
        yield url


def test_no_retry_starts_after_the_deadline(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, impatient_gateway: str, e2e_env: dict[str, str], redis_url: str,
    faults: Any,
) -> None:
    upstream, model = pool(cli, "rdl")
    key, limit = tracked_key(cli, new_named_key)
    client = openai.OpenAI(base_url=f"{impatient_gateway}/v1", api_key=key, max_retries=0)
    wait_routed(client, model, second_upstream)
    spent_before, _ = settled(cli, limit, spent_and_held(cli, limit)[0])
    fault(second_upstream, FIRST, 503)
    with pytest.raises(openai.APIStatusError) as late:
        client.chat.completions.create(**chat_body(model, max_tokens=5))
    assert late.value.status_code == 504
    assert late.value.code == "retry_deadline_exceeded"
    assert "x-envoy-overloaded" not in late.value.response.headers
    assert keys_used(second_upstream) == [FIRST]  # the retry was not sent
    assert cooling(e2e_env, redis_url, upstream, "c1", model) > 0
    assert settled(cli, limit, spent_before) == (spent_before, 0)


@pytest.fixture
def flaky_gateway(
    stack: Stack, e2e_env: dict[str, str], tmp_path: Path, second_upstream: int
) -> Iterator[tuple[str, int]]:
    """A replica with a cluster `flaky` of two endpoints: a closed port and the second fake
    provider. Yields (base URL, Envoy admin port)."""
    closed = free_port()  # nothing listens there

    def add_live_endpoint(config: dict[str, Any]) -> None:
        flaky = next(c for c in config["static_resources"]["clusters"] if c["name"] == "flaky")
        flaky["connect_timeout"] = "1s"
        endpoints = flaky["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoints.append({"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": second_upstream}}}})

    with replica(stack, e2e_env, tmp_path, [envoyconf.ClusterSpec("flaky", "127.0.0.1", closed)],
                 add_live_endpoint) as gateway:
        yield gateway


def envoy_counter(admin: int, name: str) -> int:
    stats = httpx.get(f"http://127.0.0.1:{admin}/stats", params={"filter": f"^{name}$"},
                      timeout=5).text
    return sum(int(line.rsplit(": ", 1)[1]) for line in stats.splitlines() if ": " in line)


def test_a_connect_failure_is_retried_on_another_endpoint_with_the_next_credential(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, flaky_gateway: tuple[str, int], e2e_env: dict[str, str],
    redis_url: str, faults: Any,
) -> None:
    base_url, admin = flaky_gateway
    model = f"rcx-{uuid.uuid4().hex[:6]}"
    upstream = f"retry-{model[-6:]}"
    # `flaky` exists only in this replica's own Envoy configuration (the fixture above).
    cli("apply", "--allow-unknown-clusters", "-f", "-", stdin=f"""apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: retry-{model[-6:]}}}
spec:
  provider: openai-compatible
  cluster: flaky
  models: ["{model}"]
  priority: 5
  credentials:
    - {{name: c1, secretRef: POOL_KEY_1}}
    - {{name: c2, secretRef: POOL_KEY_2, isFallback: true}}
""")
    key, _ = tracked_key(cli, new_named_key)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    deadline = time.monotonic() + 10  # until the replica has loaded the Upstream
    while True:
        try:
            client.chat.completions.create(**chat_body(model, max_tokens=5))
            break
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    clear_second(second_upstream)
    # Envoy balances round robin over the two endpoints: half of the first tries meet the
    # closed port. None of it reaches the client.
    for _ in range(6):
        assert client.chat.completions.create(**chat_body(model, max_tokens=5)).choices
    assert len(keys_used(second_upstream)) == 6  # one answer each, from the live endpoint
    assert envoy_counter(admin, "cluster.flaky.upstream_cx_connect_fail") >= 1
    assert envoy_counter(admin, "cluster.flaky.upstream_rq_retry") >= 1
    # A closed port is not the credentials' fault: neither rests.
    assert cooling(e2e_env, redis_url, upstream, "c1", model) <= 0
    assert cooling(e2e_env, redis_url, upstream, "c2", model) <= 0


def test_an_anthropic_call_is_retried_with_the_next_x_api_key(
    stack: Stack, cli: CliRunner, new_key: Callable[..., str], e2e_env: dict[str, str],
    redis_url: str,
) -> None:
    """The same through Anthropic's API and SDK: the credential travels in `x-api-key`."""
    model = f"claude-retry-{uuid.uuid4().hex[:6]}"
    upstream = f"retry-{model[-6:]}"
    cli("apply", "-f", "-", stdin=f"""apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: {upstream}}}
spec:
  provider: anthropic
  cluster: anthropic
  models: ["{model}"]
  priority: 5
  credentials:
    - {{name: c1, secretRef: POOL_KEY_1}}
    - {{name: c2, secretRef: POOL_KEY_2, isFallback: true}}
""")
    client = anthropic.Anthropic(base_url=stack.base_url, api_key=new_key(), max_retries=0)

    def ask() -> Any:
        return client.messages.create(model=model, max_tokens=5,
                                      messages=[{"role": "user", "content": "Hello"}])

    deadline = time.monotonic() + 10  # until every worker has the Upstream
    while True:
        try:
            ask()
            break
        except anthropic.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    mock = f"http://127.0.0.1:{stack.mock_port}"
    httpx.delete(f"{mock}/__mock/requests", timeout=5)
    fault(stack.mock_port or 0, FIRST, 529, count=1)  # Anthropic's "overloaded"
    try:
        answer = ask()
    finally:
        clear_faults(stack.mock_port or 0)
    assert answer.content[0].text  # type: ignore[union-attr]
    sent = [r["headers"]["x-api-key"] for r in httpx.get(f"{mock}/__mock/requests",
                                                           timeout=5).json()]
    assert sent == [FIRST, SECOND]
    # Retried as a 5xx, and rested: Anthropic's 529 counts wherever 503 does.
    assert cooling(e2e_env, redis_url, upstream, "c1", model) > 0
