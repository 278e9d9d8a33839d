"""Virtual keys made by the operator, delivered in a Kubernetes Secret.

The key is generated here and written only into the Secret (key `api-key`); Redis and the custom
resource hold its SHA-256 only. The Secret is the source of truth for the key: a handler that
runs again (update, resume, retry after a Redis outage) finds the Secret and reuses its key, so
applications never see a key change they did not ask for. Deleting the Secret rotates the key.
The Secret is owned by the VirtualKey (ownerReferences), so Kubernetes deletes it with the CR.

`key_secret_body` and `key_from_secret` are pure; `SecretApi` is the only code that calls the
Kubernetes API, which only a real cluster can exercise.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

SECRET_KEY_FIELD = "api-key"
MANAGED_BY = ("app.kubernetes.io/managed-by", "tollgate-operator")
KEY_ANNOTATION = "tollgate.io/virtual-key"


def default_secret_name(key_name: str) -> str:
    return f"{key_name}-tollgate-key"


def key_secret_body(
    *, secret_name: str, namespace: str, key: str, owner: Mapping[str, Any]
) -> dict[str, Any]:
    """The Secret holding a generated key; `owner` is the VirtualKey object (apiVersion, kind,
    metadata.name, metadata.uid)."""
    meta = owner.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": namespace,
            "labels": {MANAGED_BY[0]: MANAGED_BY[1]},
            "annotations": {KEY_ANNOTATION: str(meta.get("name", ""))},
            "ownerReferences": [{
                "apiVersion": owner.get("apiVersion"),
                "kind": owner.get("kind"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "data": {SECRET_KEY_FIELD: base64.b64encode(key.encode()).decode()},
    }


class ForeignSecret(Exception):
    """A Secret of that name exists and was not made by the operator: it is never overwritten."""


def key_from_secret(secret: Mapping[str, Any] | None, key_name: str) -> str | None:
    """The key stored in a Secret the operator made for this VirtualKey; None when there is no
    Secret (or it lost its key, e.g. edited by hand: a new key is issued). Raises
    `ForeignSecret` for somebody else's Secret."""
    if secret is None:
        return None
    meta = secret.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if labels.get(MANAGED_BY[0]) != MANAGED_BY[1] or annotations.get(KEY_ANNOTATION) != key_name:
        raise ForeignSecret(
            f"Secret {meta.get('name')!r} exists and is not the one the operator made for "
            f"VirtualKey {key_name!r}; choose another spec.secretName or delete it"
        )
    raw = (secret.get("data") or {}).get(SECRET_KEY_FIELD)
    if not raw:
        return None
    try:
        return base64.b64decode(raw).decode()
    except ValueError:
        return None


class SecretApi:  # pragma: no cover - needs a Kubernetes API server
    """Reads and writes Secrets through the official async Kubernetes client."""

    def __init__(self, api: Any, client: Any) -> None:
        self._api = api
        self._client = client

    @classmethod
    async def connect(cls) -> SecretApi:
        from kubernetes_asyncio import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            await config.load_kube_config()
        api_client = client.ApiClient()
        return cls(client.CoreV1Api(api_client), api_client)

    async def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            secret = await self._api.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        result: dict[str, Any] = self._client.sanitize_for_serialization(secret)
        return result

    async def write(self, body: dict[str, Any]) -> None:
        """Create the Secret, or replace the operator's own one (a key was lost from it)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self._api.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            await self._api.replace_namespaced_secret(name, namespace, body)

    async def close(self) -> None:
        await self._client.close()
