"""The official `payi` SDK against Tollgate, as a Pay-i proxy user would run it: the SDK's own
URL helpers and header builder, the provider SDKs pointed at `/api/v1/proxy/<provider>`, and
every result object validated with the SDK's own `XproxyResult` model. Real Envoy, extproc,
Redis; only the provider is the fake upstream.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
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
from tests.e2e.conftest import CliRunner, chat_body, clear_upstream, upstream_requests

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
