"""Redis memory kept per settled request, after a sustained run through the whole stack.

Starts its own redis-server (so nothing else writes to it), the fake upstream, extproc and
Envoy, then drives two keys with wrk, one after the other:

  limits    a key under a Block limit, an Allow limit and a rate limit with rpm, tpm and
            concurrency: every request reserves (hold record, lease, window charges) and settles
  plain     a key no limit applies to: every request only appends its usage event

and reports, per scenario, how much Redis memory (`MEMORY STATS`: allocated, without client
buffers) grew per request:
in total, and without the usage stream (one event per request, bounded by
TOLLGATE_USAGE_STREAM_MAXLEN: it IS the product). The second number is the per-request
bookkeeping (idempotency records) that issue 8 bounds; the settled-set column is the part of it
kept for requests without limits (10 minutes, then the set expires as a whole).

    .venv/bin/python bench/memory.py [--duration 30] [--connections 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from extproc.launch import free_port, start_redis, start_stack

sys.path.insert(0, str(Path(__file__).parent))
from bench import BODY, Bench, post, write_lua_script

TAG = "mem"


def cli(redis_url: str, *args: str, stdin: str | None = None) -> str:
    env = dict(os.environ, TOLLGATE_REDIS_TAG=TAG)
    out = subprocess.run([sys.executable, "-m", "extproc", *args, "--redis-url", redis_url],
                         env=env, input=stdin, capture_output=True, text=True, timeout=60,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"tollgate {' '.join(args)}: {out.stderr}")
    return out.stdout


def snapshot(r: redis.Redis, stream: str) -> dict[str, int]:
    # Allocated memory without client buffers (which move by hundreds of KB with the connection
    # count alone and would drown the signal); the key tables' own overhead stays in, since a
    # key per request costs mostly there.
    stats = r.memory_stats()
    markers = sum(int(r.memory_usage(k, samples=0) or 0)
                  for k in r.scan_iter(match=f"tg:{{{TAG}}}:settled:*"))
    return {
        "dataset": int(stats["total.allocated"]) - sum(
            int(stats.get(k, 0)) for k in ("clients.normal", "clients.slaves", "aof.buffer",
                                           "replication.backlog")),
        "markers": markers,
        "keys": int(r.dbsize()),
        "events": int(r.xlen(stream)),
        "stream_bytes": int(r.memory_usage(stream, samples=0) or 0),
    }


def settle_down(r: redis.Redis, stream: str) -> None:
    """Wait until batched settlements stop arriving."""
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        n = int(r.xlen(stream))
        if n != last:
            last, stable_since = n, time.monotonic()
        time.sleep(0.25)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=30)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found (Debian: apt-get install wrk, or `make bench` installs it)",
              file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-memory-"))
    redis_proc, url = start_redis(log_dir / "redis", prefer_embedded=False)
    env = dict(os.environ, TOLLGATE_JOURNAL_DIR=str(log_dir / "journal"), TOLLGATE_REDIS_TAG=TAG)
    stack = start_stack(log_dir=log_dir, env=env, port=free_port(), redis_url=url,
                        mock_upstream=True, workers=args.workers)
    r = redis.Redis.from_url(url)
    stream = f"tg:{{{TAG}}}:usage"
    results: dict[str, Any] = {}
    try:
        keys = {name: cli(url, "keys", "create", f"mem-{name}").strip().splitlines()[-1]
                for name in ("limits", "plain")}
        cli(url, "apply", "-f", "-", stdin="""
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: mem-block}
spec: {type: Block, max: 1000000, period: month, selector: {keys: [mem-limits]}}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: mem-allow}
spec: {type: Allow, max: 1, period: day, selector: {keys: [mem-limits]}}
---
apiVersion: tollgate.io/v1alpha1
kind: RateLimit
metadata: {name: mem-rl}
spec: {per: key, selector: {keys: [mem-limits]}, requestsPerMinute: 100000000,
       tokensPerMinute: 100000000000, concurrent: 10000}
""")
        url_main = f"http://127.0.0.1:{stack.port}/v1/chat/completions"
        deadline = time.monotonic() + 20
        while True:  # keys and limits reach the workers within about a second
            ok = all(post(url_main, k)[0] == 200 for k in keys.values())
            if ok and "x-tollgate-limits" in post(url_main, keys["limits"])[1]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("configuration never reached the gateway")
            time.sleep(0.2)
        groups = {proc.pid: proc.name for proc in stack.processes}
        for name, key in keys.items():
            script = write_lua_script(log_dir / f"{name}.lua", json.dumps(BODY).encode(),
                                      {"Content-Type": "application/json",
                                       "Authorization": f"Bearer {key}"})
            bench = Bench(stack, wrk, args.duration, args.connections, script, groups)
            settle_down(r, stream)
            before = snapshot(r, stream)
            print(f"{name}: {args.duration}s at c={args.connections} ...", flush=True)
            run = bench.run("tollgate", "load", args.duration)
            settle_down(r, stream)
            after = snapshot(r, stream)
            requests = after["events"] - before["events"]
            grown = after["dataset"] - before["dataset"]
            stream_grown = after["stream_bytes"] - before["stream_bytes"]
            results[name] = {
                "requests": requests, "wrk_requests": run.requests, "rps": round(run.rps),
                "non_2xx": run.non_2xx,
                "bytes_per_request": round(grown / max(requests, 1), 1),
                "bytes_per_request_without_stream": round((grown - stream_grown)
                                                          / max(requests, 1), 1),
                "stream_bytes_per_event": round(stream_grown / max(requests, 1), 1),
                "settled_set_bytes_per_request": round((after["markers"] - before["markers"])
                                                       / max(requests, 1), 1),
                "keys_added": after["keys"] - before["keys"],
            }
    finally:
        r.close()
        stack.stop()
        redis_proc.stop()
    print(f"\nRedis memory per settled request (redis-server, {args.duration}s per scenario, "
          f"c={args.connections}, {args.workers} workers)")
    print(f"{'scenario':10} {'requests':>9} {'req/s':>7} {'B/req':>7} {'B/req w/o stream':>17} "
          f"{'stream B/event':>15} {'settled-set B/req':>18} {'keys added':>11}")
    for name, res in results.items():
        print(f"{name:10} {res['requests']:>9} {res['rps']:>7} {res['bytes_per_request']:>7} "
              f"{res['bytes_per_request_without_stream']:>17} "
              f"{res['stream_bytes_per_event']:>15} {res['settled_set_bytes_per_request']:>18} "
              f"{res['keys_added']:>11}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(res["non_2xx"] == 0 for res in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
