"""What /metrics shows after the request path's batched metric writes (`metrics.count`,
`metrics.observe`): in multiprocess mode, as a worker writes them, the sums of every increment,
also in a process forked after metrics were written (it writes its own file)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

# Run in a fresh interpreter: prometheus_client chooses multiprocess values at import time.
SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    from extproc.server import metrics

    async def requests(n):
        for _ in range(n):
            metrics.count(metrics.labelled(metrics.REQUESTS, "allowed", "ok"))
            metrics.count(metrics.labelled(metrics.TOKENS, "input"), 9)
            metrics.count(metrics.labelled(metrics.TOKENS, "output"), 2)
            metrics.observe(metrics.PHASE_SECONDS.labels("request_body"), 0.0003)
            await asyncio.sleep(0)  # the loop turn ends: the tally is written

    asyncio.run(requests(3))
    pid = os.fork()
    if pid == 0:
        asyncio.run(requests(2))
        os._exit(0)
    os.waitpid(pid, 0)
    asyncio.run(requests(1))
""")


def collected(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples}


def test_batched_writes_reach_metrics_in_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, timeout=60)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2  # parent and forked child
    values = collected(tmp_path)
    requests = 3 + 2 + 1
    assert values["tollgate_requests_total", (("decision", "allowed"), ("reason", "ok"))] \
        == requests
    assert values["tollgate_tokens_total", (("kind", "input"),)] == 9 * requests
    assert values["tollgate_tokens_total", (("kind", "output"),)] == 2 * requests
    phase = (("phase", "request_body"),)
    assert values["tollgate_phase_seconds_count", phase] == requests
    assert values["tollgate_phase_seconds_sum", phase] == pytest.approx(0.0003 * requests)
    assert values["tollgate_phase_seconds_bucket", (("le", "0.0005"), *phase)] == requests
    assert values["tollgate_phase_seconds_bucket", (("le", "0.00025"), *phase)] == 0
