"""The extproc process tree's own safety nets: a worker that dies is restarted by the supervisor
(and /healthz follows), and SIGTERM lets a stream in flight finish and be settled."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from extproc import envoyconf
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import Managed, Stack, free_port, start_envoy, start_extproc
from extproc.store.keyschema import KeySchema
from tests.e2e.conftest import CliRunner, chat_body, spent_and_held
from tests.e2e.test_retry import tracked_key

pytestmark = pytest.mark.e2e


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first truthy value of `check()`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def own_envoy(stack: Stack, grpc_port: int, tmp_path: Path) -> tuple[Managed, int]:
    """A one-thread Envoy in front of the fake upstream and the extproc on `grpc_port`, for a
    test that runs its own extproc: (Envoy, listener port)."""
    admin, port = free_port(), free_port()
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", stack.mock_port or 0),
        listen_port=port, admin_port=admin, extproc_port=grpc_port)
    return start_envoy(tmp_path / "envoy", config, admin, concurrency=1), port


def test_a_killed_worker_is_restarted_and_healthz_says_so(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    base = f"http://127.0.0.1:{stack.extproc.http}"
    health = httpx.get(f"{base}/healthz", timeout=5).json()
    assert health["status"] == "ok"
    victim, other = health["workers"]
    os.kill(victim["pid"], signal.SIGKILL)
    poll(lambda: not alive(victim["pid"]), 5, "the worker to die")

    def restarted() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{base}/healthz", timeout=5).json()
        pid = body["workers"][0]["pid"]
        return body if body["status"] == "ok" and pid != victim["pid"] else None

    health = poll(restarted, 15, "the supervisor to restart the worker")
    replacement = health["workers"][0]
    assert replacement["alive"] and alive(replacement["pid"])
    assert health["workers"][1]["pid"] == other["pid"]  # the other worker was left alone
    # The new worker loads the configuration: the gateway is ready and serving again.
    ready = poll(lambda: (r := httpx.get(f"{base}/readyz", timeout=5)).status_code == 200
                 and r.json(), 15, "readiness")
    assert ready["workers"][0]["pid"] == replacement["pid"]
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=10,
                          headers={"authorization": f"Bearer {new_key()}"},
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200 and response.headers["x-tollgate-cost"]


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_sigterm_lets_a_stream_in_flight_finish_and_settles_it(
    stack: Stack, redis_url: str, e2e_env: dict[str, str], tmp_path: Path,
    new_key: Callable[..., str], transport: str,
) -> None:
    """On either gRPC transport (TOLLGATE_GRPC_TRANSPORT)."""
    key = new_key()  # created before this extproc starts: in its first snapshot
    extproc, ports = start_extproc(tmp_path / "extproc", redis_url, workers=1,
                                   env={**e2e_env, "TOLLGATE_GRPC_TRANSPORT": transport})
    envoy = None
    try:
        envoy, port = own_envoy(stack, ports.grpc, tmp_path)
        body = {"model": "gpt-4o-mini", "stream": True,
                "messages": [{"role": "user", "content": "Tell me something"}]}
        slow = {"x-mock-chunk-delay-ms": "50", "x-mock-words": "10"}
        received = b""
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                          timeout=30, headers={"authorization": f"Bearer {key}", **slow}) as r:
            assert r.status_code == 200
            request_id = r.headers["x-tollgate-request-id"]
            chunks = r.iter_raw()
            received += next(chunks)
            extproc.popen.send_signal(signal.SIGTERM)  # the supervisor: it drains its workers
            for chunk in chunks:
                received += chunk
        # The stream ran to its end, priced, although the extproc was asked to stop.
        assert received.rstrip().endswith(b"data: [DONE]")
        assert b": xproxy_result " in received
        assert received.count(b'"content"') >= 10
        # The extproc then exits by itself, and the request's settlement is in Redis.
        poll(lambda: not extproc.alive(), 30, "the extproc to exit")
        assert extproc.popen.returncode == 0
        stream_key = KeySchema(e2e_env["TOLLGATE_REDIS_TAG"]).usage_stream
        client = redis.Redis.from_url(redis_url)
        try:
            events = [usage_pb2.UsageEvent.FromString(fields[b"event"])
                      for _, fields in client.xrevrange(stream_key, count=200)]
        finally:
            client.close()
        (event,) = [e for e in events if e.request_id == request_id]
        assert event.streamed and event.priced and event.tokens.output >= 10
    finally:
        if envoy is not None:
            envoy.stop()
        extproc.stop()


def test_readyz_counts_the_requests_each_worker_has_seen(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    """How the load splits over the workers is visible (docs/performance.md)."""
    def seen() -> int:
        workers = httpx.get(f"http://127.0.0.1:{stack.extproc.http}/readyz",
                            timeout=5).json()["workers"]
        assert len(workers) == 2
        return sum(int(w["requests"]) for w in workers)

    before = seen()
    key = new_key()
    with httpx.Client(base_url=stack.base_url, timeout=10,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(5):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    poll(lambda: seen() >= before + 5, 5, "the workers to report 5 more requests")


def test_envoy_connections_are_spread_over_the_workers(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    """Envoy keeps one connection per thread (2 here, and 2 workers): each worker gets one,
    whichever worker the kernel handed them to, so both workers serve requests
    (docs/performance.md)."""
    if os.environ.get("TOLLGATE_GRPC_TRANSPORT") == "grpcio":
        pytest.skip("grpc.aio leaves the split to the kernel (no balancing)")
    key = new_key()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(16):  # new client connections: Envoy spreads them over its two threads
        with httpx.Client(base_url=stack.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200

    def workers() -> list[dict[str, int]]:
        listed: list[dict[str, int]] = httpx.get(
            f"http://127.0.0.1:{stack.extproc.http}/readyz", timeout=5).json()["workers"]
        return listed

    poll(lambda: sorted(w.get("connections", 0) for w in workers()) == [1, 1], 5,
         "one Envoy connection per worker")
    assert all(w["requests"] > 0 for w in workers())


def test_a_worker_stalled_past_the_message_timeout_costs_only_that_request(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    redis_url: str, e2e_env: dict[str, str], tmp_path: Path,
) -> None:
    """The worker freezes (SIGSTOP) while a call waits for its provider. Envoy gives up on the
    response message after its 1 s message timeout and resets the ext_proc stream: the client
    gets Envoy's JSON 504, and once the worker runs again it reads the reset, releases that
    call's hold and serves the next call."""
    key, limit = tracked_key(cli, new_named_key)
    extproc, ports = start_extproc(tmp_path / "extproc", redis_url, workers=1, env=e2e_env)
    envoy = None
    worker = 0
    try:
        envoy, port = own_envoy(stack, ports.grpc, tmp_path)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        auth = {"authorization": f"Bearer {key}"}
        assert httpx.post(url, json=chat_body(), headers=auth, timeout=10).status_code == 200
        worker = httpx.get(f"http://127.0.0.1:{ports.http}/readyz",
                           timeout=5).json()["workers"][0]["pid"]
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, url, json=chat_body(), timeout=20,
                               headers={**auth, "x-mock-delay-ms": "700"})
            time.sleep(0.3)  # admitted and reserved, waiting for the provider
            os.kill(worker, signal.SIGSTOP)
            response = slow.result()
        # Envoy's answer to a message timeout, in Tollgate's error shape.
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "gateway_processing_failed"
        os.kill(worker, signal.SIGCONT)

        def served() -> bool:
            # Right after the stop the worker's event loop is a second late, and admission
            # control refuses new calls with its JSON 503 until it has caught up.
            answer = httpx.post(url, json=chat_body(), headers=auth, timeout=10)
            if answer.status_code == 503:
                assert answer.json()["error"]["code"] == "overloaded"
                return False
            assert answer.status_code == 200
            return True

        poll(served, 5, "the worker to serve again")
        poll(lambda: spent_and_held(cli, limit)[1] == 0, 10, "the stalled call's hold to go")
    finally:
        if worker:
            os.kill(worker, signal.SIGCONT)
        if envoy is not None:
            envoy.stop()
        extproc.stop()
