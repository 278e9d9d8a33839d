"""What each ext_proc message costs: a trivial Python ext_proc (grpc.aio + uvloop, answers every
message with an empty "continue", no parsing, no Redis) behind Envoy 1.40, in two processing modes:

  4 messages   request headers + buffered body, response headers + buffered body (Tollgate today)
  2 messages   header phases SKIPped: the request body message carries the request attributes
               (path, method, the key headers: CEL `request.headers['...']`) and the response
               body message carries `response.code`. Verified here: Envoy 1.40 sends the
               attributes with the first message of a direction when its headers are skipped.

Runs wrk against each mode in turn (alternating, `--rounds` times) and prints CPU microseconds
per request by component (extproc, Envoy; from /proc/<pid>/stat), messages per request (Envoy's
ext_proc counters: the bench checks it measured the mode it names) and req/s. The medians are
what to compare; req/s swings on a shared machine. Loopback only, bounded by --duration.

    .venv/bin/python bench/ext_proc_modes.py [--duration 5] [--rounds 3] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench import BODY, PATH, WrkResult, parse_wrk, write_lua_script
from extproc import envoyconf
from extproc.launch import free_port, start_envoy, start_mock_upstream

DIRECT = "0 messages (direct)"
MODES: dict[str, dict[str, str]] = {
    # No ext_proc filter at all (Envoy direct to the fake upstream): the same sitting's
    # denominator for the "% of Envoy direct" goals.
    DIRECT: {},
    "4 messages": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                   "request_body_mode": "BUFFERED", "response_body_mode": "BUFFERED"},
    "2 messages": {"request_header_mode": "SKIP", "response_header_mode": "SKIP",
                   "request_body_mode": "BUFFERED", "response_body_mode": "BUFFERED"},
}
ATTRIBUTES = ["source.address", "request.path", "request.method",
              "request.headers['authorization']", "request.headers['x-api-key']"]


def serve(port: int, transport: str) -> None:
    """The trivial processor (its own process, so its CPU can be read from /proc), on grpc.aio
    or on Tollgate's own HTTP/2 transport (extproc/server/h2grpc.py)."""
    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    from extproc.server import h2grpc

    class Trivial(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests: Any, _context: Any) -> Any:
            async for request in requests:
                response = ep.ProcessingResponse()
                getattr(response, request.WhichOneof("request")).SetInParent()
                yield response

    async def main() -> None:
        if transport == "native":
            native = h2grpc.GrpcServer({h2grpc.EXT_PROC_PATH: h2grpc.Method(
                Trivial().Process, ep.ProcessingRequest.FromString,
                ep.ProcessingResponse.SerializeToString)}, 64 << 20)
            await native.start("127.0.0.1", port)
            await asyncio.Event().wait()
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 10_000)])
        ep_grpc.add_ExternalProcessorServicer_to_server(Trivial(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def envoy_counter(admin: int, name: str) -> int:
    url = f"http://127.0.0.1:{admin}/stats?filter=^{name}$"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return int(text.split(": ")[1]) if ": " in text else 0


def config(mode: dict[str, str], mock_port: int, extproc_port: int, port: int,
           admin: int) -> dict[str, Any]:
    cfg = envoyconf.render_bootstrap(clusters=envoyconf.mock_clusters("127.0.0.1", mock_port),
                                     listen_port=port, admin_port=admin,
                                     extproc_port=extproc_port)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    # The listener's ext_proc alone (the passthrough streams' observer is never created here),
    # or no ext_proc at all for Envoy direct (an empty mode).
    dropped = ("envoy.filters.http.match_delegate",
               *(() if mode else ("envoy.filters.http.ext_proc",)))
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in dropped]
    if mode:
        ext_proc = hcm["http_filters"][0]["typed_config"]
        ext_proc["processing_mode"].update(mode)
        ext_proc["request_attributes"] = ATTRIBUTES
        ext_proc["response_attributes"] = ["response.code"]
    # A plain route to the fake upstream (Tollgate's routes need the extproc's headers).
    hcm["route_config"] = {"name": "bench", "virtual_hosts": [{
        "name": "bench", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "openai"}}]}]}
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--transport", choices=("grpcio", "native", "both"), default="both",
                   help="the trivial ext_proc's gRPC server: grpc.aio, Tollgate's own, or both")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: "
                   + ", ".join(MODES))
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.transport)
        return 0
    modes = {name: MODES[name] for name in args.modes.split(",")}
    transports = ("grpcio", "native") if args.transport == "both" else (args.transport,)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found (make bench installs it)", file=sys.stderr)
        return 2
    if not (1 <= args.duration <= 60 and 1 <= args.rounds <= 10):
        p.error("--duration 1..60, --rounds 1..10")
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-modes-"))
    envoy_version = subprocess.run([str(Path(sys.executable).parent / "envoy"), "--version"],
                                   capture_output=True, text=True).stdout.strip().split()[-1:]
    print(f"{os.cpu_count()} cores, Python {platform.python_version()}, Envoy "
          f"{' '.join(envoy_version)}; wrk -c{args.connections} -d{args.duration}s, "
          f"{args.rounds} rounds per mode, alternating; logs in {log_dir}", flush=True)
    mock, mock_port = start_mock_upstream(log_dir)
    servers = {}
    for transport in transports:
        extproc_port = free_port()
        servers[transport] = (extproc_port, subprocess.Popen(
            [sys.executable, __file__, "--serve", str(extproc_port), "--transport", transport],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    script = write_lua_script(log_dir / "post.lua", json.dumps(BODY).encode(),
                              {"Content-Type": "application/json",
                               "Authorization": "Bearer tg-bench"})
    # Envoy direct does not depend on the transport: measured once per round.
    combos = [(f"{mode} / {transport}" if MODES[mode] else mode, mode, transport)
              for mode in modes for transport in (transports if MODES[mode] else transports[:1])]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _m, _t in combos}
    try:
        time.sleep(1.0)
        for _round in range(args.rounds):
            for name, mode_name, transport in combos:
                mode = MODES[mode_name]
                extproc_port, extproc = servers[transport]
                port, admin = free_port(), free_port()
                envoy = start_envoy(log_dir / name.replace(" ", "-").replace("/", ""),
                                    config(mode, mock_port, extproc_port, port, admin), admin)
                try:
                    url = f"http://127.0.0.1:{port}{PATH}"
                    subprocess.run([wrk, "-t2", "-c8", "-d1s", "-s", str(script), url],
                                   capture_output=True, timeout=30, check=False)  # warm-up
                    sent0 = envoy_counter(admin, "http.tollgate.ext_proc.stream_msgs_sent")
                    e0, x0 = cpu_ticks(envoy.pid), cpu_ticks(extproc.pid)
                    t0 = time.monotonic()
                    out = subprocess.run(
                        [wrk, f"-t{min(2, args.connections)}", f"-c{args.connections}",
                         f"-d{args.duration}s",
                         "--latency", "-s", str(script), url],
                        capture_output=True, text=True, timeout=args.duration + 30, check=False)
                    elapsed = time.monotonic() - t0
                    e1, x1 = cpu_ticks(envoy.pid), cpu_ticks(extproc.pid)
                    sent = envoy_counter(admin, "http.tollgate.ext_proc.stream_msgs_sent") - sent0
                finally:
                    envoy.stop()
                r = parse_wrk(out.stdout, WrkResult(name, "load", 2, args.connections,
                                                    args.duration))
                if not r.clean:
                    print(f"{name}: run with errors ({r.problems()}): not reported",
                          file=sys.stderr)
                    return 1
                tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
                n = r.rps * elapsed
                rows[name].append({"rps": r.rps, "extproc_us": (x1 - x0) * tick_us / n,
                                   "envoy_us": (e1 - e0) * tick_us / n,
                                   "messages": sent / n, "p50_ms": r.p50_ms or 0.0})
                print(f"  {name}: {r.rps:.0f} req/s, extproc "
                      f"{rows[name][-1]['extproc_us']:.0f} us/req, envoy "
                      f"{rows[name][-1]['envoy_us']:.0f} us/req, "
                      f"{rows[name][-1]['messages']:.2f} msgs/req", flush=True)
    finally:
        for _port, process in servers.values():
            process.terminate()
            process.wait(10)
        mock.stop()
    print(f"\nmedians of {args.rounds} runs")
    print(f"{'mode':<22}{'req/s':>9}{'extproc us/req':>16}{'envoy us/req':>14}{'msgs/req':>10}"
          f"{'p50 ms':>8}{'% of direct':>13}")
    direct = statistics.median(r["rps"] for r in rows[DIRECT]) if DIRECT in rows else None
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        expected = int(name.split()[0])
        if abs(med["messages"] - expected) > 0.2:
            print(f"{name}: measured {med['messages']:.2f} messages per request, not "
                  f"{expected}: the mode was not applied; not reported", file=sys.stderr)
            return 1
        share = f"{100 * med['rps'] / direct:.1f} %" if direct else "-"
        print(f"{name:<22}{med['rps']:>9.0f}{med['extproc_us']:>16.0f}{med['envoy_us']:>14.0f}"
              f"{med['messages']:>10.2f}{med['p50_ms']:>8.2f}{share:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
