"""Operator tests reuse the end-to-end stack (real Redis, fake upstream, extproc, real Envoy) and
call the kopf handlers with real kopf objects against that stack's Redis."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest

from extproc.store.lease import RedisLease
from extproc.store.redis_store import Store
from tests.e2e.conftest import (  # noqa: F401  (fixtures)
    cli,
    e2e_env,
    new_key,
    new_named_key,
    second_upstream,
    stack,
)


@pytest.fixture
async def memo(redis_url: str, e2e_env: dict[str, str]) -> AsyncIterator[kopf.Memo]:  # noqa: F811
    """What the operator's startup handler puts in kopf's memo: the store and a held lease."""
    store = Store.from_url(redis_url, tag=e2e_env["TOLLGATE_REDIS_TAG"], timeout_s=2)
    lease = RedisLease(store.redis, store.keys.operator_lease, "test-" + uuid.uuid4().hex[:6],
                       ttl_s=30)
    assert await lease.acquire(poll_s=0.1, timeout_s=40)
    try:
        yield kopf.Memo(store=store, lease=lease, secrets=None)
    finally:
        await lease.release()
        await store.close()


@pytest.fixture
def logger() -> logging.Logger:
    return logging.getLogger("tollgate.operator.test")


def custom_resource(kind: str, namespace: str, name: str, spec: dict[str, Any],
                    generation: int = 1, status: dict[str, Any] | None = None) -> kopf.Body:
    raw: dict[str, Any] = {
        "apiVersion": "tollgate.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                     "generation": generation, "resourceVersion": str(generation),
                     "finalizers": ["tollgate.io/finalizer"],
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": spec,
    }
    if status is not None:
        raw["status"] = status
    return kopf.Body(raw)  # type: ignore[arg-type]


def namespace() -> str:
    return "ns-" + uuid.uuid4().hex[:8]
