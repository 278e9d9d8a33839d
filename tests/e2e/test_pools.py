"""Credential pools through real Envoy: round robin among primaries within their RPM caps,
fallback only when every primary is exhausted, 503 when nothing is left, and a 429 from the
provider puts a credential in a cooldown that a second, separate gateway respects."""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from extproc import envoyconf
from extproc.launch import Stack
from tests.e2e.conftest import CliRunner, chat_body, clear_upstream, replica, upstream_requests

pytestmark = pytest.mark.e2e


def second_requests(port: int) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(f"http://127.0.0.1:{port}/__mock/requests",
                                             timeout=5).json()
    return result


def clear_second(port: int) -> None:
    httpx.delete(f"http://127.0.0.1:{port}/__mock/requests", timeout=5)


def keys_used(port: int) -> list[str]:
    return [r["headers"]["authorization"].removeprefix("Bearer ") for r in second_requests(port)]


def upstream_doc(name: str, model: str, credentials: str) -> str:
    return f"""apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: {name}}}
spec:
  provider: openai-compatible
  cluster: second
  models: ["{model}"]
  priority: 5
  cooldown: {{seconds: 30}}
  credentials:
{credentials}"""


def wait_routed(client: openai.OpenAI, model: str, port: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        clear_second(port)
        with contextlib.suppress(openai.APIStatusError):
            client.chat.completions.create(**chat_body(model))
        if second_requests(port):
            clear_second(port)
            return
        time.sleep(0.1)
    raise AssertionError("the Upstream never reached the gateway")


def test_round_robin_within_caps_then_fallback_then_503(
    stack: Stack, cli: CliRunner, new_key: Callable[..., str], second_upstream: int
) -> None:
    model = "pool-" + uuid.uuid4().hex[:6]
    cli("apply", "-f", "-", stdin=upstream_doc("pool-" + model[-6:], model, """\
    - {name: p1, secretRef: POOL_KEY_1, rpm: 3}
    - {name: p2, secretRef: POOL_KEY_2, rpm: 3}
    - {name: fb, secretRef: POOL_FALLBACK, isFallback: true, rpm: 2}
"""))
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(), max_retries=0)
    wait_routed(client, model, second_upstream)  # used one request of p1 or p2
    for _ in range(5):
        client.chat.completions.create(**chat_body(model))
    used = keys_used(second_upstream)
    # Primaries alternate while both have room (6 requests in all fit 3 + 3).
    assert set(used) == {"sk-pool-1", "sk-pool-2"}
    assert sorted(Counter(used).values()) == [2, 3]
    assert all(a != b for a, b in itertools.pairwise(used))
    # Both primaries are at their cap: the fallback takes over, until it is full too.
    clear_second(second_upstream)
    for _ in range(2):
        client.chat.completions.create(**chat_body(model))
    assert keys_used(second_upstream) == ["sk-pool-fallback"] * 2
    with pytest.raises(openai.APIStatusError) as none_left:
        client.chat.completions.create(**chat_body(model))
    assert none_left.value.status_code == 503
    assert none_left.value.code == "no_credential_available"
    assert int(none_left.value.response.headers["retry-after"]) >= 1


@pytest.fixture
def second_gateway(
    stack: Stack, e2e_env: dict[str, str], tmp_path: Path, second_upstream: int
) -> Iterator[str]:
    """Another extproc + Envoy pair on the same Redis: a second replica of the sidecar."""
    with replica(stack, e2e_env, tmp_path,
                 [envoyconf.ClusterSpec("second", "127.0.0.1", second_upstream)]) as (url, _):
        yield url


def test_cooldown_is_shared_by_every_replica(
    stack: Stack, cli: CliRunner, new_key: Callable[..., str], second_upstream: int,
    second_gateway: str,
) -> None:
    model = "cool-" + uuid.uuid4().hex[:6]
    cli("apply", "-f", "-", stdin=upstream_doc("cool-" + model[-6:], model, """\
    - {name: c1, secretRef: POOL_KEY_1}
    - {name: c2, secretRef: POOL_KEY_2}
"""))
    key = new_key()
    here = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    there = openai.OpenAI(base_url=f"{second_gateway}/v1", api_key=key, max_retries=0)
    wait_routed(here, model, second_upstream)
    wait_routed(there, model, second_upstream)
    # The provider rate-limits c1 on the first gateway (the call is retried on c2: no error;
    # tests/e2e/test_retry.py) ...
    mock = f"http://127.0.0.1:{second_upstream}/__mock/faults"
    httpx.post(mock, json={"credential": "sk-pool-1", "status": 429, "retry_after": "20"},
               timeout=5)
    try:
        for _ in range(2):  # round robin: one of two calls tries c1 first
            here.chat.completions.create(**chat_body(model))
        assert "sk-pool-1" in keys_used(second_upstream)
        clear_second(second_upstream)
        # ... and the second gateway no longer uses it, for this model.
        for _ in range(4):
            there.chat.completions.create(**chat_body(model))
        assert keys_used(second_upstream) == ["sk-pool-2"] * 4
    finally:
        httpx.delete(mock, timeout=5)


def test_backup_upstream_serves_when_the_primary_has_no_credential_left(
    stack: Stack, cli: CliRunner, new_key: Callable[..., str], second_upstream: int
) -> None:
    """`primary` (rpm 1, cluster `second`) and `backup` (the main fake provider) serve the
    same model: the second request goes to the backup instead of a 503."""
    model = "backup-" + uuid.uuid4().hex[:6]
    suffix = model[-6:]
    cli("apply", "-f", "-", stdin=upstream_doc("primary-" + suffix, model, """\
    - {name: only, secretRef: POOL_KEY_1, rpm: 1}
""").replace("priority: 5", "priority: 1"))
    cli("apply", "-f", "-", stdin=f"""apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: backup-{suffix}}}
spec:
  provider: openai-compatible
  cluster: openai
  models: ["{model}"]
  priority: 2
  credentials:
    - {{name: main, secretRef: SECOND_API_KEY}}
""")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(), max_retries=0)
    # Both Upstreams are loaded once the backup answers (the primary is then at its cap).
    deadline, primary_served = time.monotonic() + 5, False
    while True:
        clear_second(second_upstream)
        clear_upstream(stack)
        with contextlib.suppress(openai.APIStatusError):
            client.chat.completions.create(**chat_body(model))
        primary_served = primary_served or bool(second_requests(second_upstream))
        if primary_served and [r for r in upstream_requests(stack)
                               if r["body"].get("model") == model]:
            break
        assert time.monotonic() < deadline, "the backup Upstream never served"
        time.sleep(0.1)
    clear_second(second_upstream)
    clear_upstream(stack)
    answer = client.chat.completions.create(**chat_body(model))
    assert answer.choices[0].message.content
    assert second_requests(second_upstream) == []  # the primary's only credential is capped
    served = [r for r in upstream_requests(stack) if r["body"].get("model") == model]
    assert len(served) == 1
    assert served[0]["headers"]["authorization"] == "Bearer sk-second-e2e"
