"""`tollgate up` as a user runs it: one command brings up embedded Redis, the fake upstream,
extproc and Envoy, prints `ready`, serves the SDKs, and stops everything on SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
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
        # Progress while it starts, one line per component.
        assert [line.strip() for line in lines if line.startswith("  starting")] == [
            "starting Redis (embedded) ...", "starting the mock upstream ...",
            "starting extproc (1 worker) ...", "starting Envoy ..."]
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


def _listening_with_reuseport(port: int) -> socket.socket:
    """What another gateway's Envoy holds: a listener with SO_REUSEPORT set."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_up_refuses_a_listener_port_another_gateway_holds(redis_url: str,
                                                          tmp_path: Path) -> None:
    port = free_port()
    other = _listening_with_reuseport(port)
    env = dict(os.environ, TOLLGATE_HOME=str(tmp_path / "home"))
    try:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "extproc", "up", "--mock-upstream", "--port", str(port),
             "--redis-url", redis_url],
            capture_output=True, text=True, env=env, timeout=60,
        )
    finally:
        other.close()
    assert result.returncode == 1
    assert f"port 127.0.0.1:{port} is already in use" in result.stderr
    assert "ready" not in result.stdout
    assert time.monotonic() - started < 30  # nothing was started and waited for


def test_a_second_up_in_the_same_home_refuses_and_names_the_first(tmp_path: Path) -> None:
    """Two `up`s in one home would share its record of the running gateway (the CLI would lose
    the first) and the embedded Redis' data files: the second refuses before starting anything."""
    home = tmp_path / "home"
    home.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (home / "up.json").write_text(json.dumps({
            "pid": first.pid, "redis_url": "redis://127.0.0.1:1/0",
            "base_url": "http://127.0.0.1:10000"}))
        result = subprocess.run(
            [sys.executable, "-m", "extproc", "up", "--mock-upstream", "--port",
             str(free_port())],
            capture_output=True, text=True, env=dict(os.environ, TOLLGATE_HOME=str(home)),
            timeout=60)
    finally:
        first.kill()
        first.wait()
    assert result.returncode == 1
    assert f"already running here (pid {first.pid}, http://127.0.0.1:10000" in result.stderr
    assert "TOLLGATE_HOME=" in result.stderr
    assert "ready" not in result.stdout and "starting" not in result.stdout
    assert not (home / "data").exists()  # no Redis was started on the first one's files


def test_serve_refuses_a_grpc_port_another_server_holds(redis_url: str) -> None:
    grpc_port, http_port = free_port(), free_port()
    other = _listening_with_reuseport(grpc_port)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "extproc", "serve", "--redis-url", redis_url,
             "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        other.close()
    assert result.returncode == 1
    assert f"gRPC port 127.0.0.1:{grpc_port}" in result.stderr
    assert "already in use" in result.stderr


def test_up_warns_drains_on_sigterm_and_cleans_up(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    env.update(TOLLGATE_HOME=str(home), TOLLGATE_REDIS_TAG="up-" + uuid.uuid4().hex[:8])
    env.pop("AZURE_EAST_KEY_1", None)
    # An Upstream whose secret nobody set: `up` must say so before the first call fails.
    applied = subprocess.run(
        [sys.executable, "-m", "extproc", "apply", "--redis-url", redis_url, "-f", "-"],
        input=("apiVersion: tollgate.io/v1alpha1\nkind: Upstream\nmetadata: {name: azure-east}\n"
               "spec: {provider: azure-openai, cluster: azure-openai, models: [gpt-4o],\n"
               "       credentials: [{name: east-1, secretRef: AZURE_EAST_KEY_1}]}\n"),
        capture_output=True, text=True, env=env, timeout=30, check=True)
    assert "AZURE_EAST_KEY_1 not found" in applied.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--mock-upstream", "--port", str(port),
         "--redis-url", redis_url, "--drain-seconds", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )
    try:
        lines = _read_until(proc, "ready", timeout=90)
        log_dir = Path(next(line for line in lines if "logs in" in line)
                       .split("logs in ")[1].split(")")[0])
        assert log_dir.is_dir() and (home / "up.json").exists()
        warning = next(line for line in lines if "azure-east" in line)
        assert warning.startswith("warning:") and "AZURE_EAST_KEY_1" in warning
        assert not any("'openai'" in line for line in lines if line.startswith("warning:"))

        created = subprocess.run(
            [sys.executable, "-m", "extproc", "keys", "create", "drain", "--redis-url",
             redis_url], env=env, capture_output=True, text=True, timeout=30, check=True)
        key = created.stdout.strip().splitlines()[-1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                               max_retries=0)
        deadline = time.monotonic() + 5
        while True:  # the new key reaches the workers within about a second
            try:
                client.models.list()
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline
                time.sleep(0.1)

        # A slow stream (20 words, 100 ms apart) is in flight when SIGTERM arrives.
        words: list[str] = []
        done = threading.Event()

        def consume() -> None:
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                stream=True, extra_headers={"x-mock-words": "20",
                                            "x-mock-chunk-delay-ms": "100"})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    words.append(chunk.choices[0].delta.content)
            done.set()

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while not words:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=30)
        assert done.is_set(), "the in-flight stream was cut"
        assert len("".join(words).split()) == 20
        assert proc.wait(timeout=60) == 0
        assert not _port_open(port)
        assert not log_dir.exists()  # its temporary folder is gone
        assert not (home / "up.json").exists()  # and so is the record of a running `up`
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_json_logs_have_one_access_line_per_request(redis_url: str, tmp_path: Path) -> None:
    from extproc.launch import start_stack

    env = dict(os.environ, TOLLGATE_LOG_FORMAT="json", OPENAI_API_KEY="sk-provider-secret",
               TOLLGATE_REDIS_TAG="json-" + uuid.uuid4().hex[:8])
    created = subprocess.run(
        [sys.executable, "-m", "extproc", "keys", "create", "logged", "--redis-url", redis_url],
        env=env, capture_output=True, text=True, timeout=30, check=True)
    key = created.stdout.strip().splitlines()[-1]
    stack = start_stack(log_dir=tmp_path, port=free_port(), redis_url=redis_url,
                        mock_upstream=True, env=env)
    try:
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "the secret plan"}])
        request_id = raw.headers["x-tollgate-request-id"]
        cost_header = raw.headers["x-tollgate-cost"]
    finally:
        stack.stop()
    text = (tmp_path / "extproc.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # all JSON
    access = [line for line in lines if line["logger"] == "tollgate.access"]
    assert [a["request_id"] for a in access] == [request_id]  # exactly one, for this request
    (entry,) = access
    assert (entry["key"], entry["model"], entry["status"]) == ("logged", "gpt-4o-mini", 200)
    assert entry["cost_usd"] == cost_header  # the same exact decimal the client was told
    assert entry["latency_ms"] >= 0
    assert "the secret plan" not in text and key not in text and "sk-provider-secret" not in text
