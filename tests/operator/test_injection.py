"""Sidecar injection by the mutating admission webhook: the pure patch, the handler with real kopf
objects, and the JSON patch kopf would send for it."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from extproc.operator import handlers
from extproc.operator.injection import InvalidAnnotation, SidecarConfig, injection_patch

pytestmark = pytest.mark.unit
CFG = SidecarConfig(image="registry.example/tollgate:1.2.3", listener_port=10000)


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app-1", "namespace": "team-a", "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "app:1",
                                 "env": [{"name": "OPENAI_BASE_URL", "value": "http://own"}]}],
                 **spec},
    }


def merged(original: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(original)
    out["metadata"]["annotations"].update(change["metadata"]["annotations"])
    out["spec"].update(change["spec"])
    return out


def test_only_annotated_pods_get_sidecars() -> None:
    assert injection_patch(pod(), CFG) is None
    assert injection_patch(pod({"tollgate.io/inject": "false"}), CFG) is None
    assert injection_patch(pod({"tollgate.io/inject": "true"}), CFG) is not None


def sidecar_env(annotations: dict[str, str]) -> dict[str, str]:
    """The `tollgate` sidecar's environment for a pod with `annotations` (and inject)."""
    change = injection_patch(pod({"tollgate.io/inject": "true", **annotations}), CFG)
    assert change is not None
    tollgate = change["spec"]["initContainers"][0]
    return {e["name"]: e.get("value", "") for e in tollgate["env"]}


def test_stream_passthrough_is_asked_for_by_an_annotation() -> None:
    assert "TOLLGATE_STREAM_PASSTHROUGH" not in sidecar_env({})
    assert "TOLLGATE_STREAM_PASSTHROUGH" not in sidecar_env(
        {"tollgate.io/stream-passthrough": "false"})
    assert sidecar_env({"tollgate.io/stream-passthrough": "true"})[
        "TOLLGATE_STREAM_PASSTHROUGH"] == "true"


def test_busy_polling_is_asked_for_by_an_annotation() -> None:
    assert "TOLLGATE_BUSY_POLL_US" not in sidecar_env({})
    assert sidecar_env({"tollgate.io/busy-poll-us": "2000"})["TOLLGATE_BUSY_POLL_US"] == "2000"
    assert sidecar_env({"tollgate.io/busy-poll-us": " 0 "})["TOLLGATE_BUSY_POLL_US"] == "0"


@pytest.mark.parametrize("value", ["fast", "-5", "1.5", "10001", ""])
def test_a_busy_poll_annotation_the_sidecar_would_refuse_is_refused_at_admission(
    value: str,
) -> None:
    with pytest.raises(InvalidAnnotation, match=r"tollgate\.io/busy-poll-us"):
        injection_patch(pod({"tollgate.io/inject": "true",
                             "tollgate.io/busy-poll-us": value}), CFG)


async def test_the_handler_turns_an_invalid_annotation_into_a_denial_kubectl_shows() -> None:
    body = kopf.Body(pod({"tollgate.io/inject": "true",  # type: ignore[arg-type]
                          "tollgate.io/busy-poll-us": "lots"}))
    patch = kopf.Patch(body=body)
    with pytest.raises(kopf.AdmissionError) as denied:
        await handlers.inject_sidecars(body=body, patch=patch, memo=kopf.Memo(sidecars=CFG))
    assert denied.value.code == 400
    assert "'lots' is not a whole number of microseconds from 0 to 10000" in str(denied.value)
    assert not patch


def test_injected_pod_runs_both_sidecars_before_the_app() -> None:
    original = pod({"tollgate.io/inject": "true"},
                   initContainers=[{"name": "migrate", "image": "app:1"}],
                   volumes=[{"name": "data", "emptyDir": {}}])
    change = injection_patch(original, CFG)
    assert change is not None
    result = merged(original, change)
    init = result["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["tollgate", "envoy", "migrate"]
    for sidecar in init[:2]:
        assert sidecar["restartPolicy"] == "Always"  # native sidecar: lives as long as the pod
        assert sidecar["image"] == "registry.example/tollgate:1.2.3"
        assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert init[0]["command"] == ["tollgate", "serve"]
    assert init[1]["command"][0] == "envoy"
    assert init[1]["ports"][0]["containerPort"] == 10000
    # every mount resolves to a volume of the pod, the app's own volume kept
    volumes = {v["name"] for v in result["spec"]["volumes"]}
    assert "data" in volumes
    for sidecar in init[:2]:
        for mount in sidecar["volumeMounts"]:
            assert mount["name"] in volumes
    # the app's SDKs find the sidecar; a base URL the pod set itself is kept
    env = {e["name"]: e["value"] for e in result["spec"]["containers"][0]["env"]}
    assert env == {"OPENAI_BASE_URL": "http://own",
                   "ANTHROPIC_BASE_URL": "http://127.0.0.1:10000"}
    assert result["metadata"]["annotations"]["tollgate.io/injected"] == "true"
    # admission can run twice for one pod: the second time changes nothing
    assert injection_patch(result, CFG) is None


async def test_handler_fills_kopfs_patch_and_kopf_turns_it_into_additions() -> None:
    original = pod({"tollgate.io/inject": "true"})
    body = kopf.Body(original)  # type: ignore[arg-type]
    patch = kopf.Patch(body=body)
    await handlers.inject_sidecars(body=body, patch=patch, memo=kopf.Memo(sidecars=CFG))
    ops = patch.as_json_patch()
    paths = {op["path"] for op in ops}
    assert "/spec/initContainers" in paths and "/spec/volumes" in paths
    assert all(op["op"] in ("add", "replace") for op in ops)
    assert all(p.startswith(("/spec/", "/metadata/annotations")) for p in paths)
    untouched = kopf.Patch(body=kopf.Body(pod()))  # type: ignore[arg-type]
    await handlers.inject_sidecars(body=kopf.Body(pod()), patch=untouched,  # type: ignore[arg-type]
                                   memo=kopf.Memo(sidecars=CFG))
    assert not untouched


def test_webhook_is_registered_only_when_configured() -> None:
    from extproc.operator.app import OperatorConfig, WebhookConfig, build_registry

    plain = build_registry(OperatorConfig(redis_url="redis://127.0.0.1:6379/0"), lambda: None)
    assert not plain._webhooks.get_all_handlers()
    hooked = build_registry(OperatorConfig(
        redis_url="redis://127.0.0.1:6379/0",
        webhook=WebhookConfig(port=9443, host="tollgate-operator.tollgate-system.svc",
                              certfile="tls.crt", keyfile="tls.key")), lambda: None)
    (handler,) = hooked._webhooks.get_all_handlers()
    assert handler.fn is handlers.inject_sidecars
    assert set(handler.operations or ()) == {"CREATE"}
    assert handler.ignore_failures  # pods still start while no operator answers
