"""The provider registry and each provider's rules: paths, auth, rewrites, errors, clusters.

Usage and stream readers are covered by the golden bodies in test_usage_pricing.py and
test_streams.py; here is what decides where a call goes and how it looks on its way.
"""

from __future__ import annotations

import orjson
import pytest

from extproc import envoyconf
from extproc.core import providers
from extproc.core.decisions import Deny
from extproc.core.providers import Endpoint, RewriteInput, Route
from extproc.core.resources import PROVIDERS, UpstreamSpec, upstream_spec, validate_document

pytestmark = pytest.mark.unit


def _upstream(provider: str, **extra: object) -> UpstreamSpec:
    doc = {"apiVersion": "tollgate.io/v1alpha1", "kind": "Upstream",
           "metadata": {"name": "u"},
           "spec": {"provider": provider, "cluster": "c", "models": ["*"], **extra}}
    return upstream_spec(validate_document(doc))


def _rewrite(provider: str, path: str, model: str = "gpt-4o", sent: tuple[str, ...] = (),
             **extra: object) -> list[tuple[str, str]]:
    route = providers.classify_path(path)
    assert route is not None
    req = RewriteInput(_upstream(provider, **extra), route, path, model, frozenset(sent))
    return providers.get(provider).rewrite(req)


def test_registry_names_are_the_resource_schema() -> None:
    assert PROVIDERS == providers.NAMES
    assert len(set(providers.NAMES)) == len(providers.NAMES)


def test_every_endpoint_has_exactly_one_owner() -> None:
    owned = [e for p in providers.REGISTRY for e in p.endpoints]
    assert sorted(owned, key=lambda e: e.value) == sorted(Endpoint, key=lambda e: e.value)


@pytest.mark.parametrize(("provider", "header", "value"), [
    ("openai", "authorization", "Bearer sk-1"),
    ("openai-compatible", "authorization", "Bearer sk-1"),
    ("azure-openai", "api-key", "sk-1"),
    ("anthropic", "x-api-key", "sk-1"),
])
def test_auth_header(provider: str, header: str, value: str) -> None:
    p = providers.get(provider)
    assert (p.auth_header, p.auth_value("sk-1")) == (header, value)


@pytest.mark.parametrize(("provider", "route", "served"), [
    ("openai", Route(Endpoint.CHAT), True),
    ("openai", Route(Endpoint.MESSAGES), False),
    ("openai", Route(Endpoint.CHAT, azure_deployment="d"), False),
    ("openai-compatible", Route(Endpoint.RESPONSES), True),
    ("azure-openai", Route(Endpoint.CHAT), True),
    ("azure-openai", Route(Endpoint.EMBEDDINGS), True),
    ("azure-openai", Route(Endpoint.RESPONSES), False),  # no deployment path to rewrite to
    ("azure-openai", Route(Endpoint.RESPONSES, azure_deployment="d"), True),
    ("anthropic", Route(Endpoint.MESSAGES), True),
    ("anthropic", Route(Endpoint.CHAT), False),
])
def test_which_routes_a_provider_serves(provider: str, route: Route, served: bool) -> None:
    assert providers.get(provider).serves(route) is served


def test_azure_rewrites_openai_paths_to_deployments() -> None:
    assert _rewrite("azure-openai", "/v1/chat/completions", "gpt-4o",
                    azure={"apiVersion": "2025-01-01", "deployments": {"gpt-4o": "prod"}}) == [
        (":path", "/openai/deployments/prod/chat/completions?api-version=2025-01-01")]
    # No deployment named: the model is the deployment; the default version applies.
    assert _rewrite("azure-openai", "/v1/embeddings", "text-embedding-3-small") == [
        (":path", "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21")]


def test_azure_keeps_deployment_paths_and_their_version() -> None:
    path = "/openai/deployments/d/chat/completions"
    assert _rewrite("azure-openai", path) == [(":path", path + "?api-version=2024-10-21")]
    assert _rewrite("azure-openai", path + "?api-version=2023-05-15") == []


def test_anthropic_version_only_when_the_client_sent_none() -> None:
    assert _rewrite("anthropic", "/v1/messages") == [("anthropic-version", "2023-06-01")]
    assert _rewrite("anthropic", "/v1/messages", sent=("anthropic-version",)) == []
    assert _rewrite("openai", "/v1/chat/completions") == []


def test_error_shapes_per_dialect() -> None:
    deny = Deny(401, "invalid_api_key", "bad key")
    openai_doc = orjson.loads(providers.owner(Endpoint.CHAT).error_body(deny))
    anthropic_doc = orjson.loads(providers.owner(Endpoint.MESSAGES).error_body(deny))
    assert openai_doc == {"error": {"message": "bad key", "type": "authentication_error",
                                    "code": "invalid_api_key"}}
    assert anthropic_doc == {"type": "error", **openai_doc}


def test_envoy_clusters_come_from_the_registry() -> None:
    real = {c.name: c for c in envoyconf.provider_clusters("me.openai.azure.com")}
    assert set(real) == {c.name for c in providers.clusters()}
    assert real["azure-openai"].host == "me.openai.azure.com"
    assert all(c.tls and c.port == 443 and c.sni == c.host for c in real.values())
    assert {c.name for c in envoyconf.mock_clusters("127.0.0.1", 1)} == set(real)
