"""Does throughput grow with cores? The full limits path on a subset of the machine's CPUs.

Issue 12 asks how the gateway scales with worker processes and Envoy threads (planning for a
16-core node) and to measure it with CPU subsets here. Each configuration pins this process
before starting its own stack (Redis, extproc supervisor and workers, Envoy, fake upstream) and
wrk, so all of it runs on the chosen CPUs: a small node of that many cores. For each it prints
req/s of the full limits path (medians of rounds), how the requests split over the workers
(from /readyz) and the scaling efficiency against the one-core configuration.

    .venv/bin/python bench/cores.py [--duration 8] [--rounds 3] [--configs 0:1:1,0-1:2:2,0-1:1:2]

A configuration is CPUS:WORKERS:ENVOY_THREADS (CPUS as for taskset -c: `0`, `0-1`, `0,2`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extended import _setup_keys

from bench import BODY, Bench, create_key, wait_for_key, write_lua_script
from extproc.launch import StartupError, free_port, start_stack


def cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def worker_requests(http_port: int) -> list[int]:
    workers = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=5).json()["workers"]
    return [int(w.get("requests", 0)) for w in workers]


def measure(cpus: set[int], workers: int, threads: int, duration: int,
            rounds: int) -> dict[str, Any]:
    os.sched_setaffinity(0, cpus)  # inherited by every process the stack and wrk start
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-cores-"))
    env = dict(os.environ, TOLLGATE_JOURNAL_DIR=str(log_dir / "journal"))
    stack = start_stack(log_dir=log_dir, env=env, port=free_port(), redis_url=None,
                        mock_upstream=True, bypass=True, workers=workers,
                        envoy_concurrency=threads)
    try:
        key = create_key(stack.redis_url)
        groups = {p.pid: p.name for p in stack.processes}
        bench = Bench(stack, "wrk", duration, 32, write_lua_script(
            log_dir / "post.lua", json.dumps(BODY).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}), groups)
        wait_for_key(bench.url("tollgate"), key)
        limited, _ = _setup_keys(bench, stack)
        script = write_lua_script(log_dir / "limited.lua", json.dumps(BODY).encode(),
                                  {"Content-Type": "application/json",
                                   "Authorization": f"Bearer {limited}"})
        bench.run("limits", "load", 2, script=script)  # warm-up
        rps, split_before = [], worker_requests(stack.extproc.http)
        for n in range(rounds):
            result = bench.run("limits", "load", duration, script=script)
            if not result.clean:
                raise RuntimeError(f"round {n + 1} had errors: {result.problems()}")
            rps.append(result.rps)
            print(f"  cpus {sorted(cpus)} workers {workers} envoy threads {threads}: round "
                  f"{n + 1} {result.rps:.0f} req/s", flush=True)

        time.sleep(1.0)  # the workers report their counts every half second
        split = [a - b for a, b in zip(worker_requests(stack.extproc.http), split_before,
                                       strict=True)]
        return {"cpus": sorted(cpus), "workers": workers, "threads": threads,
                "rps": statistics.median(rps), "split": split}
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="0:1:1,0-1:2:2,0-1:1:2")
    args = parser.parse_args()
    available = os.sched_getaffinity(0)
    rows = []
    try:
        for config in args.configs.split(","):
            cpus_text, workers, threads = config.split(":")
            cpus = cpu_list(cpus_text)
            if not cpus <= available:
                print(f"skipping {config}: this machine has CPUs {sorted(available)}")
                continue
            rows.append(measure(cpus, int(workers), int(threads), args.duration, args.rounds))
    except (StartupError, RuntimeError) as exc:
        print(f"cores: {exc}", file=sys.stderr)
        return 2
    finally:
        os.sched_setaffinity(0, available)
    base = next((r for r in rows if len(r["cpus"]) == 1), None)
    print(f"\nfull limits path, wrk c=32, {args.rounds} x {args.duration} s, medians "
          f"({os.cpu_count()} CPUs on this machine)")
    print("| CPUs | workers | Envoy threads | req/s | requests per worker | per core vs 1 core |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        per_core = (f"{r['rps'] / len(r['cpus']) / base['rps']:.2f}"
                    if base and base["rps"] else "-")
        print(f"| {','.join(map(str, r['cpus']))} | {r['workers']} | {r['threads']} | "
              f"{r['rps']:.0f} | {' / '.join(map(str, r['split']))} | {per_core} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
