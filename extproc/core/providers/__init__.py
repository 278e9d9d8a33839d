"""The provider registry: the one list of providers the rest of Tollgate asks.

Each provider is one module implementing the protocol in `base` (its rules are written there).
The exchange asks the registry which route a path is, which provider an Upstream is, how to
authenticate and rewrite a call, how to read usage and errors; the resource schema takes its
provider names from here, the Envoy config generator its clusters.

Adding a provider: one module with a `PROVIDER` object, one line in `REGISTRY`, its tests
(see docs/providers.md).
"""

from __future__ import annotations

import fnmatch

import orjson

from extproc.core.providers import anthropic, azure_openai, gemini, openai, openai_compatible
from extproc.core.providers.base import (
    KEY_HEADERS,
    Cluster,
    Endpoint,
    Provider,
    RequestRules,
    RewriteInput,
    Route,
    StreamReader,
)
from extproc.core.usage import Usage

__all__ = [
    "KEY_HEADERS",
    "NAMES",
    "REGISTRY",
    "Cluster",
    "Endpoint",
    "Provider",
    "RequestRules",
    "RewriteInput",
    "Route",
    "StreamReader",
    "claims",
    "classify_path",
    "clusters",
    "get",
    "key_from_path",
    "owner",
    "parse_response_usage",
]

# Order matters twice: paths are offered to providers in this order (the first owner wins), and
# it is the order the resource schema lists the names in.
REGISTRY: tuple[Provider, ...] = (
    openai.PROVIDER,
    azure_openai.PROVIDER,
    anthropic.PROVIDER,
    openai_compatible.PROVIDER,
    gemini.PROVIDER,
)

NAMES: tuple[str, ...] = tuple(p.name for p in REGISTRY)
_BY_NAME: dict[str, Provider] = {p.name: p for p in REGISTRY}
_OWNER: dict[Endpoint, Provider] = {e: p for p in REGISTRY for e in p.endpoints}


def get(name: str) -> Provider:
    """The provider of an Upstream (`spec.provider`, validated against `NAMES`)."""
    return _BY_NAME[name]


def owner(endpoint: Endpoint) -> Provider:
    """The provider whose dialect an endpoint belongs to (its request fields, its usage, its
    errors)."""
    return _OWNER[endpoint]


def classify_path(path: str) -> Route | None:
    """Map a request path (query string allowed) to a route, or None if no provider owns it."""
    path = path.split("?", 1)[0].rstrip("/")
    for provider in REGISTRY:
        route = provider.classify(path)
        if route is not None:
            return route
    return None


def parse_response_usage(endpoint: Endpoint, body: bytes) -> Usage | None:
    """Usage from a JSON response body; None when the body has no usage or is not JSON."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return owner(endpoint).usage_from_json(endpoint, doc)


def key_from_path(path: str) -> str | None:
    """A virtual key in the query string of a path whose provider accepts one there."""
    if "?" not in path:
        return None
    for provider in REGISTRY:
        key = provider.key_from_path(path)
        if key is not None:
            return key
    return None


def claims(provider: Provider, model: str) -> bool:
    """Whether `model` is a name of this provider's public API (rule 10 of `base`): for the
    models list, when an Upstream of it serves `*`."""
    if provider.model_names:
        return any(fnmatch.fnmatchcase(model, p) for p in provider.model_names)
    return not any(fnmatch.fnmatchcase(model, p) for other in REGISTRY
                   for p in other.model_names)


def clusters() -> tuple[Cluster, ...]:
    """The Envoy clusters of the providers' public APIs."""
    return tuple(p.cluster for p in REGISTRY if p.cluster is not None)
