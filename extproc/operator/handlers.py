"""kopf handlers: thin. Body -> the validator `tollgate apply` uses -> the store write `apply`
uses (same generation bump, same reload notice for the sidecars); live state -> `status`.

Errors say whether retrying helps: Redis unreachable or the lease not held is a
`kopf.TemporaryError` (retried after a delay); an invalid resource is a `kopf.PermanentError`
(retried only when the resource changes) and its `Accepted` condition carries the validator's
message. An invalid resource writes nothing: the last accepted version stays in force.

Every handler takes what it needs from `memo` (set up by `extproc.operator.app`): `store`
(`Store`), `lease` (`RedisLease`, held by this replica) and, for generated virtual keys,
`secrets` (`SecretApi`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from extproc.checks import cluster_warnings
from extproc.core.keys import generate_key, hash_key
from extproc.core.quota import WINDOW_MS
from extproc.core.resources import (
    Resource,
    ResourceError,
    rate_limit_spec,
    resource_id,
    validate_document,
)
from extproc.operator.injection import InvalidAnnotation, injection_patch
from extproc.operator.secrets import (
    ForeignSecret,
    default_secret_name,
    key_from_secret,
    key_secret_body,
)
from extproc.operator.status import (
    accepted_condition,
    document_of,
    key_state,
    rfc3339,
    status_patch,
)
from extproc.store.live_state import cooldowns, limit_reports, policy_hits, rate_usage
from extproc.store.redis_store import Store, StoreUnavailable

RETRY_DELAY_S = 5.0
_PLACEHOLDER_SHA = "0" * 64


def _now() -> datetime:
    return datetime.now(UTC)


def _writer(memo: Any) -> Store:
    """The store, once this replica may write: only the lease holder does."""
    if not memo.lease.held:
        raise kopf.TemporaryError("this replica does not hold the operator lease",
                                  delay=RETRY_DELAY_S)
    store: Store = memo.store
    return store


def _ident(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return str(body.get("kind")), resource_id(meta.get("namespace") or "default",
                                              str(meta.get("name")))


def known_clusters_setting(env: Mapping[str, str]) -> set[str] | None:
    """The Envoy cluster names Upstreams may use: the generated configuration's (providers and
    `TOLLGATE_ENVOY_CLUSTERS`), or None (no check) with `TOLLGATE_ALLOW_UNKNOWN_CLUSTERS=true`.
    A malformed TOLLGATE_ENVOY_CLUSTERS stops the operator at startup, saying why."""
    from extproc import envoyconf

    if env.get("TOLLGATE_ALLOW_UNKNOWN_CLUSTERS", "").strip().lower() in ("1", "true", "yes"):
        return None
    return envoyconf.known_clusters(env.get(envoyconf.CLUSTERS_ENV, ""))


def _reject(patch: kopf.Patch, body: Mapping[str, Any], message: str,
            reason: str = "Invalid") -> kopf.PermanentError:
    generation = (body.get("metadata") or {}).get("generation")
    patch.status["conditions"] = [accepted_condition(False, reason, message, generation,
                                                     _now())]
    return kopf.PermanentError(message)


async def _generated_key_hash(body: Mapping[str, Any], doc: dict[str, Any], memo: Any) -> str:
    """The SHA-256 of this VirtualKey's key, from its Secret (made now if missing)."""
    meta = body.get("metadata") or {}
    name, namespace = str(meta.get("name")), str(meta.get("namespace") or "default")
    secret_name = doc["spec"].get("secretName") or default_secret_name(name)
    secrets = getattr(memo, "secrets", None)
    if secrets is None:
        raise kopf.TemporaryError("no Kubernetes API client for Secrets yet", delay=RETRY_DELAY_S)
    try:
        key = key_from_secret(await secrets.read(namespace, secret_name), name)
    except ForeignSecret as exc:
        raise kopf.PermanentError(str(exc)) from None
    if key is None:
        key = generate_key()
        await secrets.write(key_secret_body(secret_name=secret_name, namespace=namespace,
                                            key=key, owner=body))
    doc["spec"]["secretName"] = secret_name
    return hash_key(key)


async def on_change(
    body: kopf.Body, patch: kopf.Patch, logger: logging.Logger | kopf.Logger, memo: Any,
    **_: Any,
) -> None:
    """Create, update and resume: validate, then store exactly as `tollgate apply` does."""
    store = _writer(memo)
    doc = document_of(body)
    generates_key = doc["kind"] == "VirtualKey" and not doc["spec"].get("keySha256")
    if generates_key:
        # Validate everything else before a Secret is made for it.
        doc["spec"]["keySha256"] = _PLACEHOLDER_SHA
    try:
        resource = validate_document(doc, "custom resource", doc["metadata"]["namespace"])
    except ResourceError as exc:
        raise _reject(patch, body, str(exc)) from None
    # The clusters the gateways' generated Envoy configuration defines (set at startup from
    # TOLLGATE_ENVOY_CLUSTERS; None: TOLLGATE_ALLOW_UNKNOWN_CLUSTERS, an Envoy config of one's
    # own). An Upstream naming another would only ever get Envoy's bare 503.
    known = getattr(memo, "known_clusters", None)
    if resource.kind == "Upstream" and known is not None:
        problems = cluster_warnings([resource], known)
        if problems:
            raise _reject(patch, body, problems[0], "UnknownCluster") from None
    if generates_key:
        try:
            doc["spec"]["keySha256"] = await _generated_key_hash(body, doc, memo)
        except kopf.PermanentError as exc:
            raise _reject(patch, body, str(exc)) from None
        resource = validate_document(doc, "custom resource", resource.namespace)
    try:
        if await store.get(resource.kind, resource.id) == resource:
            # Unchanged (typically every resource on resume after a restart): no generation
            # bump, so the gateways do not reload once per resource.
            generation = await store.generation()
        else:
            generation = await store.apply([resource])
            logger.info("stored %s/%s (configuration generation %d)", resource.kind,
                        resource.id, generation)
    except StoreUnavailable as exc:
        raise kopf.TemporaryError(f"Redis unreachable: {exc}", delay=RETRY_DELAY_S) from None
    patch.status["conditions"] = [accepted_condition(
        True, "Stored", f"stored in Redis as {resource.kind}/{resource.id} (configuration "
        f"generation {generation})", (body.get("metadata") or {}).get("generation"), _now())]
    patch.status["id"] = resource.id
    if resource.kind == "VirtualKey":
        patch.status["secretName"] = resource.spec.get("secretName")


async def on_delete(body: kopf.Body, logger: logging.Logger | kopf.Logger, memo: Any,
                    **_: Any) -> None:
    """The finalizer: remove the resource from Redis before Kubernetes forgets it."""
    store = _writer(memo)
    kind, ident = _ident(body)
    try:
        removed = await store.delete(kind, ident)
    except StoreUnavailable as exc:
        raise kopf.TemporaryError(f"Redis unreachable: {exc}", delay=RETRY_DELAY_S) from None
    logger.info("%s %s/%s from Redis", "removed" if removed else "nothing to remove for",
                kind, ident)


# ---- status write-back ---------------------------------------------------------------------


async def _stored(memo: Any, body: Mapping[str, Any]) -> Resource | None:
    kind, ident = _ident(body)
    store: Store = memo.store
    return await store.get(kind, ident)


def _send(patch: kopf.Patch, body: Mapping[str, Any], live: dict[str, Any]) -> None:
    fields = status_patch(body.get("status"), live, _now())
    if fields is not None:
        patch.status.update(fields)


async def sync_status(body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    """Timer: the live state of the version in force (the stored one) into `status`, sent only
    when it changed (or as a heartbeat)."""
    try:
        resource = await _stored(memo, body)
        if resource is None:
            return  # not accepted (yet): the Accepted condition says why
        live = await live_status(memo.store, resource)
    except StoreUnavailable:
        return  # the next tick tries again; a stale status is better than a wrong one
    _send(patch, body, live)


async def live_status(store: Store, resource: Resource) -> dict[str, Any]:
    """The status fields for one stored resource, read through `extproc.store.live_state`."""
    now = _now()
    if resource.kind == "Limit":
        return (await limit_reports(store, [resource], now.timestamp()))[0].status()
    if resource.kind == "RateLimit":
        spec = rate_limit_spec(resource)
        usage = await rate_usage(store, resource.id, int(now.timestamp() * 1000),
                                 spec.window_ms)
        counts = ({"requestsLastMinute": usage.requests, "tokensLastMinute": usage.tokens}
                  if spec.window_ms == WINDOW_MS else {})
        return {"identities": usage.identities, "busiest": usage.busiest or None,
                "window": resource.spec.get("window") or "1m",
                "requestsInWindow": usage.requests, "tokensInWindow": usage.tokens,
                **counts, "inFlight": usage.in_flight}
    if resource.kind == "Upstream":
        resting = await cooldowns(store, resource.id, int(now.timestamp() * 1000))
        return {"coolingDown": [
            {"credential": c.credential, "model": c.model,
             "until": rfc3339(datetime.fromtimestamp(c.until_ms / 1000, UTC))}
            for c in resting]}
    if resource.kind == "VirtualKey":
        return {"state": key_state(resource.spec, now),
                "expiresAt": resource.spec.get("expiresAt")}
    if resource.kind == "PriceTable":
        return {"models": len(resource.spec["models"])}
    if resource.kind == "Policy":
        (hits,) = await policy_hits(store, [resource.id], now.timestamp())
        return {"blocked": hits.get("block", 0), "redacted": hits.get("redact", 0),
                "audited": hits.get("audit", 0),
                "rules": {k: v for k, v in sorted(hits.items()) if ":" in k}}
    return {}



# ---- sidecar injection (mutating admission webhook) -----------------------------------------


async def inject_sidecars(body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    """Pods annotated `tollgate.io/inject: "true"` get the two sidecars and the base URLs."""
    try:
        change = injection_patch(body, memo.sidecars)
    except InvalidAnnotation as exc:
        raise kopf.AdmissionError(str(exc), code=400) from None
    if change is not None:
        for name, value in change.items():
            patch[name] = value
