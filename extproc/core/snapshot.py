"""One immutable view of the configuration a replica serves with.

Built from the built-in resources plus everything stored (stored ones replace built-ins of the same
kind and name). Requests read only the snapshot, never Redis, so a request costs no configuration
round trip; a reload swaps the whole snapshot at once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from extproc.core import providers
from extproc.core.policy.engine import CompiledPolicy, compile_policy
from extproc.core.policy.matching import IndexFactory
from extproc.core.pricing import ModelPrice, PriceBook
from extproc.core.providers.base import Endpoint, Route
from extproc.core.quota import LimitSpec, RateLimitSpec, reindex
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


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One stored resource that a configuration write touched since the last load."""

    kind: str
    ident: str  # canonical id (`ns/name`, bare name in `default`)
    before: Resource | None  # as the replica last saw it (None: was not stored)
    after: Resource | None  # None: deleted (or its stored document is invalid)


def _name_order(name: str) -> tuple[bool, str]:
    # Price tables merge in name order ("default" first), so a later table overrides a model;
    # every kind's list is kept in that order.
    return name != "default", name


def _order(item: tuple[tuple[str, str], Resource]) -> tuple[str, bool, str]:
    kind, name = item[0]
    return kind, *_name_order(name)


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
    for (kind, _name), resource in sorted(merged.items(), key=_order):
        if kind == "VirtualKey":
            record = key_record(resource)
            keys[record.key_sha256] = record
    # Not the VirtualKeys: they are `keys_by_hash` (100,000 keys are ≈ 10 MB of entries).
    configured = {k: r for k, r in merged.items() if k[0] != "VirtualKey"}
    return _assemble(generation, keys, configured, secret_lookup, index_factory)


def _assemble(
    generation: int,
    keys: dict[str, KeyRecord],
    configured: dict[tuple[str, str], Resource],
    secret_lookup: SecretLookup,
    index_factory: IndexFactory | None,
    reuse: Snapshot | None = None,
    changed: dict[str, set[str]] | None = None,
) -> Snapshot:
    """The snapshot of these keys and these (merged, non-key) resources. With `reuse`, only
    the kinds in `changed` (kind -> ids) are built again, and of the Limits and RateLimits
    (the kinds that can number 100,000) only the changed ones: one Limit changed among
    100,000 stored is not 100,000 parsed again."""
    changed = changed or {}

    def of_kind(kind: str) -> list[Resource]:
        return [r for _, r in sorted(((k, r) for k, r in configured.items() if k[0] == kind),
                                     key=_order)]

    if reuse is None or "PriceTable" in changed:
        prices: dict[str, ModelPrice] = {}
        for table in of_kind("PriceTable"):  # in name order: a later table overrides a model
            prices.update(model_prices(table))
        book = PriceBook(prices)
    else:
        book = reuse.prices
    if reuse is None or "Upstream" in changed:
        upstreams = sorted((upstream_spec(r) for r in of_kind("Upstream")),
                           key=lambda u: (u.priority, u.name))
    else:
        upstreams = list(reuse.upstreams)
    if reuse is None or "Policy" in changed:
        policies = tuple(compile_policy(r.id, selector_of(r), r.spec, index_factory)
                         for r in of_kind("Policy"))
    else:
        policies = reuse.policies
    if reuse is None:
        limits = tuple(limit_spec(r) for r in of_kind("Limit"))
        rate_limits = tuple(rate_limit_spec(r) for r in of_kind("RateLimit"))
    else:
        limits, rebuilt = _respec(reuse.limits, changed.get("Limit", set()), configured,
                                  "Limit", limit_spec)
        if limits is not reuse.limits:
            reindex(reuse.limits, limits, changed["Limit"], rebuilt)
        rate_limits, _ = _respec(reuse.rate_limits, changed.get("RateLimit", set()),
                                 configured, "RateLimit", rate_limit_spec)
    return Snapshot(
        generation=generation,
        keys_by_hash=keys,
        prices=book,
        upstreams=tuple(upstreams),
        secrets=_secrets(upstreams, secret_lookup),
        resources=configured,
        limits=limits,
        rate_limits=rate_limits,
        policies=policies,
    )


_Spec = TypeVar("_Spec", LimitSpec, RateLimitSpec)


def _respec(previous: tuple[_Spec, ...], ids: set[str],
            configured: dict[tuple[str, str], Resource], kind: str,
            build: Callable[[Resource], _Spec]) -> tuple[tuple[_Spec, ...], list[_Spec]]:
    """`previous` with the specs of `ids` built again (or dropped, if no longer stored), in
    the order a full build gives (`_name_order`), and the specs built again."""
    if not ids:
        return previous, []
    rebuilt = [build(configured[(kind, i)]) for i in ids if (kind, i) in configured]
    kept = [spec for spec in previous if spec.name not in ids] + rebuilt
    # Mostly sorted already: Python's sort merges the appended run in about linear time.
    return tuple(sorted(kept, key=lambda spec: _name_order(spec.name))), rebuilt


def _secrets(upstreams: Iterable[UpstreamSpec], secret_lookup: SecretLookup) -> dict[str, str]:
    secrets: dict[str, str] = {}
    for upstream in upstreams:
        for cred in upstream.credentials:
            value = secret_lookup(cred.secret_ref)
            if value:
                secrets[cred.secret_ref] = value
    return secrets


def refresh_secrets(snapshot: Snapshot, secret_lookup: SecretLookup) -> Snapshot:
    """The same snapshot with its credentials read again (files and env change on their own)."""
    return replace(snapshot, secrets=_secrets(snapshot.upstreams, secret_lookup))


def patch_snapshot(
    snapshot: Snapshot,
    generation: int,
    changes: Iterable[ConfigChange],
    builtin: Iterable[Resource],
    secret_lookup: SecretLookup,
    index_factory: IndexFactory | None = None,
) -> Snapshot | None:
    """`snapshot` with these changes applied, as `build_snapshot` over everything would build
    it, in time proportional to the changes (plus the non-key resources when one of those
    changed): a key created among 100,000 no longer rebuilds all of them (bench/scale.py).
    None when it cannot tell the same answer cheaply (a key hash claimed by two keys):
    build everything instead."""
    keys: dict[str, KeyRecord] | None = None
    configured: dict[tuple[str, str], Resource] | None = None
    changed: dict[str, set[str]] = {}  # non-key kind -> ids
    shipped = {(r.kind, r.id): r for r in builtin}
    for change in changes:
        ident = (change.kind, change.ident)
        if change.kind != "VirtualKey":
            if configured is None:
                configured = dict(snapshot.resources)
            changed.setdefault(change.kind, set()).add(change.ident)
            # Deleting a stored resource uncovers the built-in one of the same name, if any.
            after = change.after or shipped.get(ident)
            if after is None:
                configured.pop(ident, None)
            else:
                configured[ident] = after
            continue
        if ident in shipped:
            return None
        if keys is None:
            keys = dict(snapshot.keys_by_hash)  # the old snapshot stays as it was for its requests
        if change.before is not None:
            old = keys.get(change.before.spec["keySha256"])
            if old is not None and old.name == change.ident:
                del keys[old.key_sha256]
        if change.after is not None:
            record = key_record(change.after)
            holder = keys.get(record.key_sha256)
            if holder is not None and holder.name != record.name:
                return None
            keys[record.key_sha256] = record
    if configured is not None:
        return _assemble(generation, snapshot.keys_by_hash if keys is None else keys,
                         configured, secret_lookup, index_factory, snapshot, changed)
    # Credentials are read again on every reload, as a full build does (a few file reads).
    return replace(snapshot, generation=generation,
                   keys_by_hash=snapshot.keys_by_hash if keys is None else keys,
                   secrets=_secrets(snapshot.upstreams, secret_lookup))
