"""Redis stalled (SIGSTOP) under load, through real Envoy, then resumed (SIGCONT).

A stalled Redis is worse than a dead one: the request path times out and answers (503 for a
Block limit, fail-open for an Allow limit), but Redis still runs the reserve scripts it had
received once it resumes. Before the fix those late reserves left holds that the sweeper later
charged to refused requests, `held` stuck on Allow limits and concurrency slots taken for the
whole hold window. After the stall: nothing held, nothing leased, no hold left for the sweeper,
and spend is exactly the cost of the requests that were served (none for refused ones).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import redis

from extproc.launch import (
    free_port,
    start_stack,
)
from tests.e2e.conftest import chat_body
from tests.e2e.own_redis import cli_for, first_limited_response, gateway_env, start_own_redis

pytestmark = pytest.mark.e2e

TAG = "stall"


def test_redis_stall_leaves_no_hold_lease_or_charge(tmp_path: Path) -> None:
    port = free_port()
    redis_proc = start_own_redis(port, tmp_path / "logs", "--appendonly", "no")
    env = gateway_env(port, TAG, tmp_path, TOLLGATE_REDIS_TIMEOUT_MS="300")
    cli = cli_for(env)

    stack = start_stack(log_dir=tmp_path / "stack", port=free_port(),
                        redis_url=env["REDIS_URL"], mock_upstream=True, workers=1, env=env)
    direct = redis.Redis(port=port)
    stopped = False
    try:
        keys = {name: cli("keys", "create", name).splitlines()[-1] for name in ("hard", "soft")}
        cli("apply", "-f", "-", stdin="""
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: hard-budget}
spec: {type: Block, max: 100, selector: {keys: [hard]}}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: soft-budget}
spec: {type: Allow, max: 100, selector: {keys: [soft]}}
---
apiVersion: tollgate.io/v1alpha1
kind: RateLimit
metadata: {name: slots}
spec: {per: key, concurrent: 50}
""")
        clients = {name: openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key,
                                       max_retries=0, timeout=30)
                   for name, key in keys.items()}
        raw = first_limited_response(clients["hard"], timeout=10)
        served: dict[str, Decimal] = {raw.headers["x-tollgate-request-id"]:
                                      Decimal(raw.headers["x-tollgate-cost"])}
        served_by: dict[str, str] = {raw.headers["x-tollgate-request-id"]: "hard"}
        refused: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        done = threading.Event()

        def load(name: str) -> None:
            client = clients[name]
            while not done.is_set():
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        **chat_body(), extra_headers={"x-mock-delay-ms": "30"})
                    with lock:
                        rid = raw.headers["x-tollgate-request-id"]
                        served[rid] = Decimal(raw.headers["x-tollgate-cost"])
                        served_by[rid] = name
                except openai.APIStatusError as exc:
                    if exc.status_code != 503:
                        errors.append(exc)
                    with lock:
                        refused.append(exc.response.headers.get("x-tollgate-request-id", ""))
                except Exception as exc:  # anything else fails the test below
                    errors.append(exc)

        threads = [threading.Thread(target=load, args=(name,), daemon=True)
                   for name in ("hard", "soft") for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        os.kill(redis_proc.pid, signal.SIGSTOP)  # our own redis-server, by PID
        stopped = True
        time.sleep(1.5)
        os.kill(redis_proc.pid, signal.SIGCONT)
        stopped = False
        time.sleep(1.0)
        done.set()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors[:3]
        assert refused, "the stall never reached the request path"
        assert any(served_by[r] == "soft" for r in served)

        def limit_row(name: str) -> list[str]:
            return cli("get", "limits", name).splitlines()[1].split()[1:]  # after NAMESPACE

        expected = {name: sum((c for r, c in served.items() if served_by[r] == name),
                              Decimal(0)) for name in ("hard", "soft")}
        deadline = time.monotonic() + 20
        while True:  # settlements journaled during the stall are replayed with backoff
            rows = {name: limit_row(f"{name}-budget") for name in ("hard", "soft")}
            settled = all(Decimal(rows[n][3]) == expected[n] and Decimal(rows[n][4]) == 0
                          for n in rows)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for name in ("hard", "soft"):
            row = rows[name]
            assert Decimal(row[3]) == expected[name], name  # served ones only, each once
            assert row[4] == "0.000000000", name  # nothing left held
        prefix = f"tg:{{{TAG}}}:"
        assert direct.zcard(f"{prefix}holds") == 0  # nothing for the sweeper to charge later
        for name in ("hard", "soft"):
            assert direct.zcard(f"{prefix}cc:slots:{name}") == 0  # no slot stuck
        events = cli("usage", "--count", "100000")
        for rid in refused:
            assert rid and rid not in events  # no usage event for a refused request
        for rid in served:
            assert rid in events
    finally:
        if stopped:
            os.kill(redis_proc.pid, signal.SIGCONT)
        direct.close()
        stack.stop()
        redis_proc.stop()
