"""What a key can reach: the models `GET /v1/models` lists and `/v1/models/{id}` answers.

A model is listed when a call for it would get through: the key may name it (its `models`
patterns), the global deny list allows it and the model an alias stands for, and routing would
send it through an Upstream the key may use (`allowedUpstreams`). Not on the request path:
listing costs one pass over names and Upstreams, no Redis.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from extproc.core import providers
from extproc.core.keys import model_allowed, upstream_allowed
from extproc.core.resources import KeyRecord, UpstreamSpec
from extproc.core.snapshot import Snapshot

_GLOB = frozenset("*?[")


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


def reachable_models(snapshot: Snapshot, key: KeyRecord,
                     denies: Callable[[str], bool]) -> list[str]:
    """The names this key can call, priced models first (in price-table order), then the exact
    aliases and model names of its Upstreams."""
    upstreams = [u for u in snapshot.upstreams if upstream_allowed(key, u.name)]
    names = dict.fromkeys(snapshot.prices.models())
    for upstream in upstreams:
        for name in (*upstream.aliases, *upstream.models):
            if not _GLOB & set(name):
                names.setdefault(name)
    out = []
    for name in names:
        if not model_allowed(key, name) or denies(name):
            continue
        serving = serving_upstream(upstreams, name)
        if serving is None:
            continue
        target = serving.alias_of(name)
        if target is not None and denies(target):
            continue
        if serving.unpriced == "refuse" and snapshot.price(target or name) is None:
            continue
        out.append(name)
    return out
