"""Passthrough streams (TOLLGATE_STREAM_PASSTHROUGH): a stream that needs no rewriting reaches
the client as the provider sent it, without waiting for the extproc per chunk; the observer
filter's copy is metered and settles the call. Real Envoy, extproc and Redis (a replica of the
sidecar with the setting on, on the e2e stack's Redis), the official SDKs as clients."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from google import genai
from google.genai import types

from extproc import envoyconf
from extproc.core.pricing import format_nanos
from extproc.launch import Stack, free_port, start_envoy, start_extproc
from extproc.server.observer import CLAIM_TIMEOUT_S
from tests.e2e.conftest import CliRunner, replica, spent_and_held, upstream_requests

pytestmark = pytest.mark.e2e

SLOW = {"x-mock-chunk-delay-ms": "25", "x-mock-odd-chunks": "1", "x-mock-words": "12"}
MESSAGES = [{"role": "user", "content": "Tell me something"}]
MINI_IN, MINI_OUT = 150_000_000, 600_000_000  # gpt-4o-mini, nano-dollars per 1M tokens


def nanos(tokens: int, rate: int) -> int:
    assert tokens * rate % 1_000_000 == 0
    return tokens * rate // 1_000_000


@pytest.fixture(scope="module")
def replica_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("passthrough")


@pytest.fixture(scope="module")
def gateway(stack: Stack, e2e_env: dict[str, str], replica_logs: Path) -> Iterator[str]:
    """A sidecar replica with passthrough streams on: its base URL."""
    env = {**e2e_env, "TOLLGATE_STREAM_PASSTHROUGH": "true"}
    with replica(stack, env, replica_logs, []) as (url, _):
        yield url


def access_latency_ms(logs: Path, request_id: str) -> float:
    deadline = time.monotonic() + 10
    while True:
        for line in (logs / "extproc.log").read_text().splitlines():
            if f"request_id={request_id}" in line:
                return float(line.rsplit("latency_ms=", 1)[1].split()[0])
        assert time.monotonic() < deadline, f"no access log line for {request_id}"
        time.sleep(0.2)


def usage_event(cli: CliRunner, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        for line in cli("usage", "--count", "50").stdout.splitlines():
            event: dict[str, Any] = orjson.loads(line)
            if event["request_id"] == request_id:
                return event
        assert time.monotonic() < deadline, f"no usage event for {request_id}"
        time.sleep(0.2)


def settled(cli: CliRunner, limit: str) -> tuple[Decimal, Decimal]:
    """The limit's (spent, held) once nothing is held any more."""
    deadline = time.monotonic() + 15
    spent, held = spent_and_held(cli, limit)
    while time.monotonic() < deadline and not (spent > 0 and held == 0):
        time.sleep(0.2)
        spent, held = spent_and_held(cli, limit)
    return spent, held


def assert_charged(cli: CliRunner, limit: str, event: dict[str, Any], expected: int) -> None:
    """The usage event says `expected` nano-dollars, and the limit holds exactly that, with
    nothing left held."""
    assert int(event["cost"]["total_nanos"]) == expected
    spent, held = settled(cli, limit)
    assert held == 0 and spent == Decimal(format_nanos(expected))


def limited_key(cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]) -> tuple[str, str]:
    name, key = new_named_key()
    limit = "pass-" + uuid.uuid4().hex[:6]
    cli("apply", "-f", "-", stdin=f"""apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: {limit}}}
spec: {{type: Block, max: 10, selector: {{keys: [{name}]}}}}
""")
    return limit, key


def wait_for_key(url: str, key: str) -> None:
    """The replica polls the configuration: a key made a moment ago may be unknown briefly."""
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"},
                    timeout=5).status_code == 401:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_stream_with_usage_passes_through_and_is_priced(
    gateway: str, stack: Stack, cli: CliRunner, replica_logs: Path,
    new_named_key: Callable[..., tuple[str, str]],
) -> None:
    limit, key = limited_key(cli, new_named_key)
    wait_for_key(gateway, key)
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, extra_headers=SLOW)
    assert raw.headers["x-tollgate-stream"] == "passthrough"
    request_id = raw.headers["x-tollgate-request-id"]
    arrivals, pieces, chunks = [], [], []
    for chunk in raw.parse():
        arrivals.append(time.monotonic() - started)
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces).split() == (["Hello", "from", "the", "mock", "upstream."] * 3)[:12]
    assert arrivals[0] < arrivals[-1] - 0.15  # chunk by chunk, not buffered
    # The provider's usage chunk as it sent it: no result object is added in passthrough.
    last = chunks[-1]
    assert last.usage is not None and not last.choices
    assert "xproxy_result" not in (last.model_extra or {})
    expected = nanos(last.usage.prompt_tokens, MINI_IN) + nanos(last.usage.completion_tokens,
                                                                MINI_OUT)
    event = usage_event(cli, request_id)
    assert event["streamed"] is True and event["priced"] is True
    assert int(event["tokens"]["output"]) == last.usage.completion_tokens == 12
    assert_charged(cli, limit, event, expected)
    # The call ends with its stream (12 words, 25 ms apart), not with Envoy's deferred close
    # of the observer's gRPC stream 5 s later.
    assert access_latency_ms(replica_logs, request_id) < 3000


def test_the_body_is_exactly_what_the_provider_sent(
    gateway: str, stack: Stack, new_key: Callable[..., str],
) -> None:
    key = new_key()
    wait_for_key(gateway, key)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {key}", **SLOW}

    def fetch(url: str) -> bytes:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30,
                          headers=headers) as r:
            assert r.status_code == 200
            return b"".join(r.iter_raw())

    through = fetch(gateway)
    direct = fetch(f"http://127.0.0.1:{stack.mock_port}")
    # Same events in the same order (the fake's ids and timestamps differ per response).
    def shape(data: bytes) -> list[Any]:
        events = []
        for line in data.split(b"\n"):
            if line.startswith(b"data: {"):
                doc = orjson.loads(line[6:])
                doc.pop("id", None)
                doc.pop("created", None)
                events.append(doc)
            elif line:
                events.append(line)
        return events
    assert shape(through) == shape(direct)
    assert b"xproxy_result" not in through


def test_a_stream_that_needs_rewriting_is_still_held(
    gateway: str, stack: Stack, new_key: Callable[..., str],
) -> None:
    """Without include_usage Tollgate asks the provider for usage and hides that chunk again:
    a rewrite, so the stream goes through the extproc, with its result object."""
    key = new_key()
    wait_for_key(gateway, key)
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}", **SLOW},
                      json={"model": "gpt-4o-mini", "messages": MESSAGES,
                            "stream": True}) as r:
        assert r.status_code == 200
        assert "x-tollgate-stream" not in r.headers
        body = b"".join(r.iter_raw())
    assert b": xproxy_result " in body
    assert b'"usage"' not in body.split(b": xproxy_result ")[0]
    assert upstream_requests(stack)[-1]["body"]["stream_options"] == {"include_usage": True}


def test_an_anthropic_stream_passes_through_and_is_priced(
    gateway: str, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
) -> None:
    limit, key = limited_key(cli, new_named_key)
    wait_for_key(gateway, key)
    client = anthropic.Anthropic(base_url=gateway, api_key=key, max_retries=0)
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=100,
                                messages=MESSAGES, extra_headers=SLOW) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-tollgate-request-id"]
        assert stream.response.headers["x-tollgate-stream"] == "passthrough"
    assert text.split() == (["Hello", "from", "the", "mock", "upstream."] * 3)[:12]
    event = usage_event(cli, request_id)
    assert event["streamed"] is True and event["priced"] is True
    assert int(event["tokens"]["output"]) == final.usage.output_tokens == 12
    assert int(event["tokens"]["input"]) == final.usage.input_tokens > 0
    # claude-haiku-4-5: $1 input, $5 output per 1M tokens.
    expected = nanos(final.usage.input_tokens, 1_000_000_000) + nanos(12, 5_000_000_000)
    assert_charged(cli, limit, event, expected)


def test_a_responses_stream_passes_through_and_is_priced(
    gateway: str, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
) -> None:
    limit, key = limited_key(cli, new_named_key)
    wait_for_key(gateway, key)
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)
    raw = client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="Tell me something", stream=True, extra_headers=SLOW)
    assert raw.headers["x-tollgate-stream"] == "passthrough"
    events = list(raw.parse())
    usage = next(e for e in events if e.type == "response.completed").response.usage
    assert usage is not None and usage.output_tokens == 12
    event = usage_event(cli, raw.headers["x-tollgate-request-id"])
    assert_charged(cli, limit, event, nanos(usage.input_tokens, MINI_IN) + nanos(12, MINI_OUT))


def test_a_gemini_stream_passes_through_and_is_priced(
    gateway: str, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
) -> None:
    limit, key = limited_key(cli, new_named_key)
    wait_for_key(gateway, key)
    client = genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=gateway, api_version="v1beta", headers={"x-mock-words": "12"}))
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash",
                                                         contents="Count to 12"))
    meta = chunks[-1].usage_metadata
    assert meta is not None and meta.candidates_token_count == 12
    # gemini-2.5-flash: $0.30 / $2.50 per 1M tokens, i.e. 300 / 2,500 nano-dollars a token.
    expected = (meta.prompt_token_count or 0) * 300 + 12 * 2500
    spent, held = settled(cli, limit)
    assert held == 0 and spent == Decimal(format_nanos(expected))
    raw = httpx.post(f"{gateway}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                     headers={"x-goog-api-key": key, "x-mock-words": "12"},
                     json={"contents": [{"role": "user", "parts": [{"text": "Count to 12"}]}]},
                     timeout=30)
    assert raw.headers["x-tollgate-stream"] == "passthrough"
    assert b"xproxy_result" not in raw.content


def test_a_client_that_hangs_up_is_settled_on_what_was_seen(
    gateway: str, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
) -> None:
    limit, key = limited_key(cli, new_named_key)
    wait_for_key(gateway, key)
    slow = {"x-mock-chunk-delay-ms": "100", "x-mock-words": "200"}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}", **slow},
                      json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
                            "stream_options": {"include_usage": True},
                            "max_tokens": 1000}) as response:
        assert response.headers["x-tollgate-stream"] == "passthrough"
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"data: ") >= 5:
                break  # hang up after a few words of a 200-word answer
    spent, held = settled(cli, limit)
    assert held == 0  # never left reserved
    # Priced on what was produced: more than zero, far less than the 200-word answer.
    assert 0 < spent < Decimal(format_nanos(nanos(40, MINI_IN) + nanos(200, MINI_OUT)))


def test_passthrough_on_the_grpcio_transport(
    stack: Stack, e2e_env: dict[str, str], tmp_path: Path, cli: CliRunner,
    new_named_key: Callable[..., tuple[str, str]],
) -> None:
    """The observer's stream is told apart by its gRPC metadata on grpc.aio too."""
    limit, key = limited_key(cli, new_named_key)
    env = {**e2e_env, "TOLLGATE_STREAM_PASSTHROUGH": "true", "TOLLGATE_GRPC_TRANSPORT": "grpcio"}
    with replica(stack, env, tmp_path, []) as (url, _):
        wait_for_key(url, key)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}, extra_headers=SLOW)
        assert raw.headers["x-tollgate-stream"] == "passthrough"
        last = list(raw.parse())[-1]
        assert last.usage is not None
        expected = nanos(last.usage.prompt_tokens, MINI_IN) + nanos(
            last.usage.completion_tokens, MINI_OUT)
        assert_charged(cli, limit, usage_event(cli, raw.headers["x-tollgate-request-id"]),
                       expected)


def without_observer(config: dict[str, Any]) -> None:
    """An Envoy bootstrap of one's own, without the passthrough streams' observer filter."""
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = manager["typed_config"]["http_filters"]
    filters[:] = [f for f in filters if f["name"] != "envoy.filters.http.match_delegate"]


def test_without_the_observer_filter_the_estimate_is_charged(
    stack: Stack, e2e_env: dict[str, str], tmp_path: Path, cli: CliRunner,
    new_named_key: Callable[..., tuple[str, str]],
) -> None:
    """An Envoy configuration of one's own that lacks the observer filter: the stream still
    reaches the client, and the call is charged its estimate once no observer claimed it,
    never left held."""
    limit, key = limited_key(cli, new_named_key)
    env = {**e2e_env, "TOLLGATE_STREAM_PASSTHROUGH": "true"}
    with replica(stack, env, tmp_path, [], edit=without_observer) as (url, _):
        wait_for_key(url, key)
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}", **SLOW},
                          json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
                                "stream_options": {"include_usage": True},
                                "max_tokens": 50}) as r:
            assert r.headers["x-tollgate-stream"] == "passthrough"
            assert b"data: [DONE]" in b"".join(r.iter_raw())
        spent, held = spent_and_held(cli, limit)
        assert held > 0  # not yet settled: the observer might still come
        spent, held = settled(cli, limit)
    assert held == 0
    # The estimate: the prompt bound plus the 50 output tokens asked for, not the 12 produced.
    assert spent >= Decimal(format_nanos(nanos(50, MINI_OUT)))


def test_a_stopping_extproc_settles_the_streams_no_observer_claimed(
    stack: Stack, e2e_env: dict[str, str], tmp_path: Path, cli: CliRunner,
    new_named_key: Callable[..., tuple[str, str]],
) -> None:
    """Stopped (SIGTERM) while a passthrough call still waits for its observer: the call is
    charged its estimate on the way out, not left held for the sweeper."""
    limit, key = limited_key(cli, new_named_key)
    env = {**e2e_env, "TOLLGATE_STREAM_PASSTHROUGH": "true"}
    extproc, ports = start_extproc(tmp_path, stack.redis_url, 1, env)
    try:
        admin, port = free_port(), free_port()
        config = envoyconf.render_bootstrap(
            clusters=envoyconf.mock_clusters("127.0.0.1", stack.mock_port or 0),
            listen_port=port, admin_port=admin, extproc_port=ports.grpc)
        without_observer(config)
        envoy = start_envoy(tmp_path, config, admin, concurrency=1)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_key(url, key)
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                              headers={"authorization": f"Bearer {key}", **SLOW},
                              json={"model": "gpt-4o-mini", "messages": MESSAGES,
                                    "stream": True, "stream_options": {"include_usage": True},
                                    "max_tokens": 50}) as r:
                assert r.headers["x-tollgate-stream"] == "passthrough"
                b"".join(r.iter_raw())
            ended = time.monotonic()
            assert spent_and_held(cli, limit)[1] > 0  # waiting for an observer
            extproc.stop()
            spent, held = spent_and_held(cli, limit)
            # Settled by the stop, before the observer's wait (10 s) ran out.
            assert time.monotonic() - ended < CLAIM_TIMEOUT_S
            assert held == 0 and spent >= Decimal(format_nanos(nanos(50, MINI_OUT)))
        finally:
            envoy.stop()
    finally:
        extproc.stop()
