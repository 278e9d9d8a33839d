"""Routing by model through real Envoy: two fake provider clusters, model aliases, Azure OpenAI
path and header rewriting, and `GET /v1/models`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc.core.pricing import format_nanos
from extproc.launch import Stack
from tests.e2e.conftest import (
    ANTHROPIC_UPSTREAM_KEY,
    AZURE_UPSTREAM_KEY,
    OPENAI_UPSTREAM_KEY,
    SECOND_UPSTREAM_KEY,
    CliRunner,
    chat_body,
    clear_upstream,
    upstream_requests,
)

pytestmark = pytest.mark.e2e

UPSTREAMS = """
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {name: second}
spec:
  provider: openai-compatible
  cluster: second
  models: ["special-*", "fast"]
  priority: 10
  aliases: {fast: special-large-2, "turbo*": special-small-1}
  credentials:
    - {name: main, secretRef: SECOND_API_KEY}
---
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {name: azure}
spec:
  provider: azure-openai
  cluster: azure-openai
  models: ["gpt-4o-azure", "gpt-35-dep"]
  priority: 20
  azure:
    apiVersion: "2024-10-21"
    deployments: {gpt-4o-azure: prod-gpt4o}
  credentials:
    - {name: main, secretRef: AZURE_OPENAI_API_KEY}
"""


@pytest.fixture(scope="module")
def routed(cli: CliRunner, new_key: Callable[..., str], stack: Stack) -> str:
    cli("apply", "-f", "-", stdin=UPSTREAMS)
    key = new_key()
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the new Upstreams reached the workers
        raw = client.chat.completions.with_raw_response.create(**chat_body("fast"))
        if raw.parse().model == "special-large-2":
            break
        time.sleep(0.1)
    return key


def _second_requests(second_upstream: int) -> list[dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{second_upstream}/__mock/requests", timeout=5)
    result: list[dict[str, Any]] = response.json()
    return result


def test_models_route_to_their_clusters(
    stack: Stack, routed: str, second_upstream: int
) -> None:
    clear_upstream(stack)
    httpx.delete(f"http://127.0.0.1:{second_upstream}/__mock/requests", timeout=5)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=routed, max_retries=0)
    client.chat.completions.create(**chat_body("special-small"))
    client.chat.completions.create(**chat_body("gpt-4o-mini"))
    second = _second_requests(second_upstream)
    first = upstream_requests(stack)
    assert [r["body"]["model"] for r in second] == ["special-small"]
    assert second[0]["headers"]["authorization"] == f"Bearer {SECOND_UPSTREAM_KEY}"
    assert [r["body"]["model"] for r in first] == ["gpt-4o-mini"]
    assert first[0]["headers"]["authorization"] == f"Bearer {OPENAI_UPSTREAM_KEY}"


def test_alias_rewrites_the_model_and_content_length(
    stack: Stack, routed: str, second_upstream: int
) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=routed, max_retries=0)
    completion = client.chat.completions.create(**chat_body("fast"))
    assert completion.model == "special-large-2"  # the upstream saw the rewritten model
    sent = _second_requests(second_upstream)[-1]
    # The rewritten body arrived whole and parseable: content-length was fixed with it (a stale
    # length would have cut the body short or stalled the request).
    assert sent["body"]["model"] == "special-large-2"
    assert sent["body"]["messages"] == chat_body()["messages"]


def test_glob_alias_routes_every_matching_name_to_its_target(
    stack: Stack, routed: str, second_upstream: int
) -> None:
    httpx.delete(f"http://127.0.0.1:{second_upstream}/__mock/requests", timeout=5)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=routed, max_retries=0)
    for name in ("turbo", "turbo-latest"):
        assert client.chat.completions.create(**chat_body(name)).model == "special-small-1"
    assert [r["body"]["model"] for r in _second_requests(second_upstream)] == [
        "special-small-1", "special-small-1"]


def test_openai_call_routed_to_azure_gets_azure_path_and_header(
    stack: Stack, routed: str
) -> None:
    clear_upstream(stack)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=routed, max_retries=0)
    client.chat.completions.create(**chat_body("gpt-4o-azure"))
    sent = upstream_requests(stack)[-1]
    assert sent["path"] == "/openai/deployments/prod-gpt4o/chat/completions"
    assert sent["query"]["api-version"] == "2024-10-21"
    assert sent["headers"]["api-key"] == AZURE_UPSTREAM_KEY
    assert "authorization" not in sent["headers"]


def test_azure_sdk_through_the_gateway(stack: Stack, routed: str) -> None:
    clear_upstream(stack)
    client = openai.AzureOpenAI(azure_endpoint=stack.base_url, api_key=routed,
                                api_version="2024-10-21", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(**chat_body("gpt-35-dep"))
    assert raw.headers["x-tollgate-request-id"]
    sent = upstream_requests(stack)[-1]
    assert sent["path"] == "/openai/deployments/gpt-35-dep/chat/completions"
    assert sent["headers"]["api-key"] == AZURE_UPSTREAM_KEY  # the virtual key was replaced
    assert routed not in str(sent["headers"])


def test_models_endpoint_lists_what_the_key_may_use(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    key = new_key("--models", "gpt-4o*")
    listed = httpx.get(f"{stack.base_url}/v1/models", headers={"authorization": f"Bearer {key}"},
                       timeout=10).json()
    ids = {m["id"] for m in listed["data"]}
    assert listed["object"] == "list" and ids and all(i.startswith("gpt-4o") for i in ids)
    assert httpx.get(f"{stack.base_url}/v1/models", timeout=10).status_code == 401


def test_models_retrieve_answers_one_model_like_the_list(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key("--models", "gpt-4o*"),
                           max_retries=0)
    model = client.models.retrieve("gpt-4o-mini")
    assert (model.id, model.object) == ("gpt-4o-mini", "model")
    with pytest.raises(openai.NotFoundError) as other:  # priced, but not for this key
        client.models.retrieve("gpt-4.1")
    assert other.value.code == "model_not_found"


def test_denied_models_are_refused_and_not_listed(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    """TOLLGATE_DENIED_MODELS=o1-pro* in this stack: no key reaches them, whatever it allows."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(), max_retries=0)
    clear_upstream(stack)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(**chat_body("o1-pro"))
    assert refused.value.code == "model_denied"
    assert upstream_requests(stack) == []
    listed = {m.id for m in client.models.list()}
    assert "o1" in listed and "o1-pro" not in listed
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("o1-pro")


def test_anthropic_count_tokens_is_passed_through_at_no_cost(
    stack: Stack, new_key: Callable[..., str]
) -> None:
    client = anthropic.Anthropic(base_url=stack.base_url, api_key=new_key(), max_retries=0)
    clear_upstream(stack)
    raw = client.messages.with_raw_response.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "How many tokens?"}])
    assert raw.parse().input_tokens > 0
    assert raw.headers["x-tollgate-cost"] == format_nanos(0)
    (seen,) = upstream_requests(stack)
    assert seen["path"] == "/v1/messages/count_tokens"
    assert seen["headers"]["x-api-key"] == ANTHROPIC_UPSTREAM_KEY


def test_allowed_upstreams_restrict_what_a_key_reaches(
    stack: Stack, routed: str, new_key: Callable[..., str], second_upstream: int
) -> None:
    """A key created with `--allowed-upstreams second`: its calls go only through that
    Upstream; a model only other Upstreams serve is a 403 in the dialect's own shape (the
    openai and anthropic SDKs raise PermissionDeniedError) and nothing reaches a provider."""
    key = new_key("--allowed-upstreams", "sec*")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    httpx.delete(f"http://127.0.0.1:{second_upstream}/__mock/requests", timeout=5)
    assert client.chat.completions.create(**chat_body("fast")).model == "special-large-2"
    assert len(_second_requests(second_upstream)) == 1
    clear_upstream(stack)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(**chat_body("gpt-4o-mini"))
    assert refused.value.code == "upstream_not_allowed"
    assert "gpt-4o-mini" in refused.value.message
    claude = anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert upstream_requests(stack) == []


def test_models_list_follows_routing_for_the_key(
    stack: Stack, routed: str, new_key: Callable[..., str]
) -> None:
    """models.list() names what the key can call: with `--allowed-upstreams second` the
    Upstream's alias, its glob alias's target (not the glob) and exact model names and nothing
    the built-in Upstreams serve; an
    unrestricted key also sees the Azure Upstream's models and the alias; models.retrieve
    agrees with the list both ways."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1",
                           api_key=new_key("--allowed-upstreams", "second"), max_retries=0)
    assert [m.id for m in client.models.list()] == ["fast", "special-small-1"]
    assert client.models.retrieve("fast").id == "fast"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    everyone = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=routed, max_retries=0)
    listed = [m.id for m in everyone.models.list()]
    assert {"gpt-4o", "claude-haiku-4-5", "fast", "gpt-4o-azure", "gpt-35-dep"} <= set(listed)
    assert everyone.models.retrieve("gpt-35-dep").id == "gpt-35-dep"
