"""Redis killed mid-run, through real Envoy: Block limits fail closed with a clear 503, Allow
limits and rate limits fail open (rate limits to a per-replica limiter), and every settlement
made during the outage lands once Redis is back: no spend is lost."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from extproc.launch import Managed, free_port, start_stack
from tests.e2e.conftest import chat_body
from tests.e2e.own_redis import cli_for, first_limited_response, gateway_env, start_own_redis

pytestmark = pytest.mark.e2e


def test_redis_outage_fail_closed_fail_open_and_no_lost_spend(tmp_path: Path) -> None:
    port = free_port()

    def start_redis() -> Managed:
        # Append-only file: the restarted server comes back with the configuration it had.
        return start_own_redis(port, tmp_path / "logs", "--appendonly", "yes",
                               "--dir", str(tmp_path))

    redis_proc = start_redis()
    env = gateway_env(port, "outage", tmp_path)
    cli = cli_for(env)

    stack = start_stack(log_dir=tmp_path / "stack", port=free_port(),
                        redis_url=env["REDIS_URL"], mock_upstream=True, workers=1, env=env)
    try:
        block_key = cli("keys", "create", "blocked").splitlines()[-1]
        open_key = cli("keys", "create", "open").splitlines()[-1]
        cli("apply", "-f", "-", stdin="""
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: hard}
spec: {type: Block, max: 100, selector: {keys: [blocked]}}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: soft}
spec: {type: Allow, max: 100, selector: {keys: [open]}}
---
apiVersion: tollgate.io/v1alpha1
kind: RateLimit
metadata: {name: open-rpm}
spec: {per: key, selector: {keys: [open]}, requestsPerMinute: 4}
""")
        blocked = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=block_key,
                                max_retries=0)
        opened = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=open_key,
                               max_retries=0)
        costs: dict[str, Decimal] = {}
        raw = first_limited_response(opened, timeout=5)
        costs[raw.headers["x-tollgate-request-id"]] = Decimal(raw.headers["x-tollgate-cost"])
        assert blocked.chat.completions.create(**chat_body()).usage is not None

        redis_proc.stop()  # SIGTERM: Redis writes its append-only file and exits

        with pytest.raises(openai.APIStatusError) as closed:
            blocked.chat.completions.create(**chat_body())
        assert closed.value.status_code == 503
        assert closed.value.code == "limits_unavailable"
        assert closed.value.response.headers["retry-after"] == "1"

        # Allow limit + rate limit: served, with the local limiter holding 4 per minute.
        outcomes = []
        for _ in range(5):
            try:
                raw = opened.chat.completions.with_raw_response.create(**chat_body())
                costs[raw.headers["x-tollgate-request-id"]] = Decimal(
                    raw.headers["x-tollgate-cost"])
                outcomes.append(200)
            except openai.RateLimitError:
                outcomes.append(429)
        assert outcomes == [200, 200, 200, 200, 429]

        redis_proc = start_redis()
        expected = sum(costs.values())
        deadline = time.monotonic() + 20
        while True:  # the journal is replayed with backoff
            row = cli("get", "limits", "soft").splitlines()[1].split()[1:]  # after NAMESPACE
            if Decimal(row[3]) == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert Decimal(row[3]) == expected  # every cent recorded, none twice
        assert row[4] == "0.000000000"  # nothing left held
        events = cli("usage", "--count", "50")
        for request_id in costs:
            assert request_id in events
    finally:
        stack.stop()
        redis_proc.stop()

