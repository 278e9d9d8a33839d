"""Wiring: which kinds kopf watches, the Redis lease, and `tollgate operator`'s main loop.

One writer at a time: kopf runs standalone (no peering CRDs), and a startup handler blocks
until this replica holds a lease in the same Redis it writes to (`extproc.store.lease`). A
background task renews it; if it is lost, the operator stops with exit status 1 and Kubernetes
restarts it, where it waits for the lease again. Handlers also refuse to write without the
lease, which covers the moment between losing it and stopping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from extproc.core.resources import GROUP, KINDS, PLURALS
from extproc.operator import handlers
from extproc.operator.handlers import known_clusters_setting
from extproc.operator.injection import INJECT_ANNOTATION, SidecarConfig
from extproc.store.lease import RedisLease
from extproc.store.redis_store import Store, ready

VERSION = "v1alpha1"
FINALIZER = "tollgate.io/finalizer"
STATUS_INTERVAL_S = 5.0
LEASE_TTL_S = 15.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    redis_url: str
    redis_tag: str = "llm"
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    lease_ttl_s: float = LEASE_TTL_S
    status_interval_s: float = STATUS_INTERVAL_S
    webhook: WebhookConfig | None = None  # sidecar injection, off unless configured
    # kopf's health endpoint, http://0.0.0.0:<port>/healthz; 0 = none. It answers only once
    # startup is done, i.e. on the lease holder: a readiness probe on it keeps standby replicas
    # out of a Service (the webhook's), and must not be a liveness probe (standbys wait).
    health_port: int = 8080


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """The mutating admission webhook's HTTPS server. kopf keeps the
    MutatingWebhookConfiguration `tollgate.io` pointing at https://<host>:<port>."""

    port: int
    host: str  # the name the API server reaches this server by (its Service DNS name)
    certfile: str
    keyfile: str
    sidecars: SidecarConfig = field(default_factory=SidecarConfig)


def build_registry(config: OperatorConfig, on_lost: Callable[[], None]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    for kind in KINDS:
        plural = PLURALS[kind]
        kopf.on.create(GROUP, VERSION, plural, registry=registry,
                       id=f"store-{plural}")(handlers.on_change)
        kopf.on.resume(GROUP, VERSION, plural, registry=registry,
                       id=f"store-{plural}")(handlers.on_change)
        # Only spec changes: the operator's own status patches must not re-trigger a write.
        kopf.on.update(GROUP, VERSION, plural, field="spec", registry=registry,
                       id=f"store-{plural}")(handlers.on_change)
        kopf.on.delete(GROUP, VERSION, plural, registry=registry,
                       id=f"remove-{plural}")(handlers.on_delete)
        kopf.timer(GROUP, VERSION, plural, interval=config.status_interval_s, registry=registry,
                   id=f"status-{plural}")(handlers.sync_status)

    if config.webhook is not None:
        # failurePolicy Ignore: while no operator replica answers, pods start without sidecars
        # rather than not at all.
        kopf.on.mutate("v1", "pods", annotations={INJECT_ANNOTATION: "true"},
                       operations={"CREATE"}, ignore_failures=True, id="inject-sidecars",
                       registry=registry)(handlers.inject_sidecars)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo,
                      logger: logging.Logger | kopf.Logger, **_: Any) -> None:
        settings.peering.standalone = True
        settings.persistence.finalizer = FINALIZER
        # Progress in annotations only: `status` belongs to what users read.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="tollgate.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="tollgate.io", key="last-handled-configuration")
        if config.webhook is not None:
            hook = config.webhook
            settings.admission.server = kopf.WebhookServer(
                addr="0.0.0.0", port=hook.port, host=hook.host, certfile=hook.certfile,
                pkeyfile=hook.keyfile)
            settings.admission.managed = "tollgate.io"
            memo.sidecars = hook.sidecars
        store = Store.from_url(config.redis_url, tag=config.redis_tag, timeout_s=5)
        await ready(store.redis)
        holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        lease = RedisLease(store.redis, store.keys.operator_lease, holder, config.lease_ttl_s)
        logger.info("waiting for the operator lease %s as %s", lease.key, holder)
        await lease.acquire()
        logger.info("holding the operator lease: this replica writes")
        memo.store, memo.lease = store, lease
        memo.known_clusters = known_clusters_setting(os.environ)
        memo.keeper = asyncio.create_task(lease.keep(on_lost=on_lost))
        try:
            from extproc.operator.secrets import SecretApi

            memo.secrets = await SecretApi.connect()
        except Exception as exc:  # no cluster config: generated keys wait (TemporaryError)
            logger.error("no Kubernetes client for Secrets: %s", exc)
            memo.secrets = None

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        keeper = getattr(memo, "keeper", None)
        if keeper is not None:
            keeper.cancel()
        if getattr(memo, "lease", None) is not None:
            await memo.lease.release()
        if getattr(memo, "secrets", None) is not None:
            await memo.secrets.close()
        if getattr(memo, "store", None) is not None:
            await memo.store.close()

    return registry


def run(config: OperatorConfig) -> int:  # pragma: no cover - needs a Kubernetes API server
    """Run until SIGTERM (0) or until the lease is lost (1)."""
    lost: list[bool] = []

    def on_lost() -> None:
        # Stop the way Kubernetes does: kopf handles SIGTERM gracefully (cleanup releases
        # nothing that is not ours). A stop flag would be waited for in an executor thread,
        # which keeps the process alive when kopf stops for another reason.
        lost.append(True)
        os.kill(os.getpid(), signal.SIGTERM)

    registry = build_registry(config, on_lost)
    kopf.configure(verbose=False)
    try:
        kopf.run(
            registry=registry,
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            memo=kopf.Memo(),
            liveness_endpoint=(f"http://0.0.0.0:{config.health_port}/healthz"
                               if config.health_port else None),
        )
    except kopf.LoginError as exc:
        log.error("cannot log in to the Kubernetes API (no in-cluster service account or "
                  "kubeconfig): %s", exc)
        return 1
    if lost:
        log.error("lost the operator lease: stopping so that Kubernetes restarts this replica")
        return 1
    return 0
