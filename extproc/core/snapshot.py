"""One immutable view of the configuration a replica serves with.

Built from the built-in resources plus everything stored (stored ones replace built-ins of the same
kind and name). Requests read only the snapshot, never Redis, so a request costs no configuration
round trip; a reload swaps the whole snapshot at once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from extproc.core import providers
from extproc.core.policy.engine import CompiledPolicy, compile_policy
from extproc.core.policy.matching import IndexFactory
from extproc.core.pricing import ModelPrice, PriceBook
from extproc.core.providers.base import Endpoint, Route
from extproc.core.quota import LimitSpec, RateLimitSpec
from extproc.core.resources import (
    KeyRecord,
    Resource,
    UpstreamSpec,
    key_record,
    limit_spec,
    model_prices,
    rate_limit_spec,
    selector_of,
    upstream_spec,
)

SecretLookup = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    keys_by_hash: dict[str, KeyRecord]
    prices: PriceBook
    upstreams: tuple[UpstreamSpec, ...]
    secrets: dict[str, str]  # secretRef -> value, resolved from env/files at load time
    resources: dict[tuple[str, str], Resource] = field(default_factory=dict)  # (kind, id)
    limits: tuple[LimitSpec, ...] = ()
    rate_limits: tuple[RateLimitSpec, ...] = ()
    policies: tuple[CompiledPolicy, ...] = ()  # word lists compiled once, here

    def choose_upstream(self, endpoint: Endpoint, model: str, azure: bool) -> UpstreamSpec | None:
        """The first upstream (by priority, then name) that speaks this API and serves `model`.
        `azure`: the path names an Azure deployment (only Azure serves those)."""
        found = self.upstreams_for(endpoint, model, azure)
        return found[0] if found else None

    def upstreams_for(self, endpoint: Endpoint, model: str, azure: bool,
                      allowed: Callable[[UpstreamSpec], bool] | None = None,
                      ) -> list[UpstreamSpec]:
        """Every upstream that speaks this API and serves `model`, by priority then name: the
        first is tried, the others are its backups (docs/providers.md, "Routing"). An upstream
        that serves the model only through the bare `*` pattern (the built-in OpenAI one) is a
        default route, not a backup: a pool of a named model that runs dry must not spill
        over to a provider nobody chose for it. `allowed`: only the Upstreams it accepts are
        considered (a key's `allowedUpstreams`, an Upstream's `allowedGroups`)."""
        route = Route(endpoint, azure_deployment="" if azure else None)
        found = []
        for upstream in self.upstreams:
            if allowed is not None and not allowed(upstream):
                continue
            if not providers.get(upstream.provider).serves(route) and not (
                upstream.translate and endpoint is Endpoint.CHAT and not azure
            ):
                continue
            # An alias is a model the upstream serves by definition (it rewrites it).
            if upstream.alias_of(model) is not None or any(
                fnmatch.fnmatchcase(model, p) for p in upstream.models if p != "*"
            ):
                found.append(upstream)
            elif "*" in upstream.models and not found:
                found.append(upstream)
                break
        return found

    def price(self, model: str) -> ModelPrice | None:
        return self.prices.lookup(model)


def build_snapshot(
    generation: int,
    builtin: Iterable[Resource],
    stored: Iterable[Resource],
    secret_lookup: SecretLookup,
    index_factory: IndexFactory | None = None,
) -> Snapshot:
    merged: dict[tuple[str, str], Resource] = {}
    for resource in (*builtin, *stored):
        merged[(resource.kind, resource.id)] = resource

    keys: dict[str, KeyRecord] = {}
    prices: dict[str, ModelPrice] = {}
    upstreams: list[UpstreamSpec] = []
    limits: list[LimitSpec] = []
    rate_limits: list[RateLimitSpec] = []
    policies: list[CompiledPolicy] = []
    # Price tables merge in name order ("default" first), so a later table overrides a model.
    for (kind, _name), resource in sorted(
        merged.items(), key=lambda kv: (kv[0][0], kv[0][1] != "default", kv[0][1])
    ):
        if kind == "VirtualKey":
            record = key_record(resource)
            keys[record.key_sha256] = record
        elif kind == "PriceTable":
            prices.update(model_prices(resource))
        elif kind == "Upstream":
            upstreams.append(upstream_spec(resource))
        elif kind == "Limit":
            limits.append(limit_spec(resource))
        elif kind == "RateLimit":
            rate_limits.append(rate_limit_spec(resource))
        elif kind == "Policy":
            policies.append(compile_policy(resource.id, selector_of(resource), resource.spec,
                                           index_factory))
    upstreams.sort(key=lambda u: (u.priority, u.name))
    secrets: dict[str, str] = {}
    for upstream in upstreams:
        for cred in upstream.credentials:
            value = secret_lookup(cred.secret_ref)
            if value:
                secrets[cred.secret_ref] = value
    return Snapshot(
        generation=generation,
        keys_by_hash=keys,
        prices=PriceBook(prices),
        upstreams=tuple(upstreams),
        secrets=secrets,
        # Not the VirtualKeys: they are `keys_by_hash` (100,000 keys are ≈ 10 MB of entries).
        resources={k: r for k, r in merged.items() if k[0] != "VirtualKey"},
        limits=tuple(limits),
        rate_limits=tuple(rate_limits),
        policies=tuple(policies),
    )
