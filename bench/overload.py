"""Overload: far more concurrent requests than the gateway can serve, and what clients get.

Starts the local stack (as bench.py does), creates a key, and fires `--requests` POSTs at the
Tollgate listener with h2load over `--clients` HTTP/2 connections of `--streams` concurrent
streams each (1,000+ streams on one connection by default: well past capacity on 2 cores).
Prints the error breakdown: 2xx, Tollgate's own 503 (admission control: JSON, Retry-After),
other 5xx (mostly ext_proc message timeouts: Envoy's 500), 4xx, requests h2load saw fail, and
Envoy's ext_proc counters. `--admission off` runs the same with admission control disabled
(TOLLGATE_MAX_PENDING=0, TOLLGATE_MAX_LAG_MS=0), for the comparison. Loopback only; bounded
by --requests and a 120 s h2load timeout.

    .venv/bin/python bench/overload.py [--requests 20000] [--streams 1000] [--clients 1]
                                       [--workers 2] [--admission on|off|both]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench import BODY, PATH, create_key, fetch_metrics, wait_for_key
from extproc.launch import StartupError, free_port, start_stack


def envoy_stats(admin_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{admin_port}/stats?filter=^http\\.tollgate\\.(ext_proc|downstream_rq)"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.removeprefix("http.tollgate.")] = int(value)
    return out


def metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}}\s+(\S+)", text, re.M)
    return float(m.group(1)) if m else 0.0


def parse_h2load(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m := re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text):
        out["seconds"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        out["rps"] = float(m.group(3))
    if m := re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", text):
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        out.update(zip(keys, map(int, m.groups()), strict=True))
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text):
        out.update(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()), strict=True))
    return out


def run(args: argparse.Namespace, admission: bool, h2load: str) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-overload-"))
    env = dict(os.environ, TOLLGATE_JOURNAL_DIR=str(log_dir / "journal"),
               TOLLGATE_ACCESS_LOG="false")
    if not admission:
        env.update(TOLLGATE_MAX_PENDING="0", TOLLGATE_MAX_LAG_MS="0")
    stack = start_stack(log_dir=log_dir, env=env, port=free_port(), mock_upstream=True,
                        workers=args.workers, envoy_concurrency=args.envoy_concurrency)
    try:
        key = create_key(stack.redis_url)
        url = f"http://127.0.0.1:{stack.port}{PATH}"
        wait_for_key(url, key)
        body = log_dir / "body.json"
        body.write_text(json.dumps(BODY))
        metrics_url = f"http://127.0.0.1:{stack.extproc.http}/metrics"
        before_envoy = envoy_stats(stack.admin_port)
        before = fetch_metrics(metrics_url)
        argv = [h2load, "-n", str(args.requests), "-c", str(args.clients), "-m",
                str(args.streams), "-d", str(body), "-H", "content-type: application/json",
                "-H", f"authorization: Bearer {key}", url]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        after = fetch_metrics(metrics_url)
        after_envoy = envoy_stats(stack.admin_port)
    finally:
        stack.stop()
    result = parse_h2load(proc.stdout)
    if "total" not in result:
        raise RuntimeError(f"h2load output not understood:\n{proc.stdout}\n{proc.stderr}")
    labels = 'decision="denied",reason="overloaded"'
    shed = int(metric(after, "tollgate_requests_total", labels)
               - metric(before, "tollgate_requests_total", labels))
    result["admission"] = "on" if admission else "off"
    result["shed_503"] = shed
    result["other_5xx"] = result.get("5xx", 0) - shed
    result["envoy"] = {k: after_envoy.get(k, 0) - before_envoy.get(k, 0)
                       for k in after_envoy if k.startswith("ext_proc.")}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--streams", type=int, default=1_000, help="concurrent streams per client")
    p.add_argument("--clients", type=int, default=1, help="HTTP/2 connections")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--envoy-concurrency", type=int, default=2)
    p.add_argument("--admission", choices=("on", "off", "both"), default="both")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.streams <= 10_000:
        p.error("--requests 1..1e6, --streams 1..10000")
    h2load = shutil.which("h2load")
    if h2load is None:
        print("h2load not found: `make bench` installs it (Debian: nghttp2-client)",
              file=sys.stderr)
        return 2
    version = subprocess.run([h2load, "--version"], capture_output=True, text=True).stdout
    print(f"{os.cpu_count()} cores, {platform.python_version()}, {version.strip()}; "
          f"{args.requests} requests, {args.clients} connection(s) x {args.streams} streams, "
          f"{args.workers} workers, Envoy concurrency {args.envoy_concurrency}")
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.admission]
    results = []
    try:
        for admission in modes:
            results.append(run(args, admission, h2load))
    except (StartupError, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"overload failed: {exc}", file=sys.stderr)
        return 2
    head = (f"{'admission':<10}{'req/s':>8}{'2xx':>8}{'503 shed':>10}{'other 5xx':>11}"
            f"{'4xx':>6}{'h2 errors':>11}{'msg timeouts':>14}")
    print(head + "\n" + "-" * len(head))
    for r in results:
        print(f"{r['admission']:<10}{r.get('rps', 0):>8.0f}{r.get('2xx', 0):>8}"
              f"{r['shed_503']:>10}{r['other_5xx']:>11}{r.get('4xx', 0):>6}"
              f"{r.get('errored', 0) + r.get('timeout', 0):>11}"
              f"{r['envoy'].get('ext_proc.message_timeouts', 0):>14}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
