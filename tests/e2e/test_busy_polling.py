"""Busy polling (TOLLGATE_BUSY_POLL_US) on a real sidecar replica: calls through the full limits
path are answered and charged as without it, and once traffic stops the worker sleeps again
(no CPU burnt while idle). Real Envoy, extproc and Redis, the official OpenAI SDK as client."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import CliRunner, replica
from tests.e2e.test_passthrough import limited_key, settled, wait_for_key

pytestmark = pytest.mark.e2e


def _worker_pid(logs: Path) -> int:
    deadline = time.monotonic() + 10
    while True:
        found = re.search(r"worker 0 \(pid (\d+)\) listening", (logs / "extproc.log").read_text())
        if found:
            return int(found.group(1))
        assert time.monotonic() < deadline, "the worker never said it listens"
        time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_polling_answers_and_charges_as_usual_and_sleeps_when_idle(
    stack: Stack, e2e_env: dict[str, str], tmp_path: Path, cli: CliRunner,
    new_named_key: Callable[..., tuple[str, str]],
) -> None:
    env = {**e2e_env, "TOLLGATE_BUSY_POLL_US": "5000"}
    with replica(stack, env, tmp_path, []) as (url, _):
        limit, key = limited_key(cli, new_named_key)
        wait_for_key(url, key)
        assert "polls on for 5000 us after each read" in (tmp_path / "extproc.log").read_text()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        charged = Decimal(0)
        for _ in range(5):  # one at a time: the case busy polling is for
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
            assert raw.parse().choices[0].message.content
            charged += Decimal(raw.headers["x-tollgate-cost"])
        spent, held = settled(cli, limit)
        assert held == 0 and spent == charged > 0

        # Idle: one window after the last read the worker sleeps again. Over a second with no
        # traffic it uses a few milliseconds of CPU (its timers), not the second a poll would.
        worker = _worker_pid(tmp_path)
        time.sleep(0.2)
        before = _cpu_seconds(worker)
        time.sleep(1.0)
        assert _cpu_seconds(worker) - before < 0.2
