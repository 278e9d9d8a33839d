"""The benchmark's second half: the full limits path, refusals, and streaming.

Run from bench.py (same stack, same run). Three measurements:

* `limits`: the same request through a key under a requests-per-minute and a tokens-per-minute
  RateLimit, one Block and one Allow Limit (all far from full), so every request reserves and
  settles in Redis. Reported: req/s and latency as for `tollgate`, and the Redis script calls
  per request (from Redis' own INFO commandstats), which is the number of round trips.
* `refused`: a key whose Block limit is exhausted: every request is answered 429 by extproc.
  Reported: script calls per refused request.
* streaming: 50-chunk SSE responses at concurrency 1, direct vs through Tollgate: time to first
  byte, total time, and the time Tollgate adds per chunk.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import BODY, PATH, Bench, WrkResult, post, table, write_lua_script
from extproc.launch import Stack

CHUNKS = 50
STREAM_REQUESTS = 60


def _cli(stack: Stack, *args: str, stdin: str | None = None) -> str:
    argv = [sys.executable, "-m", "extproc", *args, "--redis-url", stack.redis_url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"tollgate {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def _script_calls(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items()
               if k in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro"))


def _wait_status(bench: Bench, key: str, want: int, header: str | None = None) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, headers = post(bench.url("tollgate"), key)
        if status == want and (header is None or header in headers):
            return
        time.sleep(0.1)
    raise RuntimeError(f"limits never applied (wanted {want} with {header})")


def limits_yaml(prefix: str, key: str) -> str:
    """The full limits path every benchmark measures: an RPM + TPM rate limit, a Block and an
    Allow limit on one key, all far from full, so every request reserves and settles."""
    return f"""apiVersion: tollgate.io/v1alpha1
kind: RateLimit
metadata: {{name: {prefix}-rates}}
spec: {{per: key, selector: {{keys: [{key}]}}, requestsPerMinute: 100000000,
       tokensPerMinute: 1000000000}}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: {prefix}-block}}
spec: {{type: Block, max: 1000000, period: month, selector: {{keys: [{key}]}}}}
---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: {prefix}-allow}}
spec: {{type: Allow, max: 1, threshold: 0.5, period: day, selector: {{keys: [{key}]}}}}
"""


def _setup_keys(bench: Bench, stack: Stack) -> tuple[str, str]:
    limited = _cli(stack, "keys", "create", "bench-limited").strip().splitlines()[-1]
    blocked = _cli(stack, "keys", "create", "bench-blocked").strip().splitlines()[-1]
    _cli(stack, "apply", "-f", "-", stdin=limits_yaml("bench", "bench-limited") + """---
apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {name: bench-empty}
spec: {type: Block, max: 0, selector: {keys: [bench-blocked]}}
""")
    _wait_status(bench, limited, 200, "x-tollgate-limits")
    _wait_status(bench, blocked, 429)
    return limited, blocked


def run_limits(bench: Bench, stack: Stack, duration: int, log_dir: Path) -> dict[str, Any]:
    limited, blocked = _setup_keys(bench, stack)
    headers = {"Content-Type": "application/json"}
    limited_script = write_lua_script(log_dir / "limited.lua", json.dumps(BODY).encode(),
                                      {**headers, "Authorization": f"Bearer {limited}"})
    blocked_script = write_lua_script(log_dir / "blocked.lua", json.dumps(BODY).encode(),
                                      {**headers, "Authorization": f"Bearer {blocked}"})
    print("limits: warm-up 2s ...", flush=True)
    bench.run("limits", "load", 2, script=limited_script)
    results: dict[str, WrkResult] = {}
    calls: dict[str, float] = {}
    for mode in ("load", "c1"):
        print(f"limits: {mode} run {duration}s ...", flush=True)
        before = _script_calls(stack.redis_url)
        result = bench.run("limits", mode, duration, script=limited_script)
        time.sleep(0.5)  # let the last settlements land
        calls[mode] = (_script_calls(stack.redis_url) - before) / max(1, result.requests)
        results[f"limits/{mode}"] = result
    print("refused: 3s run ...", flush=True)
    before = _script_calls(stack.redis_url)
    refused = bench.run("refused", "load", 3, script=blocked_script, connections=8)
    calls["refused"] = (_script_calls(stack.redis_url) - before) / max(1, refused.requests)
    print()
    print("full limits path (RPM + TPM + Block + Allow + cost headers), latency in ms")
    print(table(list(results.values())))
    print(f"Redis script calls (round trips) per allowed request: {calls['load']:.2f} "
          f"(load), {calls['c1']:.2f} (c=1); per refused request: {calls['refused']:.2f} "
          f"({refused.requests} refused at {refused.rps:.0f} req/s, all non-2xx as intended: "
          f"{refused.non_2xx == refused.requests})")
    return {
        **{k: {"rps": r.rps, "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms,
               "clean": r.clean} for k, r in results.items()},
        "script_calls_per_allowed_request": round(calls["load"], 3),
        "script_calls_per_allowed_request_c1": round(calls["c1"], 3),
        "script_calls_per_refused_request": round(calls["refused"], 3),
        "refused_rps": refused.rps,
    }


def run_rounds(bench: Bench, stack: Stack, duration: int, log_dir: Path,
               rounds: int) -> dict[str, Any]:
    """`rounds` alternating load runs of Envoy direct and the full limits path: req/s, the
    ratio of the two from the same round, and CPU time per request by component (the figure
    that stays put on a shared machine); then, per round, a c=1 run of each, for the added
    p50 of one request at a time; medians over the rounds."""
    limited, _blocked = _setup_keys(bench, stack)
    script = write_lua_script(log_dir / "limited.lua", json.dumps(BODY).encode(),
                              {"Content-Type": "application/json",
                               "Authorization": f"Bearer {limited}"})
    print("limits: warm-up 2s ...", flush=True)
    bench.run("limits", "load", 2, script=script)
    rows: list[dict[str, Any]] = []
    for n in range(rounds):
        direct = bench.run("direct", "load", duration)
        limits = bench.run("limits", "load", duration, script=script)
        direct1 = bench.run("direct", "c1", duration)
        limits1 = bench.run("limits", "c1", duration, script=script)
        runs = (direct, limits, direct1, limits1)
        if not all(r.clean for r in runs):
            raise RuntimeError(f"round {n + 1} had errors: "
                               + " ".join(str(r.problems()) for r in runs))
        cpu = {k: round(v * 1e4 / limits.rps, 1) for k, v in limits.cpu_pct.items()
               if k not in ("idle", "other")}
        added = (limits1.p50_ms or 0.0) - (direct1.p50_ms or 0.0)
        row = {"direct_rps": direct.rps, "limits_rps": limits.rps,
               "pct_of_direct": round(100 * limits.rps / direct.rps, 1), "cpu_us": cpu,
               "other_pct": limits.cpu_pct.get("other", 0.0),
               "c1_added_p50_ms": round(added, 2)}
        rows.append(row)
        print(f"round {n + 1}: direct {direct.rps:.0f} req/s, limits {limits.rps:.0f} req/s "
              f"({row['pct_of_direct']} %), CPU us/request "
              + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
              + f"; other load {row['other_pct']:.0f} % of a core; "
              f"c=1 added p50 {added:.2f} ms", flush=True)

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 1)

    summary = {
        "rounds": rows,
        "median_direct_rps": med([r["direct_rps"] for r in rows]),
        "median_limits_rps": med([r["limits_rps"] for r in rows]),
        "median_pct_of_direct": med([r["pct_of_direct"] for r in rows]),
        "median_cpu_us": {k: med([r["cpu_us"][k] for r in rows]) for k in rows[0]["cpu_us"]},
        "median_c1_added_p50_ms": round(statistics.median(
            [r["c1_added_p50_ms"] for r in rows]), 2),
    }
    print(f"\nmedians over {rounds} rounds: direct {summary['median_direct_rps']:.0f} req/s, "
          f"full limits path {summary['median_limits_rps']:.0f} req/s "
          f"({summary['median_pct_of_direct']} % of direct); CPU us per request: "
          + ", ".join(f"{k} {v:.0f}" for k, v in summary["median_cpu_us"].items())
          + f"; added p50 at c=1 {summary['median_c1_added_p50_ms']:.2f} ms")
    return summary


CHUNK_GAP_MS = 2  # the fake upstream writes one event every 2 ms: each is its own chunk


_STAMP = re.compile(rb"mock(\d{20})")


def _stream_once(client: httpx.Client, url: str, key: str, with_usage: bool = False
                 ) -> tuple[float, float, int, list[int]]:
    """Time to first byte and total (s), events, and each event's transit time in ns (the fake
    upstream writes its send time into the event, `x-mock-stamp`; one clock on one machine).
    `with_usage`: the client asks for the usage chunk itself, so Tollgate has nothing to
    rewrite and (TOLLGATE_STREAM_PASSTHROUGH) lets the stream pass through."""
    body: dict[str, Any] = {k: v for k, v in BODY.items() if k != "max_tokens"}
    body["stream"] = True
    if with_usage:
        body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {key}", "x-mock-words": str(CHUNKS),
               "x-mock-chunk-delay-ms": str(CHUNK_GAP_MS), "x-mock-stamp": "1"}
    t0 = time.perf_counter()
    first = 0.0
    events = 0
    transits: list[int] = []
    with client.stream("POST", url, json=body, headers=headers, timeout=30) as response:
        if with_usage and response.headers.get("x-tollgate-stream") != "passthrough":
            raise RuntimeError("the passthrough path was held: is TOLLGATE_STREAM_PASSTHROUGH "
                               "on in the stack?")
        for chunk in response.iter_raw():
            arrived = time.monotonic_ns()
            if not first:
                first = time.perf_counter() - t0
            events += chunk.count(b"data: ")
            transits += [arrived - int(sent) for sent in _STAMP.findall(chunk)]
    return first, time.perf_counter() - t0, events, transits


def run_stream(bench: Bench, stack: Stack) -> dict[str, Any]:
    key = _cli(stack, "keys", "create", "bench-stream").strip().splitlines()[-1]
    _wait_status(bench, key, 200)
    out: dict[str, Any] = {}
    print(f"\nstreaming: {STREAM_REQUESTS} x {CHUNKS}-chunk responses (one event every "
          f"{CHUNK_GAP_MS} ms) at c=1 per path ...", flush=True)
    # "tollgate": each chunk goes through the extproc (held: Tollgate hides the usage chunk
    # it asked for and appends the result object); "passthrough": the client asks for usage
    # itself, the chunks go straight on and the observer filter meters a copy.
    for scenario in ("direct", "tollgate", "passthrough"):
        url = bench.url("tollgate" if scenario == "passthrough" else scenario)
        with_usage = scenario == "passthrough"
        with httpx.Client() as client:  # one keep-alive connection, like an SDK client
            for _ in range(5):
                _stream_once(client, url, key, with_usage)  # warm-up
            samples = [_stream_once(client, url, key, with_usage)
                       for _ in range(STREAM_REQUESTS)]
        # Every event but each stream's first (whose transit includes the response headers'
        # message): what Tollgate adds to one streamed chunk on its way.
        later = [t for s in samples for t in s[3][1:]]
        if len(later) < STREAM_REQUESTS * (CHUNKS // 2):
            raise RuntimeError(f"{scenario}: only {len(later)} stamped events came back")
        out[scenario] = {
            "ttfb_ms": round(1000 * statistics.median(s[0] for s in samples), 3),
            "total_ms": round(1000 * statistics.median(s[1] for s in samples), 3),
            "events": statistics.median(s[2] for s in samples),
            "chunk_transit_us": round(statistics.median(later) / 1000, 1),
            "chunk_transit_p90_us": round(statistics.quantiles(later, n=10)[-1] / 1000, 1),
        }
    d, t, p = out["direct"], out["tollgate"], out["passthrough"]
    out["added_ttfb_ms"] = round(t["ttfb_ms"] - d["ttfb_ms"], 3)
    out["added_per_chunk_us"] = round(t["chunk_transit_us"] - d["chunk_transit_us"], 1)
    out["passthrough_added_ttfb_ms"] = round(p["ttfb_ms"] - d["ttfb_ms"], 3)
    out["passthrough_added_per_chunk_us"] = round(p["chunk_transit_us"]
                                                  - d["chunk_transit_us"], 1)
    print(f"  {'path':<11} {'TTFB ms':>9} {'total ms':>9} {'events':>7} "
          f"{'chunk transit us (p50 / p90)':>29}")
    for name in ("direct", "tollgate", "passthrough"):
        r = out[name]
        print(f"  {name:<11} {r['ttfb_ms']:>9.2f} {r['total_ms']:>9.2f} {r['events']:>7.0f} "
              f"{r['chunk_transit_us']:>14.0f} / {r['chunk_transit_p90_us']:<12.0f}")
    print(f"  added time to first byte: {out['added_ttfb_ms']:.2f} ms held, "
          f"{out['passthrough_added_ttfb_ms']:.2f} ms passthrough; added per chunk: "
          f"{out['added_per_chunk_us']:.0f} us held, {out['passthrough_added_per_chunk_us']:.0f}"
          " us passthrough (median transit of each event after a stream's first, from the fake "
          "upstream's write to the client's read)")
    return out


def run_all(bench: Bench, stack: Stack, duration: int, log_dir: Path) -> dict[str, Any]:
    return {"limits": run_limits(bench, stack, duration, log_dir),
            "streaming": run_stream(bench, stack)}


__all__ = ["PATH", "run_all"]
