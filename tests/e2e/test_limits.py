"""Spend limits and rate limits end to end: real Envoy, extproc (2 workers), Redis, the `openai`
SDK. Each test creates its own key and limits that select only that key."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest

from extproc.launch import Stack
from tests.e2e.conftest import CliRunner, chat_body, clear_upstream, upstream_requests

pytestmark = pytest.mark.e2e


def apply(cli: CliRunner, kind: str, name: str, spec: str) -> None:
    cli("apply", "-f", "-", stdin=f"apiVersion: tollgate.io/v1alpha1\nkind: {kind}\n"
                                  f"metadata: {{name: {name}}}\nspec:\n{spec}")


def limit_on_key(cli: CliRunner, key_name: str, prefix: str, spec: str) -> str:
    """Apply a Limit named `<prefix>-<random>` with `spec` (indented YAML lines) that selects
    the key `key_name`; returns the limit's name."""
    limit = f"{prefix}-{uuid.uuid4().hex[:6]}"
    apply(cli, "Limit", limit, f"{spec}  selector: {{keys: [{key_name}]}}\n")
    return limit


def client_for(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def call(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(**chat_body(max_tokens=10), **extra)


def until_applied(client: openai.OpenAI, header: str, timeout: float = 4.0) -> Any:
    """Configuration reaches the workers within about a second; wait for it on a real call."""
    deadline = time.monotonic() + timeout
    while True:
        raw = call(client)
        if header in raw.headers or time.monotonic() > deadline:
            return raw
        time.sleep(0.1)


def limit_states(raw: Any) -> dict[str, dict[str, str]]:
    out = {}
    for entry in raw.headers["x-tollgate-limits"].split(", "):
        name, *fields = entry.split(";")
        out[name] = dict(f.split("=", 1) for f in fields)
    return out


def test_block_limit_refuses_with_the_compatible_body_and_never_overspends(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    name, key = new_named_key()
    # $0.0012: room for a few small gpt-4o calls (each costs ~80 micro-dollars and reserves its
    # strict bound, ~470: body bytes as prompt tokens, see docs/budgets.md).
    limit = limit_on_key(cli, name, "block",
                         "  type: Block\n  max: 0.0012\n  threshold: 0.5\n  period: month\n")
    client = client_for(stack, key)
    first = until_applied(client, "x-tollgate-limits")
    states = [limit_states(first)[limit]]
    refused = None
    for _ in range(20):  # bounded: the limit is reached after a handful of calls
        before = len(upstream_requests(stack))
        try:
            states.append(limit_states(call(client))[limit])
        except openai.RateLimitError as exc:
            refused = exc
            assert len(upstream_requests(stack)) == before  # the upstream was never called
            break
    assert refused is not None, "the Block limit never refused"
    body = refused.body
    assert isinstance(refused.response.json(), dict)
    error = refused.response.json()["error"]
    assert error == {"message": f"Limit exceeded: {limit}", "type": "LimitExceeded",
                     "code": 429, "limit_id": limit}
    result = refused.response.json()["xproxy_result"]
    assert result["blocked_limit_ids"] == [limit]
    assert result["limits"][limit]["state"] == "blocked"
    assert body is not None
    # Every success reported its state and remaining budget; remaining only goes down.
    remaining = [float(s["remaining"]) for s in states]
    assert remaining == sorted(remaining, reverse=True)
    assert {s["state"] for s in states} <= {"ok", "exceeded"}
    assert states[-1]["state"] == "exceeded"  # past 0.5 * max, still admitted
    # Spend never passed max, as `tollgate get limits` shows.
    table = cli("get", "limits", limit).stdout.splitlines()
    row = table[1].split()[1:]  # after the NAMESPACE column
    assert table[1].split()[0] == "default"
    assert row[0] == limit and row[1] == "Block"
    spent, held = float(row[3]), float(row[4])
    assert spent <= 0.0012 and held == 0
    assert row[7].startswith("month:")


def test_allow_limit_never_refuses_and_reports_exceeded_then_overrun(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    name, key = new_named_key()
    limit = limit_on_key(cli, name, "allow", "  type: Allow\n  max: 0.0001\n  threshold: 0.5\n")
    client = client_for(stack, key)
    raw = until_applied(client, "x-tollgate-limits")
    seen = [limit_states(raw)[limit]["state"]]
    for _ in range(3):
        raw = call(client)
        seen.append(limit_states(raw)[limit]["state"])
    assert seen[-1] == "overrun"  # never refused, spend went past max
    assert "exceeded" in seen or seen[0] == "overrun"
    result = raw.parse().model_extra["xproxy_result"]
    assert result["limits"][limit]["state"] == "overrun"
    assert result["limits"][limit]["remaining"] == 0


def test_requests_per_minute(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    name, key = new_named_key()
    rl = "rpm-" + uuid.uuid4().hex[:6]
    apply(cli, "RateLimit", rl, f"  per: key\n  selector: {{keys: [{name}]}}\n"
                                f"  requestsPerMinute: 3\n")
    client = client_for(stack, key)
    first = until_applied(client, "x-ratelimit-limit-requests")
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    remaining = [int(first.headers["x-ratelimit-remaining-requests"])]
    refused = None
    for _ in range(5):
        try:
            remaining.append(int(call(client).headers["x-ratelimit-remaining-requests"]))
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None
    assert remaining[-1] == 0 and remaining == sorted(remaining, reverse=True)
    headers = refused.response.headers
    assert refused.response.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["retry-after"]) <= 65
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_tokens_per_minute(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    name, key = new_named_key()
    rl = "tpm-" + uuid.uuid4().hex[:6]
    apply(cli, "RateLimit", rl, f"  per: user\n  selector: {{keys: [{name}]}}\n"
                                f"  tokensPerMinute: 60\n")
    client = client_for(stack, key)
    until_applied(client, "x-ratelimit-limit-tokens")
    refused = None
    for _ in range(10):
        try:
            raw = call(client)
            assert raw.headers["x-ratelimit-limit-tokens"] == "60"
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None
    assert "tokens per minute" in refused.message
    assert refused.response.headers["x-ratelimit-limit-tokens"] == "60"
    # A request that alone exceeds the limit says so and gets no Retry-After.
    with pytest.raises(openai.RateLimitError) as huge:
        client.chat.completions.create(**chat_body(max_tokens=1000))
    assert "larger than the limit" in huge.value.message
    assert "retry-after" not in huge.value.response.headers


def test_limit_ids_header_needs_permission(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    _, plain = new_named_key()
    named = "named-" + uuid.uuid4().hex[:6]
    apply(cli, "Limit", named, "  type: Allow\n  max: 5\n  selector: {keys: [nobody]}\n")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        call(client_for(stack, plain), extra_headers={"x-tollgate-limit-ids": named})
    assert denied.value.code == "limit_ids_not_allowed"
    # A key allowed to name limits gets them applied, and unknown ids reported.
    name, allowed = new_named_key()
    digest = __import__("hashlib").sha256(allowed.encode()).hexdigest()
    apply(cli, "VirtualKey", name, f"  keySha256: {digest}\n  allowRequestLimits: true\n")
    client = client_for(stack, allowed)
    deadline = time.monotonic() + 4
    while True:
        try:
            raw = call(client, extra_headers={"xProxy-Limit-IDs": f"{named},no-such-limit"})
            break
        except openai.PermissionDeniedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert named in limit_states(raw)
    result = raw.parse().model_extra["xproxy_result"]
    assert result["unknown_limit_ids"] == ["no-such-limit"]
    clear_upstream(stack)


def test_budget_refusal_is_not_retried_by_the_openai_sdk(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    """A Block limit refusal cannot succeed until the period resets: the SDK, with its default
    retries on, sends the request exactly once and learns when the period ends."""
    import httpx

    name, key = new_named_key()
    limit_on_key(cli, name, "noretry", "  type: Block\n  max: 0.000001\n  period: day\n")
    sent: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, http_client=http)
    assert client.max_retries == 2  # the SDK's default: it would retry a plain 429 twice
    deadline = time.monotonic() + 5
    while True:  # the limit reaches the workers within about a second
        sent.clear()
        try:
            call(client)
        except openai.RateLimitError as exc:
            refused = exc
            break
        assert time.monotonic() < deadline, "the Block limit never refused"
        time.sleep(0.1)
    assert sent == ["/v1/chat/completions"]  # exactly one request, no retry
    assert refused.response.headers["x-should-retry"] == "false"
    # Seconds until the day (UTC) ends: positive and at most a day.
    assert 0 < int(refused.response.headers["retry-after"]) <= 86_400
    http.close()


def test_a_window_of_an_hour(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    """`window: 1h`: the third request within the hour is refused with the hour's reset (not a
    minute's), and `tollgate get ratelimits` shows the window."""
    name, key = new_named_key()
    rl = "hourly-" + uuid.uuid4().hex[:6]
    apply(cli, "RateLimit", rl, f"  per: key\n  selector: {{keys: [{name}]}}\n"
                                f"  window: 1h\n  requests: 2\n")
    client = client_for(stack, key)
    first = until_applied(client, "x-ratelimit-limit-requests")
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    call(client)
    with pytest.raises(openai.RateLimitError) as refused:
        call(client)
    assert "requests per 1h" in refused.value.message
    headers = refused.value.response.headers
    # the first request's 5-minute bucket leaves the window 60 to 65 minutes after it
    assert 3600 <= int(headers["retry-after"]) <= 3900
    assert headers["x-ratelimit-reset-requests"].startswith("1h")
    listing = cli("get", "ratelimits").stdout
    (row,) = [line.split() for line in listing.splitlines() if rl in line]
    assert row[row.index(rl) + 1:row.index(rl) + 5] == ["key", "1h", "2", "-"]
