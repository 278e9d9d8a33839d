"""What the operator writes into a custom resource: the document it validates, its conditions,
and when a live-status patch is worth sending. Pure functions (no kopf, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from extproc.core.resources import API_VERSION, DEFAULT_NAMESPACE

# A status that did not change is still re-sent this often, so `lastSynced` shows the operator
# is alive; in between, only changes are sent (a busy limit must not flood the API server).
HEARTBEAT_S = 60.0


def document_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The resource document inside a Kubernetes object: apiVersion, kind, name, namespace and
    spec. Bookkeeping (uid, managedFields, kopf's annotations, status) is left out, so the
    validator sees exactly what `tollgate apply` would."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"),
                     "namespace": meta.get("namespace") or DEFAULT_NAMESPACE},
        "spec": dict(body.get("spec") or {}),
    }


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def accepted_condition(
    accepted: bool, reason: str, message: str, generation: int | None, now: datetime
) -> dict[str, Any]:
    """The `Accepted` condition, in the shape of Kubernetes' metav1.Condition."""
    condition: dict[str, Any] = {
        "type": "Accepted",
        "status": "True" if accepted else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": rfc3339(now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def status_patch(
    current: Mapping[str, Any] | None, live: Mapping[str, Any], now: datetime,
    heartbeat_s: float = HEARTBEAT_S,
) -> dict[str, Any] | None:
    """The status fields to send, or None when nothing changed and the last sync is recent."""
    current = current or {}
    changed = any(current.get(name) != value for name, value in live.items())
    if not changed:
        last = current.get("lastSynced")
        try:
            age = (now - datetime.fromisoformat(str(last).replace("Z", "+00:00"))).total_seconds()
        except ValueError:
            age = heartbeat_s
        if age < heartbeat_s:
            return None
    return {**live, "lastSynced": rfc3339(now)}


def key_state(spec: Mapping[str, Any], now: datetime) -> str:
    """active / revoked / expired, as the gateway decides it."""
    if spec.get("revoked"):
        return "revoked"
    expires = spec.get("expiresAt")
    if expires and datetime.fromisoformat(str(expires).replace("Z", "+00:00")) <= now:
        return "expired"
    return "active"
