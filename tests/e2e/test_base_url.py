"""Credentials with their own base URL through real Envoy: the generated forward proxy cluster
reaches a second fake upstream on another loopback port, and a Tollgate chained to another
Tollgate (a second stack) prices the call once, with the inner gateway's report dropped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from extproc.core.keys import hash_key
from extproc.launch import Stack, free_port, start_stack
from tests.e2e.conftest import (
    INNER_GATEWAY_KEY,
    OPENAI_UPSTREAM_KEY,
    SECOND_UPSTREAM_KEY,
    CliRunner,
    chat_body,
    clear_upstream,
    spent_and_held,
    upstream_requests,
)

pytestmark = pytest.mark.e2e


def _apply(cli: CliRunner, text: str) -> None:
    cli("apply", "-f", "-", stdin="apiVersion: tollgate.io/v1alpha1\n" + text)


def _second_requests(port: int) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(
        f"http://127.0.0.1:{port}/__mock/requests", timeout=5).json()
    return result


def _until_routed(client: openai.OpenAI, model: str, timeout: float = 5.0) -> Any:
    """The applied Upstream reaches the workers within about a second."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.chat.completions.with_raw_response.create(**chat_body(model))
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_credential_with_a_base_url_reaches_its_own_server(
    stack: Stack, cli: CliRunner, new_key: Callable[..., str], second_upstream: int
) -> None:
    """No Envoy cluster names that server: the credential's URL does (path prefix `/v1` as an
    SDK's base_url), through the generated forward proxy cluster; JSON and streams priced."""
    name = "direct-" + uuid.uuid4().hex[:6]
    _apply(cli, f"kind: Upstream\nmetadata: {{name: {name}}}\nspec:\n"
                f"  provider: openai-compatible\n  cluster: openai\n"
                f"  models: [{name}-mini]\n  aliases: {{{name}-mini: gpt-4o-mini}}\n"
                f"  credentials:\n    - {{name: far, secretRef: SECOND_API_KEY, "
                f"baseUrl: 'http://127.0.0.1:{second_upstream}/v1'}}\n")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(), max_retries=0)
    _until_routed(client, f"{name}-mini")
    httpx.delete(f"http://127.0.0.1:{second_upstream}/__mock/requests", timeout=5)
    clear_upstream(stack)
    raw = client.chat.completions.with_raw_response.create(**chat_body(f"{name}-mini"))
    assert raw.parse().model == "gpt-4o-mini"
    assert float(raw.headers["x-tollgate-cost"]) > 0
    stream = client.chat.completions.create(**chat_body(f"{name}-mini"), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    seen = _second_requests(second_upstream)
    assert [r["path"] for r in seen] == ["/v1/chat/completions"] * 2
    assert {r["headers"]["authorization"] for r in seen} == {f"Bearer {SECOND_UPSTREAM_KEY}"}
    assert seen[0]["headers"]["host"] == f"127.0.0.1:{second_upstream}"
    assert upstream_requests(stack) == []  # the Upstream's own cluster saw nothing


@pytest.fixture(scope="module")
def inner(redis_url: str, e2e_env: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second Tollgate (its own Envoy, extproc and fake provider; its own key space in the
    same Redis) with a key the outer gateway's credential carries."""
    env = {**e2e_env, "TOLLGATE_REDIS_TAG": "inner-" + uuid.uuid4().hex[:8]}
    running = start_stack(log_dir=tmp_path_factory.mktemp("inner"), port=free_port(),
                          redis_url=redis_url, mock_upstream=True, workers=1,
                          envoy_concurrency=1, env=env)
    try:
        key = ("kind: VirtualKey\nmetadata: {name: outer}\n"
               f"spec: {{keySha256: {hash_key(INNER_GATEWAY_KEY)}}}\n")
        subprocess.run([sys.executable, "-m", "extproc", "apply", "-f", "-"], env=env,
                       input="apiVersion: tollgate.io/v1alpha1\n" + key, check=True,
                       capture_output=True, text=True, timeout=60)
        yield running
    finally:
        running.stop()


def test_tollgate_chained_to_tollgate_prices_once(
    stack: Stack, inner: Stack, cli: CliRunner,
    new_named_key: Callable[..., tuple[str, str]],
) -> None:
    """The outer gateway's credential is a virtual key of the inner one (`baseUrl` at the inner
    gateway's root). The client gets the outer gateway's cost, request id and result object,
    each once, equal to what the inner gateway charges for the same call; the outer Limit is
    charged that cost once; the provider sees the inner gateway's provider key."""
    upstream = "chain-" + uuid.uuid4().hex[:6]
    _apply(cli, f"kind: Upstream\nmetadata: {{name: {upstream}}}\nspec:\n"
                f"  provider: openai\n  cluster: openai\n  models: [{upstream}-*]\n"
                f"  aliases: {{{upstream}-mini: gpt-4o-mini}}\n"
                f"  credentials:\n    - {{name: inner, secretRef: INNER_GATEWAY_KEY, "
                f"baseUrl: 'http://127.0.0.1:{inner.port}'}}\n")
    name, key = new_named_key()
    limit = "chain-" + uuid.uuid4().hex[:6]
    _apply(cli, f"kind: Limit\nmetadata: {{name: {limit}}}\nspec:\n  type: Allow\n  max: 10\n"
                f"  selector: {{keys: [{name}]}}\n")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    _until_routed(client, f"{upstream}-mini")
    spent_before, _ = spent_and_held(cli, limit)
    clear_upstream(inner)
    clear_upstream(stack)
    raw = client.chat.completions.with_raw_response.create(**chat_body(f"{upstream}-mini"))
    direct = openai.OpenAI(base_url=f"{inner.base_url}/v1", api_key=INNER_GATEWAY_KEY,
                           max_retries=0).chat.completions.with_raw_response.create(
        **chat_body("gpt-4o-mini"))
    cost = raw.headers["x-tollgate-cost"]
    assert cost == direct.headers["x-tollgate-cost"] and float(cost) > 0
    assert raw.headers.get_list("x-tollgate-cost") == [cost]
    request_id = raw.headers["x-tollgate-request-id"]
    assert raw.headers.get_list("x-tollgate-request-id") == [request_id]
    assert request_id != direct.headers["x-tollgate-request-id"]
    body = raw.http_response.content
    assert body.count(b'"xproxy_result"') == 1
    assert json.loads(body)["xproxy_result"]["request_id"] == request_id
    seen = upstream_requests(inner)
    assert len(seen) == 2 and seen[0]["headers"]["authorization"] == \
        f"Bearer {OPENAI_UPSTREAM_KEY}"
    assert seen[0]["body"]["model"] == "gpt-4o-mini"
    assert upstream_requests(stack) == []
    deadline = time.monotonic() + 5
    while True:  # settlement is written right after the answer
        spent, held = spent_and_held(cli, limit)
        if spent != spent_before or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (spent - spent_before, held) == (type(spent)(cost), 0)


def _stream_results(base_url: str, key: str, model: str) -> tuple[str, list[str]]:
    """A streamed chat call read raw: the request id header and the request id of every result
    object in the stream (SSE comments and the usage chunk)."""
    body = {**chat_body(model), "stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    ids = []
    for line in response.text.splitlines():
        if line.startswith(": xproxy_result "):
            ids.append(json.loads(line[len(": xproxy_result "):])["request_id"])
        elif line.startswith("data: {") and "xproxy_result" in line:
            ids.append(json.loads(line[len("data: "):])["xproxy_result"]["request_id"])
    return response.headers["x-tollgate-request-id"], ids


def test_a_chained_stream_carries_only_the_outer_result(
    stack: Stack, inner: Stack, cli: CliRunner, new_key: Callable[..., str]
) -> None:
    """Streams too: the inner gateway's result comment and usage-chunk member are dropped; the
    client reads as many results as from an unchained call, all the outer gateway's."""
    upstream = "chains-" + uuid.uuid4().hex[:6]
    _apply(cli, f"kind: Upstream\nmetadata: {{name: {upstream}}}\nspec:\n"
                f"  provider: openai\n  cluster: openai\n  models: [{upstream}-*]\n"
                f"  aliases: {{{upstream}-mini: gpt-4o-mini}}\n"
                f"  credentials:\n    - {{name: inner, secretRef: INNER_GATEWAY_KEY, "
                f"baseUrl: 'http://127.0.0.1:{inner.port}/v1'}}\n")
    key = new_key()
    _until_routed(openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0),
                  f"{upstream}-mini")
    request_id, chained = _stream_results(stack.base_url, key, f"{upstream}-mini")
    _, direct = _stream_results(stack.base_url, key, "gpt-4o-mini")
    assert len(chained) == len(direct) >= 1
    assert set(chained) == {request_id}
