"""End to end through real Envoy, extproc, Redis and the fake upstream, driven by the official
`openai` and `anthropic` SDKs exactly as an application would use them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import redis

from extproc.core.pricing import format_nanos
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import Stack
from extproc.store.keyschema import KeySchema
from tests.e2e.conftest import (
    ANTHROPIC_UPSTREAM_KEY,
    OPENAI_UPSTREAM_KEY,
    CliRunner,
    chat_body,
    clear_upstream,
    every_worker_has_loaded_the_latest_configuration,
    metric_value,
    upstream_requests,
    wait_for_status,
)

pytestmark = pytest.mark.e2e

# gpt-4o list prices from extproc/data/builtin.yaml, in nano-dollars per 1M tokens.
GPT4O_INPUT, GPT4O_CACHED, GPT4O_OUTPUT = 2_500_000_000, 1_250_000_000, 10_000_000_000
HAIKU_INPUT, HAIKU_READ, HAIKU_WRITE, HAIKU_OUTPUT = (1_000_000_000, 100_000_000, 1_250_000_000,
                                                     5_000_000_000)


def nanos(tokens: int, rate_per_million: int) -> int:
    """Exact: these list prices have at most 3 decimals, so every token is whole nano-dollars."""
    assert tokens * rate_per_million % 1_000_000 == 0
    return tokens * rate_per_million // 1_000_000


def openai_client(stack: Stack, key: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, **kwargs)


def test_missing_and_wrong_keys_get_401(stack: Stack) -> None:
    # The SDK refuses to send without a key, so the missing-key case uses plain HTTP.
    missing = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat_body(), timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as wrong:
        openai_client(stack, "tg-definitely-not-a-key").chat.completions.create(**chat_body())
    assert wrong.value.code == "invalid_api_key"
    assert wrong.value.response.headers["x-tollgate-request-id"]
    assert upstream_requests(stack) == [] or all(
        "tg-definitely-not-a-key" not in str(r["headers"]) for r in upstream_requests(stack)
    )


def test_chat_is_priced_and_the_virtual_key_never_reaches_the_upstream(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = new_key("--user", "alice")
    clear_upstream(stack)
    raw = openai_client(stack, key).chat.completions.with_raw_response.create(
        **chat_body(), extra_headers={"x-mock-cached-tokens": "4", "x-mock-reasoning-tokens": "3"}
    )
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    reasoning = (usage.completion_tokens_details.reasoning_tokens
                 if usage.completion_tokens_details else 0)
    assert cached == 4 and reasoning == 3
    expected_in = nanos(usage.prompt_tokens - cached, GPT4O_INPUT) + nanos(cached, GPT4O_CACHED)
    expected_out = nanos(usage.completion_tokens - reasoning, GPT4O_OUTPUT) + nanos(
        reasoning, GPT4O_OUTPUT)
    headers = raw.headers
    assert headers["x-tollgate-cost"] == format_nanos(expected_in + expected_out)
    assert headers["x-tollgate-cost-input"] == format_nanos(expected_in)
    assert headers["x-tollgate-input-tokens"] == str(usage.prompt_tokens)
    assert headers["x-tollgate-output-tokens"] == str(usage.completion_tokens)
    assert headers["x-tollgate-cached-input-tokens"] == "4"
    request_id = headers["x-tollgate-request-id"]

    result = (completion.model_extra or {})["xproxy_result"]
    assert result["request_id"] == request_id
    assert result["cost_nanos"]["total"] == expected_in + expected_out
    assert result["cost"]["total"]["base"] == pytest.approx((expected_in + expected_out) / 1e9)
    assert completion.choices[0].message.content  # the provider's own fields are intact

    seen = upstream_requests(stack)
    assert len(seen) == 1
    assert seen[0]["headers"]["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}"
    assert all(key not in value for value in seen[0]["headers"].values())
    assert not any(name.startswith("x-tollgate-") for name in seen[0]["headers"])


def test_anthropic_sdk_through_the_gateway(stack: Stack, new_key: Callable[..., str]) -> None:
    key = new_key()
    clear_upstream(stack)
    client = anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "Hello"}],
        extra_headers={"x-mock-cached-tokens": "10", "x-mock-cache-write-tokens": "20"},
    )
    message = raw.parse()
    u = message.usage
    expected = (nanos(u.input_tokens, HAIKU_INPUT) + nanos(10, HAIKU_READ)
                + nanos(20, HAIKU_WRITE) + nanos(u.output_tokens, HAIKU_OUTPUT))
    assert raw.headers["x-tollgate-cost"] == format_nanos(expected)
    # Input counts every prompt token: uncached + cache reads + cache writes.
    assert raw.headers["x-tollgate-input-tokens"] == str(u.input_tokens + 30)
    seen = upstream_requests(stack)[-1]
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == ANTHROPIC_UPSTREAM_KEY
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["anthropic-version"]
    assert all(key not in value for value in seen["headers"].values())


def test_anthropic_errors_are_anthropic_shaped(stack: Stack) -> None:
    client = anthropic.Anthropic(base_url=stack.base_url, api_key="tg-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        client.messages.create(model="claude-haiku-4-5", max_tokens=8,
                               messages=[{"role": "user", "content": "hi"}])
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["code"] == "invalid_api_key"


def test_bring_your_own_key_passes_the_client_credential(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = new_key()
    clear_upstream(stack)
    client = openai_client(stack, "sk-client-own-key", default_headers={"xProxy-Api-Key": key})
    raw = client.chat.completions.with_raw_response.create(**chat_body())
    assert raw.headers["x-tollgate-cost"]
    seen = upstream_requests(stack)[-1]["headers"]
    assert seen["authorization"] == "Bearer sk-client-own-key"
    assert "xproxy-api-key" not in seen


def test_spoofed_internal_headers_are_dropped(stack: Stack, new_key: Callable[..., str]) -> None:
    key = new_key()
    clear_upstream(stack)
    raw = openai_client(stack, key).chat.completions.with_raw_response.create(
        **chat_body(),
        extra_headers={
            "x-tollgate-cluster": "no-such-cluster",
            "x-tollgate-cost": "0.000000000",
            "x-tollgate-whatever": "spoof",
        },
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-tollgate-cost"] != "0.000000000"
    seen = upstream_requests(stack)[-1]["headers"]
    assert not any(name.startswith("x-tollgate-") for name in seen)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"messages": []}', "'model'"),
        (b'{"model": 42, "messages": []}', "'model'"),
        (b'{"model": "gpt-4o", "messages": [], "max_tokens": "ten"}', "'max_tokens'"),
        (b'{"model": "gpt-4o", "messages": "hi"}', "'messages'"),
        (b'{"model": "gpt-4o", "messages": [], "stream": "yes"}', "'stream'"),
        (b'\xff\xfe{"model": "gpt-4o"}', "UTF-8"),
    ],
)
def test_malformed_bodies_get_a_clear_400(
    stack: Stack, new_key: Callable[..., str], body: bytes, fragment: str
) -> None:
    key = _shared_key(new_key)
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        content=body, timeout=10,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert fragment in error["message"]


_KEYS: dict[str, str] = {}


def _shared_key(new_key: Callable[..., str]) -> str:
    if "shared" not in _KEYS:
        _KEYS["shared"] = new_key()
    return _KEYS["shared"]


def test_oversized_and_compressed_bodies_are_refused(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = _shared_key(new_key)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    big = orjson.dumps(chat_body(padding="x" * (9 * 1024 * 1024)))
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=headers, content=big,
                          timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    response = httpx.post(f"{stack.base_url}/v1/chat/completions",
                          headers={**headers, "content-encoding": "gzip"}, content=b"\x1f\x8b",
                          timeout=10)
    assert response.status_code == 415


def test_unknown_endpoint_and_wrong_method(stack: Stack, new_key: Callable[..., str]) -> None:
    key = _shared_key(new_key)
    auth = {"authorization": f"Bearer {key}"}
    assert httpx.post(f"{stack.base_url}/v1/files", headers=auth, timeout=10).status_code == 404
    assert httpx.get(f"{stack.base_url}/v1/chat/completions", headers=auth,
                     timeout=10).status_code == 405


def test_model_restrictions_and_model_list(stack: Stack, new_key: Callable[..., str]) -> None:
    key = new_key("--models", "gpt-4o-mini,claude-*")
    client = openai_client(stack, key)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(**chat_body("gpt-4o"))
    assert denied.value.code == "model_not_allowed"
    assert client.chat.completions.create(**chat_body("gpt-4o-mini")).usage is not None
    models = {m.id for m in client.models.list()}
    assert "gpt-4o-mini" in models and "claude-haiku-4-5" in models
    assert "gpt-4o" not in models


def test_unknown_model_is_priced_zero_with_a_warning(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = _shared_key(new_key)
    raw = openai_client(stack, key).chat.completions.with_raw_response.create(
        **chat_body("my-private-finetune"))
    assert raw.headers["x-tollgate-cost"] == "0.000000000"
    assert "unknown-model" in raw.headers["x-tollgate-warning"]
    assert int(raw.headers["x-tollgate-input-tokens"]) > 0


def test_upstream_errors_pass_through_with_request_id(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = _shared_key(new_key)
    with pytest.raises(openai.RateLimitError) as err:
        openai_client(stack, key).chat.completions.create(
            **chat_body(), extra_headers={"x-mock-status": "429", "x-mock-retry-after": "7"})
    assert err.value.response.headers["retry-after"] == "7"
    assert err.value.response.headers["x-tollgate-request-id"]


def test_every_priced_call_lands_in_the_usage_stream(
    stack: Stack, new_key: Callable[..., str], e2e_env: dict[str, str]
) -> None:
    key = new_key("--user", "carol", "--group", "research", "--tags", "exp-1")
    raw = openai_client(stack, key).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="price me")
    request_id = raw.headers["x-tollgate-request-id"]
    stream_key = KeySchema(e2e_env["TOLLGATE_REDIS_TAG"]).usage_stream
    client = redis.Redis.from_url(e2e_env["REDIS_URL"])
    try:
        deadline = time.monotonic() + 5
        event = None
        while event is None and time.monotonic() < deadline:
            for _id, fields in client.xrevrange(stream_key, count=50):
                candidate = usage_pb2.UsageEvent.FromString(fields[b"event"])
                if candidate.request_id == request_id:
                    event = candidate
            time.sleep(0.05)
    finally:
        client.close()
    assert event is not None
    assert (event.user, event.group, list(event.tags)) == ("carol", "research", ["exp-1"])
    assert event.model == "text-embedding-3-small" and event.endpoint == "embeddings"
    assert event.provider == "openai" and event.status == 200 and event.priced
    assert event.tokens.input == int(raw.headers["x-tollgate-input-tokens"])
    assert format_nanos(event.cost.total_nanos) == raw.headers["x-tollgate-cost"]


def test_config_changes_apply_without_restart(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
    e2e_env: dict[str, str],
) -> None:
    name, key = new_named_key()
    listing = cli("keys", "list").stdout  # the key is listed, never its secret
    assert name in listing and key not in listing
    # A new price for a model reaches every worker within about a second.
    prices = """
apiVersion: tollgate.io/v1alpha1
kind: PriceTable
metadata: {name: e2e-override}
spec:
  models:
    e2e-model: {input: 1000, output: 2000}
"""
    client = openai_client(stack, key)
    before = client.chat.completions.with_raw_response.create(**chat_body("e2e-model"))
    assert before.headers["x-tollgate-cost"] == "0.000000000"
    cli("apply", "-f", "-", stdin=prices)
    every_worker_has_loaded_the_latest_configuration(stack, e2e_env)
    # Whichever worker a request lands on, it is priced at the new price.
    for _ in range(6):
        after = client.chat.completions.with_raw_response.create(**chat_body("e2e-model"))
        tokens_in = int(after.headers["x-tollgate-input-tokens"])
        tokens_out = int(after.headers["x-tollgate-output-tokens"])
        # $1000 / $2000 per 1M tokens: 1,000,000 / 2,000,000 nano-dollars per token
        assert after.headers["x-tollgate-cost"] == format_nanos(tokens_in * 1_000_000
                                                              + tokens_out * 2_000_000)
    # Revocation takes effect on every worker without a restart too.
    cli("keys", "revoke", name)
    every_worker_has_loaded_the_latest_configuration(stack, e2e_env)
    for _ in range(6):
        response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat_body(),
                              headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert response.status_code == 401


def test_expired_key_is_refused(stack: Stack, cli: CliRunner) -> None:
    import hashlib

    key = "tg-e2e-expired-" + str(time.time_ns())
    doc = f"""
apiVersion: tollgate.io/v1alpha1
kind: VirtualKey
metadata: {{name: expired-{time.time_ns()}}}
spec:
  keySha256: {hashlib.sha256(key.encode()).hexdigest()}
  expiresAt: "2020-01-01T00:00:00Z"
"""
    # Unknown and expired keys are both 401: wait for the answer that knows the key.
    assert "expired" not in wait_for_status(stack, key, lambda _: True).json()["error"]["message"]
    cli("apply", "-f", "-", stdin=doc)
    deadline = time.monotonic() + 5
    while True:
        response = wait_for_status(stack, key, lambda s: s == 401)
        assert response.status_code == 401
        if "expired" in response.json()["error"]["message"]:
            break
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.05)


def test_metrics_and_health(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.extproc.http}"
    assert httpx.get(f"{base}/healthz", timeout=5).json()["status"] == "ok"
    ready = httpx.get(f"{base}/readyz", timeout=5).json()
    assert ready["status"] == "ready" and len(ready["workers"]) == 2
    denied = 'tollgate_requests_total{decision="denied",reason="invalid_api_key"}'

    def refusals() -> float:
        return metric_value(stack, denied)

    before = refusals()
    for _ in range(3):
        assert wait_for_status(stack, "tg-not-a-key-" + str(time.time_ns()),
                               lambda s: s == 401).status_code == 401
    # Counted by whichever worker answered, summed over the workers in /metrics.
    assert refusals() == before + 3
    assert "tollgate_phase_seconds_bucket" in httpx.get(f"{base}/metrics", timeout=5).text


def test_key_lookups_answered_from_the_snapshot_are_counted(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    def snapshot_hits() -> float:
        return metric_value(stack, 'tollgate_key_lookups_total{source="snapshot"}')

    client = openai_client(stack, new_key())
    # A new key may first be found in Redis, by each worker until it has reloaded its snapshot
    # (right after the change); from then on every request is answered from the snapshot and
    # counted there once: three requests in a row add exactly three.
    added: list[float] = []
    deadline = time.monotonic() + 15
    while added[-1:] != [3] and time.monotonic() < deadline:
        start = snapshot_hits()
        for _ in range(3):
            client.chat.completions.create(**chat_body())
        added.append(snapshot_hits() - start)
    assert added[-1:] == [3], added
