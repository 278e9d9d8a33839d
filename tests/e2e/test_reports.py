"""`tollgate usage --by ...` after a mixed run through real Envoy with the official SDKs: the
report's totals are exactly the sum of the `x-tollgate-cost` headers the clients received."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import openai
import orjson
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import CliRunner

pytestmark = pytest.mark.e2e


def test_report_totals_equal_the_costs_clients_were_told(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    (name_a, key_a), (name_b, key_b) = new_named_key(), new_named_key()
    oa_a = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key_a, max_retries=0)
    oa_b = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key_b, max_retries=0)
    an_b = anthropic.Anthropic(base_url=stack.base_url, api_key=key_b, max_retries=0)

    def chat(client: openai.OpenAI, i: int) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o" if i % 2 else "gpt-4o-mini",
            messages=[{"role": "user", "content": "Hello " * (i + 1)}])

    calls: list[tuple[str, Callable[[], Any]]] = []
    for i in range(12):
        calls.append((name_a, lambda i=i: chat(oa_a, i)))
        calls.append((name_b, lambda i=i: chat(oa_b, i)))
    for i in range(6):
        calls.append((name_a, lambda i=i: oa_a.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input="x" * (40 * (i + 1)))))
        calls.append((name_b, lambda i=i: an_b.messages.with_raw_response.create(
            model="claude-haiku-4-5", max_tokens=32,
            messages=[{"role": "user", "content": "Hi " * (i + 1)}])))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda c: (c[0], c[1]()), calls))
    told: dict[tuple[str, str], list[Decimal]] = {}
    for name, raw in responses:
        model = raw.parse().model
        told.setdefault((name, model), []).append(Decimal(raw.headers["x-tollgate-cost"]))
    assert sum(sum(v) for v in told.values()) > 0

    def report() -> dict[tuple[str, str], dict[str, Any]]:
        lines = cli("usage", "--by", "key,model", "--since", "1d").stdout.splitlines()
        rows = [orjson.loads(line) for line in lines]
        return {(r["key"], r["model"]): r for r in rows if r["key"] in (name_a, name_b)}

    # Settlement is written after the response (batched off the request path): wait until
    # every request has landed, then compare exactly.
    deadline = time.monotonic() + 30
    rows = report()
    while (sum(r["requests"] for k, r in rows.items() if k in told)
           < len(calls) and time.monotonic() < deadline):
        time.sleep(0.2)
        rows = report()
    for group, costs in told.items():
        row = rows[group]
        assert row["requests"] == len(costs), group
        assert Decimal(row["cost_usd"]) == sum(costs), group
    by_key = {orjson.loads(line)["key"]: orjson.loads(line) for line in cli(
        "usage", "--by", "key", "--since", "1d").stdout.splitlines()}
    assert Decimal(by_key[name_a]["cost_usd"]) == sum(
        c for (n, _m), v in told.items() if n == name_a for c in v)


def test_ingested_calls_are_reported_once_by_use_case(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    """Telemetry-only mode (the payi SDK's ingest): a retried ingest counts once in the report,
    under the use case the application named."""
    from payi import Payi

    name, key = new_named_key()
    client = Payi(api_key=key, base_url=stack.base_url, max_retries=0)
    use_case = "summarise-" + name
    told = Decimal(0)
    for tokens in (1000, 3000):
        def ingest(tokens: int = tokens) -> Any:
            return client.ingest.units(
                category="system.openai", resource="gpt-4o",
                units={"text": {"input": tokens, "output": 100}}, use_case_name=use_case,
                event_timestamp=f"2026-11-30T10:{tokens // 1000:02d}:00+00:00")
        first = ingest()
        assert ingest().xproxy_result.duplicate_request is True  # the SDK's retry
        told += Decimal(str(first.xproxy_result.cost.total.base))
    rows = [orjson.loads(line) for line in cli(
        "usage", "--by", "use_case,key,model", "--from", "2026-11-30T10:00Z", "--to",
        "2026-11-30T11:00Z").stdout.splitlines()]
    (row,) = [r for r in rows if r["use_case"] == use_case]
    assert (row["key"], row["model"], row["requests"]) == (name, "gpt-4o", 2)
    assert (row["input_tokens"], row["output_tokens"]) == (4000, 200)
    assert Decimal(row["cost_usd"]) == told
