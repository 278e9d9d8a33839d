"""What a key can reach: the models `GET /v1/models` lists and `/v1/models/{id}` answers
(and Gemini's `GET /v1beta/models[/<model>]`, in Google's shape).

A model is listed when a call for it would get through: the key may name it (its `models`
patterns), the global deny list allows it and the model an alias stands for, and routing would
send it through an Upstream the key may use (its `allowedUpstreams`, the Upstream's
`allowedGroups`). Not on the request path: listing costs one pass over names and Upstreams, no
Redis.

Glob aliases (`turbo*`) are not model ids, so they are never listed; their targets are
candidates like any other name (listed when the key can call them by their own name), and a
retrieve of a name a glob alias matches answers that name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import orjson

from extproc.core import providers
from extproc.core.decisions import Deny
from extproc.core.keys import may_route, model_allowed
from extproc.core.providers import gemini
from extproc.core.providers.base import Endpoint, Route
from extproc.core.resources import KeyRecord, UpstreamSpec
from extproc.core.snapshot import Snapshot

_GLOB = frozenset("*?[")
# Gemini's listing: pageSize's default and bound, as Google's API has them.
GEMINI_PAGE_SIZE = 50
GEMINI_MAX_PAGE_SIZE = 1000


def serving_upstream(upstreams: list[UpstreamSpec], model: str) -> UpstreamSpec | None:
    """The Upstream a call for `model` would go to on its own provider's API: the first (by
    priority) that names it (an alias or a model pattern other than `*`), else the first `*`
    Upstream whose provider claims the name (a `claude-*` name is not OpenAI's to serve)."""
    for upstream in upstreams:
        if upstream.alias_of(model) is not None or any(
                fnmatch.fnmatchcase(model, p) for p in upstream.models if p != "*"):
            return upstream
    for upstream in upstreams:
        if "*" in upstream.models and providers.claims(providers.get(upstream.provider), model):
            return upstream
    return None


def _usable(snapshot: Snapshot, key: KeyRecord, provider: str | None) -> list[UpstreamSpec]:
    """The Upstreams the key may route through; `provider`: only that provider's (Gemini's
    own listing names only what Gemini's paths reach)."""
    return [u for u in snapshot.upstreams
            if may_route(key, u) and (provider is None or u.provider == provider)]


def _callable(snapshot: Snapshot, key: KeyRecord, upstreams: list[UpstreamSpec], name: str,
              denies: Callable[[str], bool]) -> bool:
    """Would a call for `name` with this key get through routing?"""
    if not model_allowed(key, name) or denies(name):
        return False
    serving = serving_upstream(upstreams, name)
    if serving is None:
        return False
    target = serving.alias_of(name)
    if target is not None and denies(target):
        return False
    return not (serving.unpriced == "refuse" and snapshot.price(target or name) is None)


def reachable_models(snapshot: Snapshot, key: KeyRecord, denies: Callable[[str], bool],
                     provider: str | None = None) -> list[str]:
    """The names this key can call, priced models first (in price-table order), then each
    Upstream's exact aliases, glob aliases' targets and exact model names."""
    upstreams = _usable(snapshot, key, provider)
    names = dict.fromkeys(snapshot.prices.models())
    for upstream in upstreams:
        for alias, target in upstream.aliases.items():
            names.setdefault(target if _GLOB & set(alias) else alias)
        for name in upstream.models:
            if not _GLOB & set(name):
                names.setdefault(name)
    return [name for name in names if _callable(snapshot, key, upstreams, name, denies)]


def retrievable(snapshot: Snapshot, key: KeyRecord, name: str, denies: Callable[[str], bool],
                provider: str | None = None) -> bool:
    """May `models.retrieve(name)` answer? For a listed name, and for a name a glob alias of a
    usable Upstream matches (a call for it would be rewritten to the alias's target)."""
    if name in reachable_models(snapshot, key, denies, provider):
        return True
    upstreams = _usable(snapshot, key, provider)
    serving = serving_upstream(upstreams, name)
    return (serving is not None and serving.alias_of(name) is not None
            and _callable(snapshot, key, upstreams, name, denies))


def models_reply(snapshot: Snapshot, key: KeyRecord, route: Route, query: str,
                 denies: Callable[[str], bool], now: float) -> tuple[int, bytes] | Deny:
    """The answer to a models list or retrieve, in the dialect of the route: OpenAI's
    (`/v1/models`) or Gemini's (`/v1beta/models`)."""
    if route.endpoint is Endpoint.GEMINI_MODELS:
        return _gemini_reply(snapshot, key, route, query, denies)
    created = int(now)

    def entry(model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": created, "owned_by": "tollgate"}

    if route.model is not None:  # `GET /v1/models/{id}` (models.retrieve)
        if not retrievable(snapshot, key, route.model, denies):
            return _not_found(route.model)
        return 200, orjson.dumps(entry(route.model))
    data = [entry(model) for model in reachable_models(snapshot, key, denies)]
    return 200, orjson.dumps({"object": "list", "data": data})


def _not_found(model: str) -> Deny:
    return Deny(404, "model_not_found",
                f"The model '{model}' does not exist or this key may not use it.")


def _gemini_reply(snapshot: Snapshot, key: KeyRecord, route: Route, query: str,
                  denies: Callable[[str], bool]) -> tuple[int, bytes] | Deny:
    def resource(name: str) -> dict[str, object]:
        upstream = serving_upstream(_usable(snapshot, key, "gemini"), name)
        target = (upstream.alias_of(name) if upstream else None) or name
        return gemini.model_resource(name, target, snapshot.price(target))

    if route.model is not None:  # `/v1beta/models/<m>`: client.models.get(model=...)
        if not retrievable(snapshot, key, route.model, denies, "gemini"):
            return _not_found(route.model)
        return 200, orjson.dumps(resource(route.model))
    page = gemini.page_request(query, GEMINI_PAGE_SIZE, GEMINI_MAX_PAGE_SIZE)
    if page is None:
        return Deny(400, "invalid_request", "pageSize and pageToken must be numbers.")
    start, size = page
    names = reachable_models(snapshot, key, denies, "gemini")
    doc: dict[str, object] = {"models": [resource(n) for n in names[start:start + size]]}
    if start + size < len(names):
        doc["nextPageToken"] = str(start + size)
    return 200, orjson.dumps(doc)
