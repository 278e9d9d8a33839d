"""deploy/k8s renders, validates offline, and agrees with the code.

* `kubectl kustomize` renders the root and every overlay;
* every rendered object passes the Kubernetes schemas in strict mode (`kubernetes-validate`),
  custom resources (and the examples) pass their CRD's openAPIV3Schema (`jsonschema`);
* the Envoy bootstraps the overlays turn into ConfigMaps are exactly what the generator makes
  (scripts/gen-k8s-envoy.sh reruns into a temporary directory);
* ports, probes, mounts and images line up between the containers, the settings and the
  generated Envoy bootstraps.

What only a real cluster shows (scheduling, the kubelet's probes, Secret volume updates) is in
deploy/k8s/README.md; the sidecar pod itself runs under podman in tests/k8s/test_sidecar_pod.py.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.settings import Settings

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TREES = {
    "root": K8S,
    "sidecar": K8S / "overlays" / "sidecar",
    "gateway": K8S / "overlays" / "gateway",
    "gateway-mtls": K8S / "overlays" / "gateway-mtls",
}
GROUP = "tollgate.io"
# The newest Kubernetes schema kubernetes-validate ships that the manifests target (native
# sidecars need >= 1.29).
K8S_VERSION = "1.32.0"


def _version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise AssertionError("no version in pyproject.toml")


IMAGE = f"tollgate:{_version()}"


@cache
def render(tree: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: it renders deploy/k8s (`kubectl kustomize`)")
    out = subprocess.run([kubectl, "kustomize", str(TREES[tree])], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, f"kubectl kustomize {TREES[tree]} failed:\n{out.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    assert docs
    return docs


def objects(tree: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in render(tree) if d["kind"] == kind}


def crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for crd in objects("root", "CustomResourceDefinition").values():
        (version,) = crd["spec"]["versions"]
        kind = crd["spec"]["names"]["kind"]
        schemas[kind] = version["schema"]["openAPIV3Schema"]
    return schemas


def closed(schema: Any) -> Any:
    """The schema as the API server applies it with strict field validation (kubectl's default):
    a field not in `properties` is an error unless the schema preserves unknown fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].split("/")[0] == GROUP:
        # CRD schemas are OpenAPI 3.0: JSON Schema draft 4 semantics (boolean exclusiveMinimum).
        jsonschema.Draft4Validator(closed(crd_schemas()[doc["kind"]])).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def config_map_data(
    tree: str, workload: dict[str, Any], container: str, mount: str
) -> dict[str, str]:
    """The files a container sees under `mount`, from the ConfigMap volume mounted there."""
    (volume_mount,) = [m for m in pod_containers(workload)[container]["volumeMounts"]
                       if m["mountPath"] == mount]
    spec = workload["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == volume_mount["name"]]
    data: dict[str, str] = objects(tree, "ConfigMap")[volume["configMap"]["name"]]["data"]
    return data


def envoy_bootstrap(tree: str, workload: dict[str, Any]) -> dict[str, Any]:
    envoy = pod_containers(workload)["envoy"]
    config_path = envoy["args"][envoy["args"].index("-c") + 1]
    directory, _, name = config_path.rpartition("/")
    files = config_map_data(tree, workload, "envoy", directory)
    bootstrap: dict[str, Any] = yaml.safe_load(files[name])
    return bootstrap


def main_listener(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listeners = bootstrap["static_resources"]["listeners"]
    (listener,) = [li for li in listeners if li["name"] == "tollgate"]
    return listener


# ---- rendering and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_renders_and_every_object_validates_strictly(tree: str) -> None:
    for doc in render(tree):
        validate(doc)


def test_the_example_resources_validate_against_their_crds() -> None:
    docs = [d for d in yaml.safe_load_all((K8S / "examples" / "resources.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} >= {"VirtualKey", "Limit", "RateLimit", "Upstream"}
    for doc in docs:
        validate(doc)


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above is not vacuous: a typo in a Deployment or a CR is an error."""
    (operator,) = objects("root", "Deployment").values()
    broken = yaml.safe_load(yaml.safe_dump(operator))
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    limit = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Limit", "metadata": {"name": "x"},
             "spec": {"type": "Block", "max": 1, "maxx": 2}}
    with pytest.raises(jsonschema.ValidationError):
        validate(limit)


def test_root_holds_crds_operator_and_redis() -> None:
    docs = render("root")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Namespace", "tollgate-system") in kinds
    assert ("StatefulSet", "tollgate-redis") in kinds and ("Service", "tollgate-redis") in kinds
    assert ("Deployment", "tollgate-operator") in kinds
    assert ("PodDisruptionBudget", "tollgate-operator") in kinds
    for doc in docs:  # everything namespaced lands in tollgate-system
        if doc["kind"] not in {"Namespace", "CustomResourceDefinition", "ClusterRole",
                               "ClusterRoleBinding"}:
            assert doc["metadata"]["namespace"] == "tollgate-system", doc["metadata"]
    (operator,) = objects("root", "Deployment").values()
    account = operator["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in objects("root", "ServiceAccount")
    (binding,) = objects("root", "ClusterRoleBinding").values()
    subject = {"kind": "ServiceAccount", "name": account, "namespace": "tollgate-system"}
    assert subject in binding["subjects"]
    redis = objects("root", "StatefulSet")["tollgate-redis"]
    assert redis["spec"]["serviceName"] == "tollgate-redis"
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    args = pod_containers(redis)["redis"]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"  # never evict spend


def test_every_tollgate_container_runs_the_built_image_with_limits_and_probes() -> None:
    for tree in TREES:
        for kind in ("Deployment", "StatefulSet"):
            for workload in objects(tree, kind).values():
                for name, container in pod_containers(workload).items():
                    assert container["resources"]["requests"], (tree, name)
                    assert container["resources"]["limits"]["memory"], (tree, name)
                    if container["image"].startswith("tollgate"):
                        assert container["image"] == IMAGE, (tree, name)
                        assert container["securityContext"]["readOnlyRootFilesystem"] is True
                        if name != "operator":
                            assert "readinessProbe" in container and "livenessProbe" in container


# ---- generated Envoy bootstraps ----------------------------------------------------------------


def test_envoy_configmaps_are_what_the_generator_makes(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-k8s-envoy.sh"), str(tmp_path)],
                   check=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    for overlay in ("sidecar", "gateway", "gateway-mtls"):
        checked_in = K8S / "overlays" / overlay / "envoy"
        fresh = tmp_path / overlay / "envoy"
        names = sorted(p.name for p in fresh.iterdir())
        assert names == sorted(p.name for p in checked_in.iterdir()), overlay
        _same, mismatch, errors = filecmp.cmpfiles(fresh, checked_in, names, shallow=False)
        assert not mismatch and not errors, (
            f"{overlay}: {mismatch + errors} differ from the generator: "
            "run scripts/gen-k8s-envoy.sh"
        )
    # The sidecar's bootstrap is the one `envoy/envoy.yaml` holds for running outside Kubernetes.
    sidecar = K8S / "overlays" / "sidecar" / "envoy" / "envoy.yaml"
    assert sidecar.read_text() == (ROOT / "envoy" / "envoy.yaml").read_text()


# ---- the sidecar overlay -----------------------------------------------------------------------


def sidecar_app() -> dict[str, Any]:
    return objects("sidecar", "Deployment")["example-app"]


def test_sidecars_start_before_the_app_and_stop_after_it() -> None:
    spec = sidecar_app()["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["tollgate", "envoy"]
    for init in spec["initContainers"]:
        # An init container without restartPolicy Always would block the pod forever.
        assert init["restartPolicy"] == "Always", init["name"]
    # The extproc workers get shutdown_grace_s, then are killed 5 s later.
    assert spec["terminationGracePeriodSeconds"] > Settings().shutdown_grace_s + 5
    assert objects("sidecar", "PodDisruptionBudget")["example-app"]["spec"]["minAvailable"] == 1


def test_sidecar_probes_and_metrics_use_the_settings_ports() -> None:
    settings = Settings()
    tollgate = pod_containers(sidecar_app())["tollgate"]
    env = {e["name"]: e for e in tollgate["env"]}
    assert "TOLLGATE_HTTP_PORT" not in env and "TOLLGATE_GRPC_PORT" not in env
    assert env["TOLLGATE_HTTP_HOST"]["value"] == "0.0.0.0"  # the kubelet probes the pod IP
    assert tollgate["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": settings.http_port}
    assert tollgate["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": settings.http_port}
    assert tollgate["startupProbe"]["httpGet"]["port"] == settings.http_port
    annotations = sidecar_app()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.http_port)
    assert env["TOLLGATE_SECRETS_DIR"]["value"] == settings.secrets_dir
    assert settings.secrets_dir in {m["mountPath"] for m in tollgate["volumeMounts"]}


def test_sidecar_envoy_listens_where_the_app_and_probes_look() -> None:
    settings = Settings()
    bootstrap = envoy_bootstrap("sidecar", sidecar_app())
    port = main_listener(bootstrap)["address"]["socket_address"]["port_value"]
    containers = pod_containers(sidecar_app())
    envoy = containers["envoy"]
    assert port in {p["containerPort"] for p in envoy["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert envoy[probe]["tcpSocket"]["port"] == port, probe
    app_env = {e["name"]: e for e in containers["app"]["env"]}
    assert app_env["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/v1"
    assert app_env["ANTHROPIC_BASE_URL"]["value"] == f"http://127.0.0.1:{port}"
    # Envoy reaches the extproc on the pod's loopback at the settings' gRPC address.
    clusters = bootstrap["static_resources"]["clusters"]
    (extproc,) = [c for c in clusters if c["name"] == "tollgate_extproc"]
    (endpoint,) = extproc["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == (settings.grpc_host, settings.grpc_port)


@pytest.mark.parametrize("tree", ["sidecar", "gateway", "gateway-mtls"])
def test_volume_mounts_resolve(tree: str) -> None:
    for workload in objects(tree, "Deployment").values():
        volumes = {v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]}
        for name, container in pod_containers(workload).items():
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (tree, name, mount["name"])


# ---- the gateway overlays ----------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["gateway", "gateway-mtls"])
def test_gateway_serves_tls_from_the_mounted_secret(tree: str) -> None:
    gateway = objects(tree, "Deployment")["tollgate-gateway"]
    envoy = pod_containers(gateway)["envoy"]
    bootstrap = envoy_bootstrap(tree, gateway)
    listener = main_listener(bootstrap)
    port = listener["address"]["socket_address"]["port_value"]
    (service,) = objects(tree, "Service").values()
    (service_port,) = service["spec"]["ports"]
    (container_port,) = [p for p in envoy["ports"] if p["name"] == service_port["targetPort"]]
    assert container_port["containerPort"] == port == envoy["readinessProbe"]["tcpSocket"]["port"]
    assert objects(tree, "PodDisruptionBudget")["tollgate-gateway"]

    # Every SDS file the listener names is in the ConfigMap, and every certificate file those
    # name sits in a directory where a Secret is mounted.
    (chain,) = listener["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]
    common = tls["common_tls_context"]
    sds = [c["sds_config"]["path_config_source"]["path"]
           for c in [*common["tls_certificate_sds_secret_configs"],
                     *([common["validation_context_sds_secret_config"]]
                       if "validation_context_sds_secret_config" in common else [])]]
    mounts = {m["mountPath"]: m["name"] for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    files = config_map_data(tree, gateway, "envoy", "/etc/envoy")
    secrets = set()
    for path in sds:
        directory, _, name = path.rpartition("/")
        assert directory == "/etc/envoy" and name in files, path
        (resource,) = yaml.safe_load(files[name])["resources"]
        secret = resource.get("tls_certificate") or resource["validation_context"]
        watched = secret["watched_directory"]["path"]
        assert watched in mounts, watched
        secrets.add(volumes[mounts[watched]]["secret"]["secretName"])
    if tree == "gateway":
        assert secrets == {"tollgate-gateway-tls"}
        assert "require_client_certificate" not in tls
    else:
        assert secrets == {"tollgate-gateway-tls", "tollgate-gateway-client-ca"}
        assert tls["require_client_certificate"] is True
