"""Every extproc worker gets its share of the requests, whatever Envoy does with connections.

Before lanes, each Envoy worker thread held one gRPC connection to the workers' shared port and
the kernel gave each connection to one worker: one client connection (one Envoy thread) meant
one busy worker and one idle one, and under load whole runs went to a single worker."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import chat_body

pytestmark = pytest.mark.e2e

REQUESTS = 40


def requests_by_worker(stack: Stack) -> dict[int, int]:
    workers = httpx.get(f"http://127.0.0.1:{stack.extproc.http}/readyz", timeout=5).json()[
        "workers"]
    return {w["index"]: int(w.get("requests", 0)) for w in workers}


def test_one_client_connection_is_served_by_both_workers(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = new_key()
    before = requests_by_worker(stack)
    with httpx.Client(base_url=stack.base_url, timeout=10,
                      headers={"Authorization": f"Bearer {key}"}) as client:  # one connection
        for _ in range(REQUESTS):
            assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
    deadline = time.monotonic() + 5  # the workers report their counts every half second
    while True:
        after = requests_by_worker(stack)
        seen = {i: after[i] - before.get(i, 0) for i in after}
        if sum(seen.values()) >= REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(seen) == [0, 1]
    assert sum(seen.values()) >= REQUESTS
    # Round robin over the lanes, half of them each worker's: an even split, give or take a few.
    assert min(seen.values()) >= REQUESTS * 0.35, seen
