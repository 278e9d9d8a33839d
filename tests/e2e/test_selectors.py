"""Selectors a client cannot steer, and client errors that stay 4xx and quiet: real Envoy,
extproc (2 workers), Redis, the `openai` SDK.

Each test creates its own keys and limits that select only those keys.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from extproc import envoyconf
from extproc.launch import Stack, free_port, start_envoy
from tests.e2e.conftest import CliRunner, chat_body, clear_upstream, upstream_requests

pytestmark = pytest.mark.e2e

NewKey = Callable[..., tuple[str, str]]


def apply(cli: CliRunner, kind: str, name: str, spec: str) -> None:
    cli("apply", "-f", "-", stdin=f"apiVersion: tollgate.io/v1alpha1\nkind: {kind}\n"
                                  f"metadata: {{name: {name}}}\nspec:\n{spec}")


def client_for(stack: Stack, key: str, source: str | None = None) -> openai.OpenAI:
    """An SDK client; `source` binds its connections to that local (loopback) address."""
    http_client = None
    if source is not None:
        http_client = httpx.Client(transport=httpx.HTTPTransport(local_address=source))
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0,
                         http_client=http_client)


def admitted(client: openai.OpenAI, tries: int, vary: Callable[[int], dict[str, Any]]) -> int:
    """How many of `tries` calls got through (the others must be rate-limit refusals)."""
    count = 0
    for n in range(tries):
        try:
            client.chat.completions.create(**chat_body(max_tokens=5), **vary(n))
            count += 1
        except openai.RateLimitError:
            pass
    return count


def wait_for_rate_limit(client: openai.OpenAI, **extra: Any) -> None:
    """Configuration reaches the workers within about a second; wait until this key's calls
    carry the rate-limit headers (that call counts against the limit)."""
    deadline = time.monotonic() + 5
    while True:
        raw = client.chat.completions.with_raw_response.create(**chat_body(max_tokens=5),
                                                                **extra)
        if "x-ratelimit-limit-requests" in raw.headers or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def test_rotating_x_forwarded_for_does_not_pass_a_per_ip_limit(
    stack: Stack, cli: CliRunner, new_named_key: NewKey
) -> None:
    name, key = new_named_key()
    apply(cli, "RateLimit", "ip-" + uuid.uuid4().hex[:6],
          f"  per: ip\n  selector: {{keys: [{name}]}}\n  requestsPerMinute: 3\n")
    # Each client connects from its own loopback address: different buckets.
    first = client_for(stack, key, source="127.0.0.2")
    wait_for_rate_limit(first)  # 1 of 3 used from 127.0.0.2
    got = admitted(first, 10, lambda n: {"extra_headers": {
        "x-forwarded-for": f"203.0.113.{n}", "x-envoy-external-address": f"198.51.100.{n}",
        "x-real-ip": f"192.0.2.{n}"}})
    assert got == 2  # 3 per minute from this address, whatever the headers claim
    second = client_for(stack, key, source="127.0.0.3")
    assert admitted(second, 4, lambda n: {}) == 3


def test_rotating_body_user_does_not_pass_a_per_user_limit(
    stack: Stack, cli: CliRunner, new_named_key: NewKey
) -> None:
    # A key without a user (the case a rotating body `user` used to pass) and one with a user.
    for options, user in (((), ""), (("--user", "alice"), "alice")):
        name, key = new_named_key(*options)
        apply(cli, "RateLimit", "user-" + uuid.uuid4().hex[:6],
              f"  per: user\n  selector: {{keys: [{name}]}}\n  requestsPerMinute: 3\n")
        client = client_for(stack, key)
        wait_for_rate_limit(client)
        assert admitted(client, 10, lambda n: {"user": f"rotating-{n}"}) == 2
        # The usage events attribute the calls to the key's user, not to the body's claims.
        assert usage_users(cli, name, 3) == {user}
    with pytest.raises(openai.PermissionDeniedError) as denied:  # nor by header
        client.chat.completions.create(**chat_body(max_tokens=5),
                                       extra_headers={"x-tollgate-user": "someone-else"})
    assert denied.value.code == "client_user_not_allowed"
    # A key allowed to name its end users gets a window per user.
    name, key = new_named_key("--allow-client-user")
    apply(cli, "RateLimit", "user-" + uuid.uuid4().hex[:6],
          f"  per: user\n  selector: {{keys: [{name}]}}\n  requestsPerMinute: 3\n")
    client = client_for(stack, key)
    wait_for_rate_limit(client, user="u-0")
    assert admitted(client, 3, lambda n: {"user": f"u-{n + 1}"}) == 3
    assert {"u-1", "u-2", "u-3"} <= usage_users(cli, name, 3)


def usage_users(cli: CliRunner, key_name: str, at_least: int) -> set[str]:
    """Users of this key's newest usage events (settlements land in batches: wait for them)."""
    deadline = time.monotonic() + 5
    while True:
        lines = cli("usage", "--count", "200").stdout.splitlines()
        events = [e for e in map(json.loads, lines) if e.get("key") == key_name]
        if len(events) >= at_least or time.monotonic() > deadline:
            return {e.get("user", "") for e in events}
        time.sleep(0.2)


def limit_row(cli: CliRunner, name: str) -> tuple[float, float]:
    row = cli("get", "limits", name).stdout.splitlines()[1].split()
    assert row[:2] == ["default", name]  # NAMESPACE NAME TYPE MAX SPENT HELD ...
    return float(row[4]), float(row[5])  # spent, held


def test_unrelated_key_naming_a_victims_tag_does_not_spend_its_budget(
    stack: Stack, cli: CliRunner, new_named_key: NewKey
) -> None:
    tag = "victim-" + uuid.uuid4().hex[:6]
    _, victim = new_named_key("--tags", tag)
    _, attacker = new_named_key()
    _, delegate = new_named_key("--allowed-request-tags", "victim-*")
    limit = "budget-" + uuid.uuid4().hex[:6]
    apply(cli, "Limit", limit, f"  type: Block\n  max: 0.001\n  selector: {{tags: [{tag}]}}\n")
    victim_client = client_for(stack, victim)
    deadline = time.monotonic() + 5
    while "x-tollgate-limits" not in victim_client.chat.completions.with_raw_response.create(
        **chat_body(max_tokens=5)
    ).headers and time.monotonic() < deadline:
        time.sleep(0.1)
    spent_before, _ = limit_row(cli, limit)
    assert spent_before > 0
    attacker_client = client_for(stack, attacker)
    for _ in range(20):  # far more than the budget allows: none of it lands on the victim
        raw = attacker_client.chat.completions.with_raw_response.create(
            **chat_body(max_tokens=200), extra_headers={"x-tollgate-tags": tag})
        assert "x-tollgate-limits" not in raw.headers
    assert limit_row(cli, limit) == (spent_before, 0.0)
    # A key the operator allowed to use the tag is counted against it.
    raw = client_for(stack, delegate).chat.completions.with_raw_response.create(
        **chat_body(max_tokens=5), extra_headers={"x-tollgate-tags": tag})
    assert limit in raw.headers["x-tollgate-limits"]
    assert limit_row(cli, limit)[0] > spent_before


def test_huge_client_strings_are_400_and_do_not_grow_redis(
    stack: Stack, new_named_key: NewKey
) -> None:
    _, key = new_named_key()
    client = client_for(stack, key)
    store = redis.Redis.from_url(stack.redis_url)
    client.chat.completions.create(**chat_body(max_tokens=5))  # warm: stream, key cache
    time.sleep(0.5)
    before = int(store.info("memory")["used_memory"])
    huge = "u" * (2 * 1024 * 1024)
    for _ in range(20):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**chat_body(max_tokens=5), user=huge)
        assert "at most 256 characters" in bad.value.message
    for header in ("x-tollgate-tags", "x-tollgate-limit-ids"):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**chat_body(max_tokens=5),
                                           extra_headers={header: "t" * 4000})
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**chat_body(max_tokens=5),
                                       extra_headers={"x-tollgate-tags": ",".join(
                                           f"t{n}" for n in range(100))})
    assert "at most 32 entries" in bad.value.message
    time.sleep(1.5)  # anything written in a batch would have landed by now
    grown = int(store.info("memory")["used_memory"]) - before
    assert grown < 512 * 1024, f"Redis grew by {grown} bytes"  # today: 42 MB


def test_deep_nesting_is_a_400_and_the_logs_stay_small(
    stack: Stack, new_named_key: NewKey
) -> None:
    _, key = new_named_key()
    deep = (b'{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":'
            + b"[" * 600 + b"]" * 600 + b"}]}")
    logs = [stack.log_dir / "extproc.log", stack.log_dir / "envoy.log"]
    offsets = [p.stat().st_size for p in logs]
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        for _ in range(100):
            response = http.post("/v1/chat/completions", content=deep, headers={
                "authorization": f"Bearer {key}", "content-type": "application/json"})
            assert response.status_code == 400
            assert "deeper than 128 levels" in response.json()["error"]["message"]
    client = client_for(stack, key)  # and through the SDK, like an application would
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=[
            {"role": "user", "content": _nested(200)}])  # type: ignore[list-item]
    # The access log writes one short line per request by design; everything else (warnings,
    # tracebacks) must stay small whatever the body holds.
    grown = 0
    for path, offset in zip(logs, offsets, strict=True):
        with path.open("rb") as f:
            f.seek(offset)
            grown += sum(len(line) for line in f if b" tollgate.access: " not in line)
    assert grown < 4096, f"{grown} bytes of log (besides access lines) for 101 bad requests"


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_absurd_max_tokens_is_a_400(stack: Stack, new_key: Callable[..., str],
                                    field: str) -> None:
    client = client_for(stack, new_key())
    for value in (10**17, 2**63 - 1):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**chat_body(), **{field: value})
        assert f"'{field}' must be an integer from 1 to 100000000" in bad.value.message


def test_envoy_header_overflow_is_a_json_4xx_with_the_request_id(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    # httpx sends 8 headers here and Envoy adds x-forwarded-proto and x-request-id: 100 in all,
    # Envoy's maximum, so the routing header the extproc adds overflows (an exact count, so
    # plain httpx rather than the SDK, whose header set changes between versions).
    headers = {f"x-filler-{n}": "v" for n in range(90)}
    headers["authorization"] = f"Bearer {new_key()}"
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=headers,
                          json=chat_body(max_tokens=5), timeout=10)
    assert response.status_code == 431
    error = response.json()["error"]
    # The extproc predicts the overflow and refuses before reserving anything (Envoy's own
    # mapping of the same failure answers with the same code, for what the extproc cannot see).
    assert error["code"] == "request_header_fields_too_large"
    assert len(response.headers["x-tollgate-request-id"]) == 32


def test_envoy_errors_without_extproc_are_json(tmp_path: Path) -> None:
    """Envoy alone, its extproc unreachable: Envoy's own 500 comes back in the error shape,
    with Envoy's stream id as request id (the request never reached Tollgate)."""
    port, admin = free_port(), free_port()
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", free_port()), listen_port=port,
        admin_port=admin, extproc_port=free_port())
    envoy = start_envoy(tmp_path, config, admin, concurrency=1)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="tg-x",
                               max_retries=0)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(**chat_body(max_tokens=5))
    finally:
        envoy.stop()
    response = failed.value.response
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "gateway_processing_failed" and error["type"] == "api_error"
    assert "retry shortly" in error["message"]
    assert error["details"].startswith("ext_proc_error")
    assert error["request_id"]


def test_own_errors_pass_through_envoy_unchanged(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = new_key()
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": "gpt-4o"},
                          headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "Missing required field 'messages'.",
                                         "type": "invalid_request_error",
                                         "code": "invalid_request"}}


def test_trusted_proxy_hops_decide_which_forwarded_address_counts(
    stack: Stack, cli: CliRunner, new_named_key: NewKey, tmp_path: Path
) -> None:
    """A second Envoy in front of the same extproc, configured for one trusted proxy: the
    address that proxy appended (the last X-Forwarded-For entry) is the client; whatever the
    client wrote before it is not."""
    assert stack.mock_port is not None
    port, admin = free_port(), free_port()
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", stack.mock_port), listen_port=port,
        admin_port=admin, extproc_port=stack.extproc.grpc, xff_num_trusted_hops=1)
    envoy = start_envoy(tmp_path, config, admin, concurrency=1)
    try:
        name, key = new_named_key()
        apply(cli, "RateLimit", "hop-" + uuid.uuid4().hex[:6],
              f"  per: ip\n  selector: {{keys: [{name}]}}\n  requestsPerMinute: 2\n")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                               max_retries=0)
        proxy = "10.9.8.7"
        wait_for_rate_limit(client, extra_headers={"x-forwarded-for": f"1.1.1.1, {proxy}"})
        spoofed = admitted(client, 5, lambda n: {
            "extra_headers": {"x-forwarded-for": f"1.1.1.{n + 2}, {proxy}"}})
        assert spoofed == 1  # same client per the trusted proxy: 2 per minute in all
        # Different clients as the trusted proxy reports them: a bucket each.
        others = admitted(client, 4, lambda n: {
            "extra_headers": {"x-forwarded-for": f"10.9.9.{n}"}})
        assert others == 4
    finally:
        envoy.stop()


def test_envoy_buffer_overflow_is_a_json_413(stack: Stack, new_key: Callable[..., str]) -> None:
    """A chunked body (no content-length for Tollgate to check first) past Envoy's 32 MiB
    buffer: Envoy refuses it itself, in the same error shape."""
    def chunks() -> Any:
        for _ in range(40):
            yield b" " * (1024 * 1024)

    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=chunks(),
                          headers={"authorization": f"Bearer {new_key()}",
                                   "content-type": "application/json"}, timeout=30)
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("request_too_large", "request_too_large")
    assert error["request_id"] == response.headers["x-tollgate-request-id"]


def test_the_provider_is_not_told_the_client_address(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    client = client_for(stack, new_key(), source="127.0.0.4")
    clear_upstream(stack)
    client.chat.completions.create(**chat_body(max_tokens=5))
    client.chat.completions.create(**chat_body(max_tokens=5),
                                   extra_headers={"x-forwarded-for": "192.0.2.1"})
    first, second = (r["headers"] for r in upstream_requests(stack)[-2:])
    assert "x-envoy-external-address" not in first and "x-forwarded-for" not in first
    assert second["x-forwarded-for"] == "192.0.2.1"  # the client's own header, nothing added
    assert "127.0.0.4" not in str(first) + str(second)


def test_a_body_shorter_than_its_content_length_gets_a_json_408(
    stack: Stack, new_key: Callable[..., str], tmp_path: Path
) -> None:
    """A client that announces more body than it sends does not hold the stream open: Envoy's
    request timeout (short here; 60 s by default) answers with a JSON 408."""
    import socket

    assert stack.mock_port is not None
    key = new_key()
    port, admin = free_port(), free_port()
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", stack.mock_port), listen_port=port,
        admin_port=admin, extproc_port=stack.extproc.grpc, request_timeout_ms=300)
    envoy = start_envoy(tmp_path, config, admin, concurrency=1)
    clear_upstream(stack)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                         b"authorization: Bearer " + key.encode() + b"\r\n"
                         b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"mo")
            raw = b""
            while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                raw += chunk
    finally:
        envoy.stop()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"content-type: application/json" in head.lower()
    error = json.loads(payload)["error"]
    assert error["code"] == "request_timeout"
    assert not upstream_requests(stack)  # nothing reached the provider
