"""Failover to a backup Upstream on another Envoy cluster within one request, through real
Envoy and the official openai SDK (its own retries off): when every try on the first Upstream
fails with a 429/5xx, Envoy re-runs the call (internal redirect) and the extproc sends it to
the backup; the client sees the backup's answer only. Spend is exact (one settlement, at the
backup's price; the failed Upstream's hold released at zero), the failed credentials rest for
every replica, streams fail over before their first byte, and a 400 is not failed over."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import CliRunner, chat_body, spent_and_held
from tests.e2e.test_pools import (  # noqa: F401 (fixtures)
    clear_second,
    keys_used,
    second_gateway,
    upstream_doc,
    wait_routed,
)
from tests.e2e.test_retry import (  # noqa: F401 (a fixture)
    FIRST,
    SECOND,
    cooling,
    fault,
    faults,
    settled,
    tracked_key,
    usage_events,
)

pytestmark = pytest.mark.e2e


def two_upstreams(cli: CliRunner, prefix: str) -> tuple[str, str, str]:
    """A model served first by a pool on the second fake provider (cluster `second`: c1, c2)
    and then by a backup on the main fake (cluster `openai`), which serves it under an alias
    (its body is rewritten to `gpt-4o-mini`, priced as such). Returns (primary, backup, model).
    """
    model = f"{prefix}-{uuid.uuid4().hex[:6]}"
    primary, backup = f"fo-a-{model[-6:]}", f"fo-b-{model[-6:]}"
    cli("apply", "-f", "-", stdin=upstream_doc(primary, model, """\
    - {name: c1, secretRef: POOL_KEY_1}
    - {name: c2, secretRef: POOL_KEY_2}
""") + f"""---
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: {backup}}}
spec:
  provider: openai
  cluster: openai
  models: ["{model}"]  # (none would mean every model)
  aliases: {{"{model}": gpt-4o-mini}}
  priority: 6
  credentials:
    - {{name: b1, secretRef: OPENAI_API_KEY}}
---
apiVersion: tollgate.io/v1alpha1
kind: PriceTable
metadata: {{name: {primary}}}
spec:
  models:
    {model}: {{input: 1000, output: 2000}}
""")
    return primary, backup, model


def main_requests(stack: Stack, model: str) -> list[dict[str, Any]]:
    """The calls the main fake provider got for the backup (its body's model is the alias's
    target; the test's own model name never reaches it)."""
    every: list[dict[str, Any]] = httpx.get(
        f"http://127.0.0.1:{stack.mock_port}/__mock/requests", timeout=5).json()
    return [r for r in every if isinstance(r["body"], dict)
            and r["body"].get("user", "").startswith(model)]


def test_a_429ing_upstream_fails_over_to_the_backup_under_load(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, second_gateway: str,  # noqa: F811 (the fixture, imported)
    e2e_env: dict[str, str], redis_url: str, faults: Any,  # noqa: F811
) -> None:
    primary, _, model = two_upstreams(cli, "fo429")
    key, limit = tracked_key(cli, new_named_key)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    wait_routed(client, model, second_upstream)
    spent_before, _ = settled(cli, limit, spent_and_held(cli, limit)[0])
    # The primary's provider rate-limits both credentials from now on.
    fault(second_upstream, FIRST, 429, retry_after="20")
    fault(second_upstream, SECOND, 429, retry_after="20")

    def one(i: int) -> Any:
        return client.chat.completions.with_raw_response.create(
            **chat_body(model, max_tokens=5, user=f"{model}-u{i}"))

    with ThreadPoolExecutor(max_workers=24) as pool_:
        answers = list(pool_.map(one, range(24)))  # raises on any client-visible error

    assert all(a.http_response.status_code == 200 for a in answers)
    for a in answers:
        assert a.parse().choices[0].message.content
        assert not any(h.startswith("x-tollgate-failover") for h in a.headers)
    # Every call reached the backup once, with the alias's body (the replayed body was the
    # primary's: the extproc rewrote it for the backup), and its own credential.
    backup_calls = main_requests(stack, model)
    assert len(backup_calls) == 24
    assert {r["body"]["model"] for r in backup_calls} == {"gpt-4o-mini"}
    assert {r["headers"]["authorization"] for r in backup_calls} == {
        f"Bearer {e2e_env['OPENAI_API_KEY']}"}
    assert not any("x-tollgate-try" in r["headers"] or "x-envoy-max-retries" in r["headers"]
                   for r in backup_calls)
    # Spend is exact: the costs the client was told, at the backup's price, and nothing held.
    costs = sum(Decimal(a.headers["x-tollgate-cost"]) for a in answers)
    assert costs > 0
    spent, held = settled(cli, limit, spent_before + costs)
    assert (spent - spent_before, held) == (costs, 0)
    ids = {a.headers["x-tollgate-request-id"] for a in answers}
    events = usage_events(e2e_env, redis_url, ids)
    assert sorted(e.request_id for e in events) == sorted(ids)  # each answer settled once
    assert {e.model for e in events} == {"gpt-4o-mini"}
    # Both primary credentials rest, in Redis for every replica ...
    assert cooling(e2e_env, redis_url, primary, "c1", model) > 0
    assert cooling(e2e_env, redis_url, primary, "c2", model) > 0
    # ... so a second gateway on the same Redis goes straight to the backup: no failed try.
    clear_second(second_upstream)
    there = openai.OpenAI(base_url=f"{second_gateway}/v1", api_key=key, max_retries=0)
    for i in range(4):
        there.chat.completions.create(**chat_body(model, max_tokens=5, user=f"{model}-t{i}"))
    assert keys_used(second_upstream) == []


def test_a_stream_fails_over_before_its_first_byte(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, faults: Any,  # noqa: F811
) -> None:
    _, _, model = two_upstreams(cli, "fosse")
    key, limit = tracked_key(cli, new_named_key)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    wait_routed(client, model, second_upstream)
    spent_before, _ = settled(cli, limit, spent_and_held(cli, limit)[0])
    fault(second_upstream, FIRST, 503, count=1)
    fault(second_upstream, SECOND, 503, count=1)
    stream = client.chat.completions.create(**chat_body(model, user=f"{model}-s"), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock upstream."
    result = (chunks[-1].model_extra or {})["xproxy_result"]
    cost = Decimal(result["cost_nanos"]["total"]) / 10**9
    assert cost > 0
    assert sorted(keys_used(second_upstream)) == sorted([FIRST, SECOND])
    assert len(main_requests(stack, model)) == 1
    assert settled(cli, limit, spent_before + cost) == (spent_before + cost, 0)


def test_a_400_is_not_failed_over(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    second_upstream: int, faults: Any,  # noqa: F811
) -> None:
    _, _, model = two_upstreams(cli, "fo400")
    key, limit = tracked_key(cli, new_named_key)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    wait_routed(client, model, second_upstream)
    spent_before, _ = settled(cli, limit, spent_and_held(cli, limit)[0])
    fault(second_upstream, FIRST, 400)
    fault(second_upstream, SECOND, 400)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**chat_body(model, max_tokens=5, user=f"{model}-x"))
    assert len(keys_used(second_upstream)) == 1  # not retried, not failed over
    assert main_requests(stack, model) == []
    assert settled(cli, limit, spent_before) == (spent_before, 0)
