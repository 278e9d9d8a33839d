"""`tollgate up` as a user runs it: one command brings up embedded Redis, the fake upstream,
extproc and Envoy, prints `ready`, serves the SDKs, and stops everything on SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from extproc.launch import free_port

pytestmark = pytest.mark.e2e


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _read_until(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    """Lines of output up to the first containing `needle`. A reader thread, because select()
    on a buffered pipe misses lines already pulled into Python's buffer."""
    assert proc.stdout is not None
    stream = proc.stdout
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} line; output so far:\n" + "\n".join(seen))


def test_up_with_embedded_redis_and_mock_upstream(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "OPENAI_API_KEY",
                                                            "ANTHROPIC_API_KEY")}
    env["TOLLGATE_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--mock-upstream", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )
    try:
        lines = _read_until(proc, "ready", timeout=90)
        redis_line = next(line for line in lines if line.startswith("redis:"))
        assert "(embedded)" in redis_line
        redis_port = int(redis_line.split("127.0.0.1:")[1].split("/")[0])

        # No REDIS_URL: the CLI finds the Redis of the running `tollgate up`.
        created = subprocess.run(
            [sys.executable, "-m", "extproc", "keys", "create", "demo", "--user", "dev"],
            env=env, capture_output=True, text=True, timeout=30, check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
        assert key.startswith("tg-") and len(created.stdout.strip().splitlines()) == 1

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                               max_retries=0)
        deadline = time.monotonic() + 5
        while True:
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                break
            except openai.AuthenticationError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert float(raw.headers["x-tollgate-cost"]) > 0
        assert raw.parse().choices[0].message.content

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        # Everything it started is gone: the listener and the embedded Redis are closed.
        assert not _port_open(port)
        assert not _port_open(redis_port)
    finally:
        if proc.poll() is None:  # a failed assertion: stop it the polite way first
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
