"""A gateway stack on a redis-server of the test's own, which the test may stop, stall (SIGSTOP)
or restart by its PID: shared by the Redis outage and stall tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import openai

from extproc.launch import Managed, find_redis_binary, redis_ping, start_process, wait_until
from tests.e2e.conftest import chat_body


def start_own_redis(port: int, log_dir: Path, *options: str) -> Managed:
    """redis-server on loopback `port`, without snapshots; `options` are more server flags."""
    binary = find_redis_binary(prefer_embedded=False)
    assert binary is not None
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *options]
    proc = start_process(f"redis-{port}-{time.monotonic_ns()}", argv, log_dir)
    wait_until(lambda: redis_ping(port), proc, 10, "starting")
    return proc


def gateway_env(port: int, tag: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The gateway's environment: that Redis, a journal in `tmp_path`, a short request-path
    Redis timeout (so an outage shows at once) and a fast configuration reload."""
    env = dict(os.environ)
    env.update(REDIS_URL=f"redis://127.0.0.1:{port}/0", TOLLGATE_REDIS_TAG=tag,
               OPENAI_API_KEY="sk-up", TOLLGATE_JOURNAL_DIR=str(tmp_path / "journal"),
               TOLLGATE_REDIS_HOT_TIMEOUT_MS="100", TOLLGATE_RELOAD_POLL_MS="300", **extra)
    return env


def cli_for(env: dict[str, str]) -> Callable[..., str]:
    """`tollgate ARGS` in that environment; returns its output, fails the test on an error."""

    def cli(*args: str, stdin: str | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "extproc", *args], env=env, input=stdin,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    return cli


def first_limited_response(client: openai.OpenAI, timeout: float) -> openai.APIResponse:  # type: ignore[type-arg]
    """Retries a chat call until the keys and limits just applied have reached the worker (the
    response reports limit states); returns that response."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = client.chat.completions.with_raw_response.create(**chat_body())
            if "x-tollgate-limits" in raw.headers:
                return raw
        except openai.AuthenticationError:
            pass
        assert time.monotonic() < deadline, "configuration never arrived"
        time.sleep(0.1)
