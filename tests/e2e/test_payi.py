"""The official `payi` SDK against Tollgate, as a Pay-i proxy user would run it: the SDK's own
URL helpers and header builder, the provider SDKs pointed at `/api/v1/proxy/<provider>`, and
every result object validated with the SDK's own `XproxyResult` model. Real Envoy, extproc,
Redis; only the provider is the fake upstream.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis
from payi.lib.helpers import (
    create_headers,
    payi_anthropic_url,
    payi_aws_bedrock_url,
    payi_azure_openai_url,
    payi_openai_url,
)
from payi.types.shared import XproxyResult

from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import Stack
from extproc.store.keyschema import KeySchema
from tests.e2e.conftest import (
    CliRunner,
    chat_body,
    clear_upstream,
    metric_value,
    upstream_requests,
)

pytestmark = pytest.mark.e2e

CLIENT_PROVIDER_KEY = "sk-client-own-provider-key"

SETUP = """\
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {name: payi-azure}
spec:
  provider: azure-openai
  cluster: azure-openai
  models: ["payi-azure-dep"]
  priority: 30
  credentials:
    - {name: main, secretRef: AZURE_OPENAI_API_KEY}
---
apiVersion: tollgate.io/v1alpha1
kind: PriceTable
metadata: {name: payi-prices}
spec:
  models:
    payi-azure-dep: {input: 2.5, output: 10.0}
"""


def apply(cli: CliRunner, text: str) -> None:
    cli("apply", "-f", "-", stdin=text)


class Setup:
    def __init__(self, key: str, name: str, limit: str) -> None:
        self.key, self.name, self.limit = key, name, limit


@pytest.fixture(scope="module")
def payi_key(cli: CliRunner, new_named_key: Callable[..., tuple[str, str]],
             stack: Stack) -> Setup:
    """A key that may name limits and users (as a Pay-i application does), and an Allow
    limit for it to name."""
    apply(cli, SETUP)
    name, key = new_named_key("--allow-client-user")
    digest = hashlib.sha256(key.encode()).hexdigest()
    apply(cli, "apiVersion: tollgate.io/v1alpha1\nkind: VirtualKey\n"
               f"metadata: {{name: {name}}}\nspec:\n  keySha256: {digest}\n"
               "  allowRequestLimits: true\n  allowClientUser: true\n")
    limit = "payi-" + uuid.uuid4().hex[:8]
    apply(cli, "apiVersion: tollgate.io/v1alpha1\nkind: Limit\n"
               f"metadata: {{name: {limit}}}\nspec:\n  type: Allow\n  max: 5\n"
               "  selector: {keys: [nobody]}\n")
    # Until the new key, Upstream and Limit reached both workers.
    deadline = time.monotonic() + 6
    while True:
        response = httpx.post(
            payi_azure_openai_url(stack.base_url)
            + "/openai/deployments/payi-azure-dep/chat/completions?api-version=2024-10-21",
            headers={"api-key": key, "xProxy-Limit-IDs": limit},
            json=chat_body("payi-azure-dep"), timeout=10)
        result = response.json().get("xproxy_result", {}) if response.status_code == 200 else {}
        if limit in result.get("limits", {}) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200, response.text
    return Setup(key, name, limit)


def annotations(setup: Setup) -> dict[str, str]:
    """What `track_context` would send, built by the SDK's own helper."""
    return create_headers(
        limit_ids=[setup.limit], user_id="end-user-7", account_name="acme",
        use_case_name="summarise", use_case_id="uc-41", use_case_version=3,
        use_case_step="draft", use_case_properties={"tier": "gold"},
        request_properties={"ticket": "T-9"}, resource_scope="global",
        price_as_resource="gpt-4o", log_prompt_and_response=False,
    )


def check_result(raw: dict[str, Any], setup: Setup, cost_header: str | None) -> XproxyResult:
    result = XproxyResult.model_validate(raw)
    assert result.request_id
    assert result.cost is not None and result.cost.total is not None
    assert result.cost.currency == "usd"
    assert result.cost.total.base > 0
    assert result.cost.total.overrun_base == 0
    assert result.cost.input is not None and result.cost.output is not None
    if cost_header is not None:
        assert result.cost.total.base == pytest.approx(float(cost_header), abs=1e-12)
    assert result.limits is not None and result.limits[setup.limit].state == "ok"
    assert raw["limits"][setup.limit]["limit_type"] == "allow"
    assert raw["limits"][setup.limit]["max"] == 5.0
    assert raw["limits"][setup.limit]["current"] > 0
    assert result.use_case_name == "summarise" and result.use_case_id == "uc-41"
    assert result.use_case_step == "draft" and result.account_name == "acme"
    assert result.user_id == "end-user-7"
    assert result.duplicate_request is False and result.blocked_limit_ids == []
    return result


def assert_nothing_payi_reached(sent: dict[str, Any], setup: Setup) -> None:
    names = set(sent["headers"])
    assert not any(n.startswith(("xproxy-", "x-tollgate-")) for n in names), names
    assert setup.key not in str(sent["headers"])


def event_for(e2e_env: dict[str, str], redis_url: str, request_id: str) -> usage_pb2.UsageEvent:
    stream = KeySchema(e2e_env["TOLLGATE_REDIS_TAG"]).usage_stream
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            for _id, fields in client.xrevrange(stream, count=200):
                event = usage_pb2.UsageEvent.FromString(fields[b"event"])
                if event.request_id == request_id:
                    return event
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError(f"no usage event for {request_id}")


def check_event(event: usage_pb2.UsageEvent) -> None:
    assert event.use_case_name == "summarise" and event.use_case_id == "uc-41"
    assert event.use_case_version == 3 and event.use_case_step == "draft"
    assert dict(event.use_case_properties) == {"tier": "gold"}
    assert dict(event.request_properties) == {"ticket": "T-9"}
    assert event.account_name == "acme" and event.resource_scope == "global"
    assert event.price_as_resource == "gpt-4o" and event.logging_disabled
    assert event.user == "end-user-7"


def openai_client(stack: Stack, setup: Setup) -> openai.OpenAI:
    # Pay-i's documented proxy set-up: the provider's own key, the Pay-i key in a header.
    return openai.OpenAI(api_key=CLIENT_PROVIDER_KEY, base_url=payi_openai_url(stack.base_url),
                         default_headers={"xProxy-api-key": setup.key}, max_retries=0)


def test_openai_proxy_path_buffered(stack: Stack, payi_key: Setup, e2e_env: dict[str, str],
                                    redis_url: str) -> None:
    clear_upstream(stack)
    raw = openai_client(stack, payi_key).chat.completions.with_raw_response.create(
        **chat_body(), extra_headers=annotations(payi_key))
    completion = raw.parse()
    assert completion.model_extra is not None
    result = check_result(completion.model_extra["xproxy_result"], payi_key,
                          raw.headers["x-tollgate-cost"])
    sent = upstream_requests(stack)[-1]
    assert sent["path"] == "/v1/chat/completions"
    # Bring your own key: the client's provider key goes through, the Tollgate key does not.
    assert sent["headers"]["authorization"] == f"Bearer {CLIENT_PROVIDER_KEY}"
    assert_nothing_payi_reached(sent, payi_key)
    assert result.request_id is not None
    check_event(event_for(e2e_env, redis_url, result.request_id))


def test_openai_proxy_path_streamed(stack: Stack, payi_key: Setup) -> None:
    clear_upstream(stack)
    stream = openai_client(stack, payi_key).chat.completions.create(
        **chat_body(), stream=True, stream_options={"include_usage": True},
        extra_headers=annotations(payi_key))
    results = [c.model_extra["xproxy_result"] for c in stream
               if c.model_extra and "xproxy_result" in c.model_extra]
    assert len(results) == 1
    check_result(results[0], payi_key, None)
    assert_nothing_payi_reached(upstream_requests(stack)[-1], payi_key)


def test_anthropic_proxy_path_buffered_and_streamed(stack: Stack, payi_key: Setup,
                                                    e2e_env: dict[str, str],
                                                    redis_url: str) -> None:
    client = anthropic.Anthropic(api_key=payi_key.key, base_url=payi_anthropic_url(stack.base_url),
                                 max_retries=0)
    clear_upstream(stack)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 20,
            "messages": [{"role": "user", "content": "Hello"}]}
    raw = client.messages.with_raw_response.create(**body, extra_headers=annotations(payi_key))
    message = raw.parse()
    assert message.model_extra is not None
    result = check_result(message.model_extra["xproxy_result"], payi_key,
                          raw.headers["x-tollgate-cost"])
    sent = upstream_requests(stack)[-1]
    assert sent["path"] == "/v1/messages"
    assert_nothing_payi_reached(sent, payi_key)
    assert result.request_id is not None
    check_event(event_for(e2e_env, redis_url, result.request_id))

    # Streamed: the result object is an SSE comment line, which the SDK skips; read the raw
    # stream as a Pay-i consumer of the comment would.
    with httpx.stream("POST", payi_anthropic_url(stack.base_url) + "/v1/messages",
                      headers={"x-api-key": payi_key.key, "anthropic-version": "2023-06-01",
                               **annotations(payi_key)},
                      json={**body, "stream": True}, timeout=10) as response:
        text = "".join(response.iter_text())
    line = next(x for x in text.splitlines() if x.startswith(": xproxy_result "))
    import json
    check_result(json.loads(line[len(": xproxy_result "):]), payi_key, None)


def test_azure_openai_proxy_path(stack: Stack, payi_key: Setup) -> None:
    clear_upstream(stack)
    client = openai.AzureOpenAI(azure_endpoint=payi_azure_openai_url(stack.base_url),
                                api_key=payi_key.key, api_version="2024-10-21", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        **chat_body("payi-azure-dep"), extra_headers=annotations(payi_key))
    completion = raw.parse()
    assert completion.model_extra is not None
    check_result(completion.model_extra["xproxy_result"], payi_key,
                 raw.headers["x-tollgate-cost"])
    sent = upstream_requests(stack)[-1]
    assert sent["path"] == "/openai/deployments/payi-azure-dep/chat/completions"
    assert sent["query"]["api-version"] == "2024-10-21"
    assert_nothing_payi_reached(sent, payi_key)


def test_bedrock_and_unknown_providers_are_a_clear_501(stack: Stack, payi_key: Setup) -> None:
    for url in (payi_aws_bedrock_url(stack.base_url) + "/model/x/invoke",
                f"{stack.base_url}/api/v1/proxy/google.vertex/v1/x"):
        response = httpx.post(url, headers={"xProxy-api-key": payi_key.key}, json={}, timeout=10)
        assert response.status_code == 501
        error = response.json()["error"]
        assert error["code"] == "provider_not_supported"
        assert "openai, anthropic, azure.openai" in error["message"]


def test_provider_base_uri_is_refused_and_bounds_hold(stack: Stack, payi_key: Setup) -> None:
    clear_upstream(stack)
    client = openai_client(stack, payi_key)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            **chat_body(), extra_headers={"xProxy-Provider-BaseUri": "https://evil.example"})
    assert refused.value.code == "provider_base_uri_not_supported"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            **chat_body(), extra_headers={"xProxy-UseCase-Name": "u" * 300})
    assert "at most 256" in too_long.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            **chat_body(), extra_headers={"xProxy-Request-Properties": "not json"})
    assert upstream_requests(stack) == []  # nothing went out, nothing was charged


def test_tollgate_twins_of_the_payi_headers(stack: Stack, payi_key: Setup,
                                            e2e_env: dict[str, str], redis_url: str) -> None:
    client = openai.OpenAI(api_key=payi_key.key, base_url=f"{stack.base_url}/v1",
                           max_retries=0)
    raw = client.chat.completions.with_raw_response.create(**chat_body(), extra_headers={
        "x-tollgate-limit-ids": payi_key.limit, "x-tollgate-user": "end-user-7",
        "x-tollgate-account-name": "acme", "x-tollgate-use-case-name": "summarise",
        "x-tollgate-use-case-id": "uc-41", "x-tollgate-use-case-version": "3",
        "x-tollgate-use-case-step": "draft",
        "x-tollgate-use-case-properties": '{"tier":"gold"}',
        "x-tollgate-request-properties": '{"ticket":"T-9"}',
        "x-tollgate-resource-scope": "global", "x-tollgate-price-as-resource": "gpt-4o",
        "x-tollgate-logging-disable": "true",
    })
    completion = raw.parse()
    assert completion.model_extra is not None
    result = check_result(completion.model_extra["xproxy_result"], payi_key,
                          raw.headers["x-tollgate-cost"])
    assert result.request_id is not None
    check_event(event_for(e2e_env, redis_url, result.request_id))


# ---- telemetry-only mode: the ingest API ------------------------------------------------------

def payi_client(stack: Stack, setup: Setup) -> Any:
    from payi import Payi
    return Payi(api_key=setup.key, base_url=stack.base_url, max_retries=0)


def limit_spent(cli: CliRunner, limit: str) -> float:
    """SPENT of `tollgate get limits NAME` (the table: NAMESPACE NAME TYPE MAX SPENT ...)."""
    return float(cli("get", "limits", limit).stdout.splitlines()[1].split()[4])


def test_ingest_prices_counts_and_never_twice(stack: Stack, payi_key: Setup, cli: CliRunner,
                                              e2e_env: dict[str, str], redis_url: str) -> None:
    from payi.types import IngestResponse
    client = payi_client(stack, payi_key)
    before = limit_spent(cli, payi_key.limit)
    stamp = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    units = {"text": {"input": 1000, "output": 200}, "text_cache_read": {"input": 400},
             "audio": {"input": 5}}
    raw = client.ingest.with_raw_response.units(
        category="system.openai", resource="gpt-4o", units=units, event_timestamp=stamp,
        limit_ids=[payi_key.limit], use_case_name="summarise", use_case_id="uc-41",
        use_case_step="draft", user_id="end-user-7", account_name="acme",
        use_case_properties={"tier": "gold"}, properties={"ticket": "T-9"},
        use_case_version=3, resource_scope="global", end_to_end_latency_ms=812)
    first = raw.parse()
    assert isinstance(first, IngestResponse)
    result = first.xproxy_result
    assert result.duplicate_request is False
    # gpt-4o: 2.50 input, 1.25 cached input, 10.00 output per 1M tokens.
    expected = (1000 * 2.5 + 400 * 1.25 + 200 * 10.0) / 1e6
    assert result.cost is not None and result.cost.total is not None
    assert result.cost.total.base == pytest.approx(expected, abs=1e-12)
    assert result.unknown_units is not None and result.unknown_units["audio"].input == 5
    assert result.limits is not None and result.limits[payi_key.limit].state == "ok"
    assert result.use_case_name == "summarise" and result.user_id == "end-user-7"
    assert limit_spent(cli, payi_key.limit) == pytest.approx(before + expected, abs=1e-9)
    event = event_for(e2e_env, redis_url, first.request_id)
    assert event.source == "ingest" and event.provider == "system.openai"
    assert event.tokens.input == 1400 and event.tokens.cached_input == 400
    assert event.cost.total_nanos == round(expected * 1e9)
    assert dict(event.request_properties) == {"ticket": "T-9"}
    assert event.use_case_version == 3 and event.latency_ms == 812

    # The SDK retries the same body: recorded once, reported as a duplicate.
    again = client.ingest.units(
        category="system.openai", resource="gpt-4o", units=units, event_timestamp=stamp,
        limit_ids=[payi_key.limit], use_case_name="summarise", use_case_id="uc-41",
        use_case_step="draft", user_id="end-user-7", account_name="acme",
        use_case_properties={"tier": "gold"}, properties={"ticket": "T-9"},
        use_case_version=3, resource_scope="global", end_to_end_latency_ms=812)
    assert again.request_id == first.request_id
    assert again.xproxy_result.duplicate_request is True
    assert limit_spent(cli, payi_key.limit) == pytest.approx(before + expected, abs=1e-9)


def test_ingest_over_a_block_limit_is_recorded_and_reports_the_overrun(
        stack: Stack, payi_key: Setup, cli: CliRunner) -> None:
    block = "payi-block-" + uuid.uuid4().hex[:6]
    apply(cli, "apiVersion: tollgate.io/v1alpha1\nkind: Limit\n"
               f"metadata: {{name: {block}}}\nspec:\n  type: Block\n  max: 0.001\n"
               "  selector: {keys: [nobody]}\n")
    client = payi_client(stack, payi_key)
    deadline = time.monotonic() + 5
    while True:  # until the limit reached the workers
        response = client.ingest.units(
            category="system.openai", resource="gpt-4o",
            units={"text": {"input": 1000, "output": 1000}}, limit_ids=[block],
            properties={"n": uuid.uuid4().hex})
        limits = response.xproxy_result.limits or {}
        if block in limits or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # $0.0125 reported against a $0.001 Block limit: not refused (it happened), overrun.
    assert limits[block].state == "overrun"
    assert response.xproxy_result.blocked_limit_ids == []
    total = response.xproxy_result.cost.total  # type: ignore[union-attr]
    assert total is not None and total.overrun_base == pytest.approx(0.0125 - 0.001, abs=1e-9)


def test_bulk_ingest_records_good_events_and_lists_bad_ones(stack: Stack, payi_key: Setup,
                                                           e2e_env: dict[str, str],
                                                           redis_url: str) -> None:
    client = payi_client(stack, payi_key)
    tag = uuid.uuid4().hex[:8]
    events: list[Any] = [
        {"category": "system.anthropic", "resource": "claude-sonnet-4-5",
         "units": {"text": {"input": 10, "output": 5}}, "use_case_name": "bulk-" + tag},
        {"category": "system.openai", "units": {"text": {"input": 1}}},   # no resource
        {"category": "system.openai", "resource": "gpt-4o",
         "units": {"text": {"input": -1}}},                                 # negative
        {"category": "system.openai", "resource": "gpt-4o-mini",
         "units": {"text": {"input": 7, "output": 3}}, "user_id": "u-" + tag},
    ]
    response = client.ingest.bulk(events=events)
    assert response.ingest_count == 2 and response.error_count == 2
    assert [e.item_index for e in response.errors or []] == [1, 2]
    first_error = (response.errors or [])[0].xproxy_result
    assert first_error is not None and first_error.status_code == 400
    assert first_error.xproxy_error is not None and "resource" in (
        first_error.xproxy_error.message or "")
    ids = [r["request_id"] for r in response.model_extra["results"]]
    assert event_for(e2e_env, redis_url, ids[0]).use_case_name == "bulk-" + tag
    assert event_for(e2e_env, redis_url, ids[1]).user == "u-" + tag
    again = client.ingest.bulk(events=events)
    assert [r["xproxy_result"]["duplicate_request"] for r in again.model_extra["results"]] == [
        True, True]


@pytest.mark.parametrize(("body", "fragment"), [
    (b"not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"category": "system.openai", "resource": "gpt-4o"}', "'units'"),
    (b'{"category": "system.openai", "resource": "gpt-4o", "units": {"text": {"input": 1.5}}}',
     "integer"),
    (b'{"category": "system.openai", "resource": "gpt-4o", "units": {"text": {}},'
     b' "event_timestamp": "yesterday"}', "ISO 8601"),
])
def test_bad_ingest_payloads_are_clear_400s(stack: Stack, payi_key: Setup, body: bytes,
                                            fragment: str) -> None:
    response = httpx.post(f"{stack.base_url}/api/v1/ingest", content=body, timeout=10,
                          headers={"xProxy-api-key": payi_key.key,
                                   "content-type": "application/json"})
    assert response.status_code == 400, response.text
    doc = response.json()
    assert fragment in doc["xproxy_error"]["message"]
    assert doc["statusCode"] == 400 and doc["error"]["code"] == "invalid_request"


def test_ingest_needs_a_valid_key(stack: Stack) -> None:
    from payi import AuthenticationError, Payi
    client = Payi(api_key="tg-not-a-key", base_url=stack.base_url, max_retries=0)
    with pytest.raises(AuthenticationError):
        client.ingest.units(category="system.openai", resource="gpt-4o",
                            units={"text": {"input": 1, "output": 1}})


INSTRUMENTED_APP = """
import sys
import openai
from payi.lib.instrument import payi_instrument, track_context

payi_instrument()  # Pay-i's default: telemetry, the app calls the provider itself
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
with track_context(use_case_name=sys.argv[3], limit_ids=[sys.argv[4]], user_id="end-user-7"):
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hello"}])
print(completion.id)
"""


def test_sdk_default_instrumentation_reports_to_tollgate(
        stack: Stack, payi_key: Setup, e2e_env: dict[str, str], redis_url: str, cli: CliRunner
) -> None:
    """`payi_instrument()` without proxy, in its own process (it patches the provider SDKs):
    the app calls the provider directly, the SDK ingests the usage into Tollgate."""
    from tests.e2e.conftest import OPENAI_UPSTREAM_KEY
    clear_upstream(stack)
    before = limit_spent(cli, payi_key.limit)
    use_case = "instrumented-" + uuid.uuid4().hex[:6]
    env = {**e2e_env, "PAYI_BASE_URL": stack.base_url, "PAYI_API_KEY": payi_key.key}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INSTRUMENTED_APP),
         f"http://127.0.0.1:{stack.mock_port}/v1", OPENAI_UPSTREAM_KEY, use_case,
         payi_key.limit],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(upstream_requests(stack)) == 1  # the provider was called directly, once
    stream = KeySchema(e2e_env["TOLLGATE_REDIS_TAG"]).usage_stream
    client = redis.Redis.from_url(redis_url)
    try:
        found = [usage_pb2.UsageEvent.FromString(f[b"event"])
                 for _id, f in client.xrevrange(stream, count=200)]
    finally:
        client.close()
    mine = [e for e in found if e.use_case_name == use_case]
    assert len(mine) == 1, done.stderr
    event = mine[0]
    assert event.source == "ingest" and event.provider == "system.openai"
    assert event.model == "gpt-4o" and event.tokens.output > 0 and event.cost.total_nanos > 0
    assert event.user == "end-user-7"
    assert limit_spent(cli, payi_key.limit) == pytest.approx(
        before + event.cost.total_nanos / 1e9, abs=1e-9)


def test_ingest_refusals_before_the_body_use_the_pay_i_error_model(stack: Stack) -> None:
    response = httpx.post(f"{stack.base_url}/api/v1/ingest", json={}, timeout=10)
    assert response.status_code == 401
    assert response.json()["xproxy_error"]["code"] == "missing_api_key"


def test_spend_metrics_by_key_model_and_upstream(stack: Stack, payi_key: Setup) -> None:
    """Proxied calls count under their upstream, ingested ones under `ingest`."""
    def spend(upstream: str) -> float:
        return metric_value(stack, f'tollgate_spend_nanos_total{{key="{payi_key.name}",'
                                   f'model="gpt-4o",upstream="{upstream}"}}')

    before_proxy, before_ingest = spend("openai"), spend("ingest")
    raw = openai_client(stack, payi_key).chat.completions.with_raw_response.create(
        **chat_body())
    cost = round(float(raw.headers["x-tollgate-cost"]) * 1e9)
    result = payi_client(stack, payi_key).ingest.units(
        category="system.openai", resource="gpt-4o",
        units={"text": {"input": 10, "output": 10}}, properties={"n": uuid.uuid4().hex})
    assert result.xproxy_result.cost is not None and result.xproxy_result.cost.total is not None
    assert spend("openai") == before_proxy + cost
    assert spend("ingest") == pytest.approx(
        before_ingest + result.xproxy_result.cost.total.base * 1e9)


def test_use_case_and_account_select_limits_only_for_keys_allowed_to(
    stack: Stack, cli: CliRunner, new_named_key: Callable[..., tuple[str, str]]
) -> None:
    """`useCases` / `accounts` selectors, reached through the SDK's own headers
    (`create_headers`), the `x-tollgate-*` twins and the ingest API; a key without
    `allowedUseCases` / `allowedAccounts` naming the same use case spends nothing of it."""
    tag = uuid.uuid4().hex[:6]
    _, delegate = new_named_key("--allowed-use-cases", f"summarise-{tag}*",
                                "--allowed-accounts", f"acme-{tag}")
    _, stranger = new_named_key()
    uc_limit, acct_limit = f"uc-{tag}", f"acct-{tag}"
    apply(cli, f"""apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: {uc_limit}}}
spec: {{type: Block, max: 5, selector: {{useCases: [summarise-{tag}]}}}}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: {acct_limit}}}
spec: {{type: Allow, max: 5, selector: {{accounts: [acme-{tag}]}}}}
""")
    claims = create_headers(use_case_name=f"summarise-{tag}", account_name=f"acme-{tag}")

    def call(key: str, headers: dict[str, str]) -> Any:
        client = openai.OpenAI(api_key=CLIENT_PROVIDER_KEY, max_retries=0,
                               base_url=payi_openai_url(stack.base_url),
                               default_headers={"xProxy-api-key": key})
        return client.chat.completions.with_raw_response.create(
            **chat_body(max_tokens=5), extra_headers=headers)

    deadline = time.monotonic() + 6  # until both workers have the limits
    while set(call(delegate, claims).parse().model_extra["xproxy_result"]["limits"]) != {
            uc_limit, acct_limit}:
        assert time.monotonic() < deadline, "the limits never selected the allowed key"
        time.sleep(0.1)
    uc_spent, acct_spent = limit_spent(cli, uc_limit), limit_spent(cli, acct_limit)
    assert uc_spent > 0 and acct_spent > 0

    # The stranger's claim is recorded (result object) but selects nothing.
    raw = call(stranger, claims)
    result = raw.parse().model_extra["xproxy_result"]
    assert result["use_case_name"] == f"summarise-{tag}" and result["account_name"] == f"acme-{tag}"
    assert result["limits"] == {} and "x-tollgate-limits" not in raw.headers
    assert (limit_spent(cli, uc_limit), limit_spent(cli, acct_limit)) == (uc_spent, acct_spent)

    # The Tollgate twins, and the use case id: `summarise-<tag>` as an id selects too.
    raw = call(delegate, {"x-tollgate-use-case-id": f"summarise-{tag}"})
    assert set(raw.parse().model_extra["xproxy_result"]["limits"]) == {uc_limit}
    # A use case outside the key's patterns selects nothing, even for the delegate.
    raw = call(delegate, {"x-tollgate-use-case-name": "translate",
                          "x-tollgate-account-name": "globex"})
    assert raw.parse().model_extra["xproxy_result"]["limits"] == {}

    # Telemetry-only mode: an ingested call is charged by the same selectors.
    from payi import Payi
    before = limit_spent(cli, uc_limit)
    for key, selected in ((delegate, True), (stranger, False)):
        response = Payi(api_key=key, base_url=stack.base_url, max_retries=0).ingest.units(
            category="system.openai", resource="gpt-4o",
            units={"text": {"input": 1000, "output": 100}}, use_case_name=f"summarise-{tag}")
        assert (uc_limit in (response.xproxy_result.limits or {})) is selected
    assert limit_spent(cli, uc_limit) == pytest.approx(before + 3.5e-3, abs=1e-9)
