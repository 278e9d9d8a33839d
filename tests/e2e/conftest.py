"""The end-to-end stack: real Redis -> fake upstream -> extproc -> real Envoy, started once per
session in that order (extproc.launch, the same code `tollgate up` runs), stopped by PID."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from extproc import envoyconf
from extproc.envoyconf import ClusterSpec
from extproc.launch import (
    Managed,
    Stack,
    free_port,
    start_envoy,
    start_extproc,
    start_mock_upstream,
    start_stack,
)
from extproc.store.keyschema import KeySchema

OPENAI_UPSTREAM_KEY = "sk-upstream-openai-e2e"
ANTHROPIC_UPSTREAM_KEY = "sk-upstream-anthropic-e2e"
AZURE_UPSTREAM_KEY = "azure-upstream-e2e"
GEMINI_UPSTREAM_KEY = "gemini-upstream-e2e"
SECOND_UPSTREAM_KEY = "sk-second-e2e"
ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"  # test_dashboard: the dashboard's token
# A virtual key of a second (inner) Tollgate, the credential an outer one chains with
# (test_base_url.py); in the outer gateway's environment as INNER_GATEWAY_KEY.
INNER_GATEWAY_KEY = "tg-" + "inner" * 8 + "abc"


@pytest.fixture(scope="session")
def e2e_env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=redis_url,
        TOLLGATE_REDIS_TAG="e2e-" + uuid.uuid4().hex[:8],
        OPENAI_API_KEY=OPENAI_UPSTREAM_KEY,
        ANTHROPIC_API_KEY=ANTHROPIC_UPSTREAM_KEY,
        AZURE_OPENAI_API_KEY=AZURE_UPSTREAM_KEY,
        GEMINI_API_KEY=GEMINI_UPSTREAM_KEY,
        SECOND_API_KEY=SECOND_UPSTREAM_KEY,
        INNER_GATEWAY_KEY=INNER_GATEWAY_KEY,
        POOL_KEY_1="sk-pool-1", POOL_KEY_2="sk-pool-2", POOL_FALLBACK="sk-pool-fallback",
        TOLLGATE_RELOAD_POLL_MS="500",
        TOLLGATE_CORS_ORIGINS="https://app.example.test",  # test_policies: CORS
        TOLLGATE_DENIED_MODELS="o1-pro*",  # test_routing: the global deny list
        # test_bodylog_file: the opt-in body log's JSON-lines file (one per worker)
        TOLLGATE_BODY_LOG_FILE=str(tmp_path_factory.mktemp("bodylog") / "bodylog.jsonl"),
        # test_dashboard: the built-in dashboard on the HTTP port, behind its admin token
        TOLLGATE_DASHBOARD="1",
        TOLLGATE_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    return env


@pytest.fixture(scope="session")
def second_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A second fake provider, behind its own Envoy cluster `second`, for routing tests."""
    proc, port = start_mock_upstream(tmp_path_factory.mktemp("second"))
    try:
        yield port
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def stack(
    redis_url: str,
    e2e_env: dict[str, str],
    second_upstream: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    running = start_stack(
        log_dir=tmp_path_factory.mktemp("stack"),
        port=free_port(),
        redis_url=redis_url,
        mock_upstream=True,
        workers=2,
        envoy_concurrency=2,
        env=e2e_env,
        extra_clusters=(ClusterSpec("second", "127.0.0.1", second_upstream),),
    )
    try:
        yield running
    finally:
        running.stop()


CliRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def cli(e2e_env: dict[str, str], second_upstream: int) -> CliRunner:
    # The stack's Envoy has the cluster `second` too: `apply` accepts Upstreams naming it.
    env = {**e2e_env, "TOLLGATE_ENVOY_CLUSTERS": f"second=http://127.0.0.1:{second_upstream}"}

    def run(
        *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "extproc", *args],
            env=env, capture_output=True, text=True, timeout=60, input=stdin,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"tollgate {' '.join(args)} failed:\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def new_named_key(cli: CliRunner, stack: Stack) -> Callable[..., tuple[str, str]]:
    """Create a key with the CLI and wait until the gateway accepts it (config reload).
    Returns (name, key). The probe request uses a model no limit in the tests selects."""

    def create(*options: str) -> tuple[str, str]:
        name = "k-" + uuid.uuid4().hex[:10]
        key = cli("keys", "create", name, *options).stdout.strip().splitlines()[-1]
        wait_for_status(stack, key, lambda s: s != 401, model="probe-model")
        return name, key

    return create


@pytest.fixture(scope="session")
def new_key(new_named_key: Callable[..., tuple[str, str]]) -> Callable[..., str]:
    def create(*options: str) -> str:
        return new_named_key(*options)[1]

    return create


def chat_body(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **extra}


def spent_and_held(cli: CliRunner, limit: str) -> tuple[Decimal, Decimal]:
    """A limit's SPENT and HELD in USD, as `tollgate get limits` shows them."""
    row = cli("get", "limits", limit).stdout.splitlines()[1].split()[1:]  # after NAMESPACE
    return Decimal(row[3]), Decimal(row[4])


def wait_for_status(
    stack: Stack, key: str, accept: Callable[[int], bool], timeout: float = 5.0,
    model: str = "gpt-4o",
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(
            f"{stack.base_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json=chat_body(model),
            timeout=10,
        )
        if accept(response.status_code) or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def every_worker_has_loaded_the_latest_configuration(stack: Stack, e2e_env: dict[str, str],
                                                    timeout: float = 5.0) -> None:
    """Wait until each extproc worker reports (in /readyz) the generation now in Redis."""
    client = redis.Redis.from_url(e2e_env["REDIS_URL"])
    try:
        generation = int(client.get(KeySchema(e2e_env["TOLLGATE_REDIS_TAG"]).generation) or 0)
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while True:
        workers = httpx.get(f"http://127.0.0.1:{stack.extproc.http}/readyz",
                            timeout=5).json()["workers"]
        if len(workers) == 2 and all(w.get("generation", -1) >= generation for w in workers):
            return
        assert time.monotonic() < deadline, f"not every worker loaded {generation}: {workers}"
        time.sleep(0.05)


def metric_value(stack: Stack, series: str) -> float:
    """One series' value in the extproc's /metrics (summed over the workers there), 0 if it has
    none yet. `series` is the name with its labels as exposed, e.g. `x_total{a="b"}`."""
    prefix = series + " "
    text = httpx.get(f"http://127.0.0.1:{stack.extproc.http}/metrics", timeout=5).text
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def upstream_requests(stack: Stack) -> list[dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{stack.mock_port}/__mock/requests", timeout=5)
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()
    return result


def clear_upstream(stack: Stack) -> None:
    httpx.delete(f"http://127.0.0.1:{stack.mock_port}/__mock/requests", timeout=5)


DATA = Path(__file__).parent.parent / "data"


@contextlib.contextmanager
def replica(stack: Stack, env: dict[str, str], tmp_path: Path, clusters: list[ClusterSpec],
            edit: Callable[[dict[str, Any]], None] | None = None) -> Iterator[tuple[str, int]]:
    """Another extproc (one worker, `env`) + Envoy pair on the stack's Redis: a second replica of
    the sidecar, with the fake OpenAI/Anthropic clusters plus `clusters`; `edit` may change the
    generated Envoy configuration first. Yields (base URL, Envoy admin port); stops both by PID."""
    procs: list[Managed] = []
    try:
        extproc, ports = start_extproc(tmp_path, stack.redis_url, 1, env)
        procs.append(extproc)
        admin, port = free_port(), free_port()
        config = envoyconf.render_bootstrap(
            clusters=[*envoyconf.mock_clusters("127.0.0.1", stack.mock_port or 0), *clusters],
            listen_port=port, admin_port=admin, extproc_port=ports.grpc)
        if edit is not None:
            edit(config)
        procs.append(start_envoy(tmp_path, config, admin, concurrency=1))
        yield f"http://127.0.0.1:{port}", admin
    finally:
        for proc in reversed(procs):
            proc.stop()
