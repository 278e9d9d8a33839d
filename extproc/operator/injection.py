"""Sidecar injection: what the mutating admission webhook adds to a pod annotated
`tollgate.io/inject: "true"` (the way service-mesh users expect a sidecar to arrive).

Two native sidecars (init containers with `restartPolicy: Always`, Kubernetes >= 1.29), the same
shape as `deploy/k8s/overlays/sidecar/app.yaml`: `tollgate serve` (the ext_proc server) and
Envoy (from the same image), started before the app and stopped after it; their volumes; and in
each app container, the SDKs' base-URL variables pointing at the local Envoy listener unless the
pod sets them. Pure: pod in, the changed parts of the pod out.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.busypoll import MAX_WINDOW_US, window_us

INJECT_ANNOTATION = "tollgate.io/inject"
INJECTED_ANNOTATION = "tollgate.io/injected"
# Opt-in passthrough streams for this pod's calls (README, "Passthrough streams"): the
# sidecar's TOLLGATE_STREAM_PASSTHROUGH. The injected Envoy bootstrap has the observer filter.
PASSTHROUGH_ANNOTATION = "tollgate.io/stream-passthrough"
# Opt-in busy polling for this pod's sidecar (docs/performance.md, "Busy polling"): the
# sidecar's TOLLGATE_BUSY_POLL_US, microseconds. A value the sidecar would refuse is refused
# here, at admission, where `kubectl` shows why, rather than by a sidecar that never starts.
BUSY_POLL_ANNOTATION = "tollgate.io/busy-poll-us"
SIDECARS = ("tollgate", "envoy")


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    image: str = "tollgate:0.1.0"
    envoy_configmap: str = "tollgate-envoy"  # holds envoy.yaml (from `tollgate envoy-config`)
    redis_secret: str = "tollgate-redis"  # key REDIS_URL
    provider_keys_secret: str = "tollgate-provider-keys"  # one file per secretRef
    listener_port: int = 10000
    metrics_port: int = 9464


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def _annotated(pod: Mapping[str, Any], name: str) -> bool:
    """The pod carries the annotation `name: "true"`."""
    return str(_annotations(pod).get(name, "")).lower() == "true"


def wants_injection(pod: Mapping[str, Any]) -> bool:
    return _annotated(pod, INJECT_ANNOTATION)


class InvalidAnnotation(ValueError):
    """A pod annotation the sidecar could not run with (the message says which and why)."""


def _busy_poll_us(pod: Mapping[str, Any]) -> str | None:
    raw = _annotations(pod).get(BUSY_POLL_ANNOTATION)
    if raw is None:
        return None
    try:  # the sidecar's own rule for TOLLGATE_BUSY_POLL_US
        return str(window_us(str(raw)))
    except ValueError:
        raise InvalidAnnotation(
            f"annotation {BUSY_POLL_ANNOTATION}: {raw!r} is not a whole number of "
            f"microseconds from 0 to {MAX_WINDOW_US}") from None


def _sidecars(cfg: SidecarConfig, passthrough: bool = False,
              busy_poll_us: str | None = None) -> list[dict[str, Any]]:
    locked_down = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                   "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    return [
        {
            "name": "tollgate",
            "image": cfg.image,
            "restartPolicy": "Always",
            "command": ["tollgate", "serve"],
            "env": [
                {"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {
                    "name": cfg.redis_secret, "key": "REDIS_URL"}}},
                {"name": "TOLLGATE_HTTP_HOST", "value": "0.0.0.0"},
                {"name": "TOLLGATE_HTTP_PORT", "value": str(cfg.metrics_port)},
                {"name": "TOLLGATE_SECRETS_DIR", "value": "/var/run/secrets/tollgate"},
                *([{"name": "TOLLGATE_STREAM_PASSTHROUGH", "value": "true"}]
                  if passthrough else []),
                *([{"name": "TOLLGATE_BUSY_POLL_US", "value": busy_poll_us}]
                  if busy_poll_us is not None else []),
            ],
            "ports": [{"name": "http-metrics", "containerPort": cfg.metrics_port,
                       "protocol": "TCP"}],
            "volumeMounts": [
                {"name": "tollgate-provider-keys", "mountPath": "/var/run/secrets/tollgate",
                 "readOnly": True},
                {"name": "tollgate-tmp", "mountPath": "/tmp"},
            ],
            "startupProbe": {"httpGet": {"path": "/readyz", "port": cfg.metrics_port},
                             "periodSeconds": 2, "failureThreshold": 60},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": cfg.metrics_port},
                               "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": cfg.metrics_port},
                              "periodSeconds": 10},
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"},
                          "limits": {"memory": "512Mi"}},
            "securityContext": {**locked_down, "runAsUser": 65532},
        },
        {
            "name": "envoy",
            "image": cfg.image,
            "restartPolicy": "Always",
            "command": ["envoy", "-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart"],
            "ports": [{"name": "tollgate-http", "containerPort": cfg.listener_port,
                       "protocol": "TCP"}],
            "volumeMounts": [{"name": "tollgate-envoy-config", "mountPath": "/etc/envoy",
                              "readOnly": True}],
            "startupProbe": {"tcpSocket": {"port": cfg.listener_port}, "periodSeconds": 1,
                             "failureThreshold": 30},
            "readinessProbe": {"tcpSocket": {"port": cfg.listener_port}, "periodSeconds": 5},
            "resources": {"requests": {"cpu": "250m", "memory": "128Mi"},
                          "limits": {"memory": "512Mi"}},
            "securityContext": {**locked_down, "runAsUser": 65532},
        },
    ]


def _volumes(cfg: SidecarConfig) -> list[dict[str, Any]]:
    return [
        {"name": "tollgate-envoy-config", "configMap": {
            "name": cfg.envoy_configmap, "items": [{"key": "envoy.yaml", "path": "envoy.yaml"}]}},
        {"name": "tollgate-provider-keys", "secret": {
            "secretName": cfg.provider_keys_secret, "defaultMode": 0o440}},
        {"name": "tollgate-tmp", "emptyDir": {}},
    ]


def injection_patch(pod: Mapping[str, Any], cfg: SidecarConfig) -> dict[str, Any] | None:
    """The parts of `pod` to replace (a merge patch: annotations, spec.initContainers,
    spec.volumes, spec.containers), or None when the pod did not ask or already has them
    (admission may run twice for one pod)."""
    if not wants_injection(pod):
        return None
    busy_poll_us = _busy_poll_us(pod)  # first: an invalid annotation refuses the pod as is
    spec = pod.get("spec") or {}
    init = list(spec.get("initContainers") or [])
    if any(c.get("name") in SIDECARS for c in init + list(spec.get("containers") or [])):
        return None
    base_urls = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{cfg.listener_port}/v1",
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{cfg.listener_port}",
    }
    containers = []
    for container in spec.get("containers") or []:
        changed = copy.deepcopy(dict(container))
        env = list(changed.get("env") or [])
        present = {e.get("name") for e in env}
        env += [{"name": n, "value": v} for n, v in base_urls.items() if n not in present]
        changed["env"] = env
        containers.append(changed)
    # Sidecars first: native sidecars start in order, before any later init container.
    return {
        "metadata": {"annotations": {INJECTED_ANNOTATION: "true"}},
        "spec": {
            "initContainers": _sidecars(cfg, _annotated(pod, PASSTHROUGH_ANNOTATION),
                                        busy_poll_us) + init,
            "volumes": list(spec.get("volumes") or []) + _volumes(cfg),
            "containers": containers,
        },
    }
