"""Does pipelining the request body save a round trip at c=1? A trivial ext_proc (Tollgate's
own HTTP/2 transport, no parsing, no Redis) behind Envoy 1.40 with one worker thread, the
request body in two modes:

  buffered  request_body_mode BUFFERED (Tollgate today): Envoy sends the body only after the
            request-headers reply, so a request waits for two ext_proc round trips.
  duplex    request_body_mode FULL_DUPLEX_STREAMED: Envoy sends the body chunks without waiting
            for the header reply; the processor answers the headers once it has the whole body
            (as Tollgate would, deciding the routing headers from the body) and sends the body
            back as a streamed body response.

Both answer the response phases at once (headers and a BUFFERED body, as Tollgate's JSON path).
Prints the p50 latency of sequential POSTs (httpx, HTTP/1.1, one keep-alive connection) per
mode, alternating for --rounds, and how Envoy delivered the duplex body: messages per request
and the gap between the body's data and its end. Loopback only; every process started here is
stopped by its PID.

    .venv/bin/python bench/ext_proc_duplex.py [--rounds 5] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from ext_proc_modes import config as modes_config

from bench import BODY, PATH
from extproc.launch import free_port, start_envoy, start_mock_upstream

MODES = ("buffered", "duplex")


def serve(port: int, duplex: bool, report: Path) -> None:
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    from extproc.server import h2grpc

    async def process(requests: Any, _context: Any) -> Any:
        body = b""
        started = time.perf_counter()
        data_at = 0.0
        messages = 0
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "request_body":
                messages += 1
                chunk = request.request_body
                if chunk.body and not data_at:
                    data_at = time.perf_counter()
            if duplex and kind == "request_headers":
                continue  # answered once the body is complete
            if duplex and kind == "request_body":
                body += chunk.body
                if not chunk.end_of_stream:
                    continue
                with report.open("a") as out:  # messages, µs from the data to its end
                    out.write(f"{messages} {(time.perf_counter() - data_at) * 1e6:.0f} "
                              f"{(data_at - started) * 1e6:.0f}\n")
                headers = ep.ProcessingResponse()
                headers.request_headers.SetInParent()
                yield headers
                reply = ep.ProcessingResponse()
                streamed = reply.request_body.response.body_mutation.streamed_response
                streamed.body = body
                streamed.end_of_stream = True
                yield reply
                continue
            response = ep.ProcessingResponse()
            getattr(response, kind).SetInParent()
            yield response

    async def main() -> None:
        server = h2grpc.GrpcServer({h2grpc.EXT_PROC_PATH: h2grpc.Method(
            process, ep.ProcessingRequest.FromString, ep.ProcessingResponse.SerializeToString)},
            64 << 20)
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def config(mode: str, mock_port: int, extproc_port: int, port: int,
           admin: int) -> dict[str, Any]:
    """ext_proc_modes.py's bootstrap (the bare listener filter, a plain route to the fake
    upstream), with this mode's request body and no attributes."""
    processing = {"request_header_mode": "SEND", "response_header_mode": "SEND",
                  "request_body_mode": "FULL_DUPLEX_STREAMED" if mode == "duplex"
                  else "BUFFERED", "response_body_mode": "BUFFERED"}
    if mode == "duplex":
        processing["request_trailer_mode"] = "SEND"  # Envoy requires it with full duplex
    cfg = modes_config(processing, mock_port, extproc_port, port, admin)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    ext_proc.pop("response_attributes")
    ext_proc["request_attributes"] = ["source.address"]
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1] == "duplex", Path(args.serve[2]))
        return 0
    if not (1 <= args.rounds <= 20 and 10 <= args.requests <= 5000):
        p.error("--rounds 1..20, --requests 10..5000")
    import httpx

    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-duplex-"))
    report = log_dir / "duplex-bodies.txt"
    print(f"{os.cpu_count()} cores; {args.rounds} rounds x {args.requests} sequential requests "
          f"per mode; logs in {log_dir}", flush=True)
    mock, mock_port = start_mock_upstream(log_dir)
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    envoys = {}
    try:
        for mode in MODES:
            port = free_port()
            servers[mode] = (port, subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), mode, str(report)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.5)
        for mode in MODES:
            port, admin = free_port(), free_port()
            envoys[mode] = (port, start_envoy(log_dir / mode, config(
                mode, mock_port, servers[mode][0], port, admin), admin, concurrency=1))
        p50s: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in MODES:
                url = f"http://127.0.0.1:{envoys[mode][0]}{PATH}"
                latencies = []
                with httpx.Client() as client:
                    for i in range(args.requests + 50):
                        t0 = time.perf_counter()
                        response = client.post(url, json=BODY)
                        if i >= 50:  # the first 50 warm up
                            latencies.append(time.perf_counter() - t0)
                        if response.status_code != 200 or b'"choices"' not in response.content:
                            print(f"{mode}: {response.status_code} {response.text[:200]}: "
                                  "the path is broken, nothing reported", file=sys.stderr)
                            return 1
                p50s[mode].append(statistics.median(latencies) * 1000)
                print(f"  round {round_ + 1} {mode:<9} p50 {p50s[mode][-1]:.3f} ms", flush=True)
    finally:
        for _port, envoy in envoys.values():
            envoy.stop()
        for _port, server in servers.values():
            server.terminate()
            server.wait(10)
        mock.stop()
    bodies = [line.split() for line in report.read_text().splitlines()]
    print("\np50 ms per round: " + "; ".join(
        f"{mode} {', '.join(f'{v:.2f}' for v in p50s[mode])}" for mode in MODES))
    print("median of the rounds: " + ", ".join(
        f"{mode} {statistics.median(p50s[mode]):.3f} ms" for mode in MODES))
    print(f"duplex bodies: {statistics.median(int(b[0]) for b in bodies):.0f} body messages per "
          f"request (median); the body's end came {statistics.median(int(b[1]) for b in bodies)}"
          f" us after its data; its data {statistics.median(int(b[2]) for b in bodies)} us "
          "after the headers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
