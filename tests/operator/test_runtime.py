"""`tollgate operator` itself: the real kopf runtime, run as `tollgate up` would run it, against a
real Redis and with no Kubernetes API server (none can run here, and none is faked). What can be
seen without one: the one-writer lease gates startup, and the process ends cleanly either way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from extproc.launch import free_port
from extproc.store.keyschema import KeySchema

pytestmark = pytest.mark.redis


def start_operator(redis_url: str, tag: str, home: Path, health_port: int = 0,
                   ) -> tuple[subprocess.Popen[bytes], Path]:
    log = home / "operator.log"
    env = {**os.environ, "TOLLGATE_REDIS_TAG": tag, "HOME": str(home),
           "KUBECONFIG": str(home / "no-kubeconfig")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "extproc", "operator",
                                 "--redis-url", redis_url, "--health-port", str(health_port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    return log.read_text(errors="replace")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def test_a_second_replica_waits_for_the_lease_and_writes_nothing(
    redis_url: str, tag: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    lease = KeySchema(tag).operator_lease
    client.set(lease, "the-other-replica", px=60_000)  # another replica is the writer
    health = free_port()
    proc, log = start_operator(redis_url, tag, tmp_path, health)
    try:
        content = wait_for_line(proc, log, "waiting for the operator lease")
        assert "waiting for the operator lease" in content, content
        assert proc.poll() is None  # still waiting, not failed
        # Not ready: a Service (the webhook's) sends nothing to a standby replica.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{health}/healthz", timeout=2)
        assert client.get(lease) == b"the-other-replica"
        assert "holding the operator lease" not in log.read_text()
        proc.send_signal(signal.SIGTERM)  # as Kubernetes stops a pod
        assert proc.wait(30) == 0
    finally:
        stop(proc)
        client.close()
    assert client.get(lease) == b"the-other-replica"  # never touched


def test_the_lease_holder_starts_and_without_an_api_server_stops_cleanly(
    redis_url: str, tag: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    proc, log = start_operator(redis_url, tag, tmp_path)
    try:
        content = wait_for_line(proc, log, "cannot log in to the Kubernetes API")
        assert "holding the operator lease: this replica writes" in content, content
        assert proc.wait(30) == 1  # no API server here: a clear error, exit status 1
        assert "cannot log in to the Kubernetes API" in log.read_text()
        # The cleanup handler gave the lease up, so a restarted replica does not wait for it.
        assert client.get(KeySchema(tag).operator_lease) is None
    finally:
        stop(proc)
        client.close()


