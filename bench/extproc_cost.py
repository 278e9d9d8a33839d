"""What one request costs the extproc worker, in instructions (valgrind), per gRPC transport.

One extproc worker (`python -m extproc.server.worker`, no supervisor) runs under
`valgrind --tool=callgrind` behind a native Envoy (`--concurrency 1`), the fake upstream and a
Redis of its own. For each transport (`TOLLGATE_GRPC_TRANSPORT`: `native`, Tollgate's own
HTTP/2 server, and `grpcio`, grpc.aio) a fresh worker is started, warmed up, its counters zeroed
(`callgrind_control -z`), driven with `--requests` calls by h2load and its counters dumped: the
worker's instructions in that window, *all threads* (grpc.aio's C-core and poller threads too),
divided by the requests. Repeatable to about 1 %, unlike CPU time on a shared machine.

Two paths: `limits` (a key under RPM + TPM + Block + Allow, as bench.py's `limits`: reserve
and settle in Redis) and `key` (a key with no limit: key check, pricing, cost headers and
result object). Every response is counted (all must be 2xx) and the cost header checked, so a
broken path is reported as broken, not as cheap. Loopback only; every process started here is
stopped by its PID.

    .venv/bin/python bench/extproc_cost.py [--requests 400] [--transports native,grpcio]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from envoy_cost import (
    LIMITS,
    callgrind_control,
    check_path,
    cli,
    dumped_instructions,
    h2load,
    start_backends,
    wait_path,
)

from bench import BODY, PATH
from extproc import envoyconf
from extproc.launch import Managed, free_port, start_envoy, start_process

TRANSPORTS = ("native", "grpcio")


def start_worker(log_dir: Path, transport: str, port: int, env: dict[str, str]) -> Managed:
    metrics = log_dir / f"metrics-{transport}"
    metrics.mkdir(exist_ok=True)
    worker_env = dict(env, TOLLGATE_GRPC_PORT=str(port), TOLLGATE_GRPC_TRANSPORT=transport,
                      PROMETHEUS_MULTIPROC_DIR=str(metrics),
                      # Under valgrind the event loop runs ~50x late: admission control would
                      # shed the very requests being measured.
                      TOLLGATE_MAX_LAG_MS="0", TOLLGATE_MAX_PENDING="0")
    argv = ["valgrind", "--tool=callgrind",
            f"--callgrind-out-file={log_dir}/callgrind.{transport}.%p",
            sys.executable, "-m", "extproc.server.worker", "--index", "0"]
    return start_process(f"worker-{transport}", argv, log_dir, worker_env)


def run_transport(args: argparse.Namespace, transport: str, log_dir: Path, mock_port: int,
                  env: dict[str, str], keys: dict[str, str], body_path: Path
                  ) -> dict[str, float]:
    grpc_port, port, admin = free_port(), free_port(), free_port()
    print(f"{transport}: starting the worker under callgrind ...", flush=True)
    worker = start_worker(log_dir, transport, grpc_port, env)
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", mock_port), listen_port=port,
        admin_port=admin, extproc_port=grpc_port, reuse_port=False)
    envoy = start_envoy(log_dir / f"envoy-{transport}", config, admin, concurrency=1)
    out: dict[str, float] = {}
    try:
        url = f"http://127.0.0.1:{port}{PATH}"
        for path, key in keys.items():
            wait_path(url, key, "x-tollgate-cost")
            h2load(url, args.warmup, args.connections, key, body_path)
            before = set(log_dir.glob(f"callgrind.{transport}.{worker.pid}*"))
            callgrind_control("-z", str(worker.pid))
            ok = h2load(url, args.requests, args.connections, key, body_path)
            callgrind_control("-d", str(worker.pid))
            total = dumped_instructions(log_dir, transport, worker.pid, before)
            check_path(transport, url, key)
            if ok != args.requests:
                raise RuntimeError(f"{transport} {path}: {ok}/{args.requests} answered 2xx")
            out[path] = total / args.requests
            print(f"{transport} {path}: {out[path] / 1e3:,.0f} k instructions per request",
                  flush=True)
    finally:
        envoy.stop()
        worker.stop(timeout=60)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    transports = [t for t in args.transports.split(",") if t]
    if set(transports) - set(TRANSPORTS):
        parser.error(f"--transports: from {', '.join(TRANSPORTS)}")
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (make bench installs it)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-extproc-cost-"))
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}; h2load -c"
          f"{args.connections}, {args.requests} requests per path; logs in {log_dir}",
          flush=True)
    body_path = log_dir / "body.json"
    body_path.write_text(json.dumps(BODY))
    processes: list[Managed] = []
    results: dict[str, dict[str, float]] = {}
    try:
        redis_url, mock_port, env = start_backends(log_dir, processes)
        keys = {"limits": cli(redis_url, "keys", "create", "cost-limited").split()[-1],
                "key": cli(redis_url, "keys", "create", "cost-plain").split()[-1]}
        cli(redis_url, "apply", "-f", "-", stdin=LIMITS)
        for transport in transports:
            results[transport] = run_transport(args, transport, log_dir, mock_port, env, keys,
                                               body_path)
    finally:
        for proc in reversed(processes):
            proc.stop()
    print(f"\nextproc worker instructions per request (all threads), Envoy --concurrency 1, "
          f"h2load -c{args.connections}, {args.requests} requests")
    print(f"{'transport':<12}{'limits path':>14}{'key-only path':>16}")
    for transport, row in results.items():
        print(f"{transport:<12}{row['limits'] / 1e3:>12,.0f} k{row['key'] / 1e3:>14,.0f} k")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
