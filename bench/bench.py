"""Tollgate benchmark: Envoy straight to the fake upstream vs. the same call through Tollgate.

Starts the local stack once (Redis, fake upstream, extproc, Envoy with a bypass listener), creates
a virtual key, then drives both listeners with wrk using the same OpenAI chat/completions body:

  direct    Envoy bypass listener -> fake upstream (no ext_proc filter)
  tollgate  Envoy main listener -> ext_proc (key check, pricing, cost headers) -> fake upstream

Each scenario gets a load run (wrk -t2 -c32) and a concurrency-1 run (wrk -t1 -c1). See
bench/README.md for how to read the output. Only talks to 127.0.0.1.

    .venv/bin/python bench/bench.py [--duration 10] [--connections 32] [--workers 2]
                                    [--envoy-concurrency 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from extproc.launch import Stack, StartupError, free_port, start_stack

BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello"}],
    "max_tokens": 16,
}
PATH = "/v1/chat/completions"
COST_HEADER = "x-tollgate-cost"
WARMUP_S = 2
KEY_READY_TIMEOUT_S = 20.0

# Targets from the performance budget (DESIGN.md).
TARGET_RPS = 1000.0
TARGET_PCT_OF_DIRECT = 25.0
TARGET_ADDED_P50_MS = 2.0
# The scale-and-speed goals (issue 12), checked against one full run by `goals` below.
GOAL_KEY_ONLY_PCT = 30.0
GOAL_LIMITS_PCT = 25.0
GOAL_LIMITS_ADDED_P50_MS = 1.5
GOAL_STREAM_ADDED_TTFB_MS = 1.5
GOAL_STREAM_ADDED_PER_CHUNK_US = 20.0
GOAL_WORKER_RSS_MB = 100.0
# Busy CPU not charged to the stack or wrk above this (% of one core) means something else was
# running on the machine; loopback softirq alone stays well below it.
NOISY_OTHER_PCT = 25.0

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE = r"([\d.]+)(us|ms|s|m|h)"


# ---- wrk ---------------------------------------------------------------------------------


@dataclass
class WrkResult:
    scenario: str
    mode: str  # "load" or "c1"
    threads: int
    connections: int
    duration_s: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)  # by component, 100 = one core
    exit_code: int = 0

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())

    @property
    def clean(self) -> bool:
        return self.exit_code == 0 and self.errors == 0 and self.non_2xx == 0 and self.requests > 0

    def problems(self) -> str:
        parts = []
        if self.exit_code:
            parts.append(f"wrk exit {self.exit_code}")
        if self.requests == 0:
            parts.append("no requests completed")
        if self.non_2xx:
            parts.append(f"{self.non_2xx} non-2xx")
        parts += [f"{n} {kind} errors" for kind, n in self.socket_errors.items() if n]
        return ", ".join(parts)


def to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk(text: str, result: WrkResult) -> WrkResult:
    """Fill `result` from wrk's --latency output (units us/ms/s/m/h are converted to ms)."""
    if m := re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M):
        result.rps = float(m.group(1))
    if m := re.search(r"^\s*(\d+) requests in", text, re.M):
        result.requests = int(m.group(1))
    for pct in (50, 75, 90, 99):
        if m := re.search(rf"^\s+{pct}%\s+{_SIZE}\s*$", text, re.M):
            setattr(result, f"p{pct}_ms", to_ms(m.group(1), m.group(2)))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        result.non_2xx = int(m.group(1))
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        result.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    return result


def lua_string(text: str) -> str:
    """A double-quoted Lua string literal for `text` (ASCII-safe: other bytes as \\ddd)."""
    out = []
    for byte in text.encode():
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def write_lua_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(body.decode())}"]
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- CPU accounting (from /proc, by process group = one stack component) -------------------


def _clock_ticks() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def cpu_ticks_by_group(groups: dict[int, str]) -> dict[str, int]:
    """utime+stime of every live process, summed per component (pgid -> name)."""
    totals = dict.fromkeys(groups.values(), 0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pgid = int(fields[2])
        name = groups.get(pgid)
        if name is not None:
            totals[name] += int(fields[11]) + int(fields[12])
    return totals


def rss_by_group(groups: dict[int, str]) -> dict[str, list[float]]:
    """Resident memory (MB) of every live process, listed per component (pgid -> name)."""
    out: dict[str, list[float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        name = groups.get(int(stat[stat.rindex(")") + 2:].split()[2]))
        if name is None:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out.setdefault(name, []).append(round(int(line.split()[1]) / 1024, 1))
    return out


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_ticks() -> tuple[int, int]:
    """(busy, idle) jiffies of the whole machine from /proc/stat (idle includes iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values[:8]) - idle, idle


# ---- the benchmark -------------------------------------------------------------------------


@dataclass
class Bench:
    stack: Stack
    wrk: str
    duration: int
    connections: int
    script: Path
    groups: dict[int, str]

    def url(self, scenario: str) -> str:
        port = self.stack.bypass_port if scenario == "direct" else self.stack.port
        return f"http://127.0.0.1:{port}{PATH}"

    def run(
        self, scenario: str, mode: str, duration: int, script: Path | None = None,
        connections: int | None = None,
    ) -> WrkResult:
        if connections is None:
            connections = 1 if mode == "c1" else self.connections
        threads = 1 if mode == "c1" else min(2, connections)
        result = WrkResult(scenario, mode, threads, connections, duration)
        argv = [
            self.wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
            "-s", str(script or self.script), self.url(scenario),
        ]
        before, t0 = cpu_ticks_by_group(self.groups), time.monotonic()
        busy0, idle0 = machine_ticks()
        wrk_before = _children_cpu_s()
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 60, check=False
        )
        wrk_cpu_s = _children_cpu_s() - wrk_before  # wrk is the only child ending in between
        after, elapsed = cpu_ticks_by_group(self.groups), time.monotonic() - t0
        busy1, idle1 = machine_ticks()
        result.exit_code = proc.returncode
        parse_wrk(proc.stdout, result)
        result.cpu_pct = {
            name: round(100.0 * (after[name] - before[name]) / _clock_ticks() / elapsed, 1)
            for name in after
        }
        result.cpu_pct["wrk"] = round(100.0 * wrk_cpu_s / elapsed, 1)
        # Everything else that was busy: kernel network work (softirq) not charged to a process,
        # this script, and any other load on the machine (which makes the numbers unreliable).
        busy_pct = 100.0 * (busy1 - busy0) / _clock_ticks() / elapsed
        result.cpu_pct["other"] = round(max(0.0, busy_pct - sum(result.cpu_pct.values())), 1)
        result.cpu_pct["idle"] = round(100.0 * (idle1 - idle0) / _clock_ticks() / elapsed, 1)
        if not result.clean:
            sys.stderr.write(
                f"!! {scenario}/{mode}: {result.problems()}\n{proc.stdout}{proc.stderr}\n"
            )
        return result


def post(url: str, key: str, timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(
        url,
        data=json.dumps(BODY).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def create_key(redis_url: str) -> str:
    argv = [sys.executable, "-m", "extproc", "keys", "create", "bench", "--redis-url", redis_url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"keys create failed ({proc.returncode}):\n{proc.stderr}")
    return lines[-1].strip()


def wait_for_key(url: str, key: str) -> None:
    """The extproc picks up new keys on its config reload (up to ~1 s); wait for a 200."""
    deadline = time.monotonic() + KEY_READY_TIMEOUT_S
    status = 0
    while time.monotonic() < deadline:
        try:
            status, _ = post(url, key, timeout=2.0)
        except OSError:
            status = 0
        if status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"key not accepted through Envoy after {KEY_READY_TIMEOUT_S:.0f}s "
                       f"(last status {status})")


def check_paths(bench: Bench, key: str) -> dict[str, str]:
    """Make sure the benchmark measures what it says: cost headers only on the Tollgate path."""
    status, headers = post(bench.url("tollgate"), key)
    if status != 200 or COST_HEADER not in headers:
        raise RuntimeError(f"tollgate response: status {status}, no {COST_HEADER} header "
                           f"(headers: {sorted(headers)})")
    d_status, d_headers = post(bench.url("direct"), key)
    if d_status != 200 or COST_HEADER in d_headers:
        raise RuntimeError(f"direct response: status {d_status}, {COST_HEADER} present: "
                           f"{COST_HEADER in d_headers} (expected 200 and absent)")
    return {"tollgate_cost_header": headers[COST_HEADER]}


# Counters that should stay at zero on this path (a valid key, no limits, a healthy Redis): when
# they move, the run did not measure the normal path (e.g. Redis calls failing and settlements
# being journaled), whatever the status codes said.
TROUBLE_METRICS = (
    "tollgate_redis_errors_total",
    "tollgate_settlements_journaled_total",
    "tollgate_fail_open_total",
    "tollgate_unpriced_responses_total",
    "tollgate_limit_denials_total",
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", re.M)


def fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text: str = resp.read().decode()
    return text


def trouble_counters(text: str) -> dict[str, float]:
    """Non-zero samples of TROUBLE_METRICS and of non-"allowed" request decisions."""
    found: dict[str, float] = {}
    for name, labels, value in _SAMPLE.findall(text):
        bad = name in TROUBLE_METRICS or (
            name == "tollgate_requests_total" and 'decision="allowed"' not in labels
        )
        if bad and float(value) > 0:
            found[name + labels] = float(value)
    return found


def phase_means(text: str) -> dict[str, dict[str, float]]:
    """Mean microseconds per ext_proc message, by phase, from tollgate_phase_seconds."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    pattern = re.compile(r'^tollgate_phase_seconds_(sum|count)\{phase="([^"]+)"\}\s+(\S+)', re.M)
    for kind, phase, value in pattern.findall(text):
        (sums if kind == "sum" else counts)[phase] = float(value)
    return {
        phase: {"count": counts[phase], "mean_us": 1e6 * sums.get(phase, 0.0) / counts[phase]}
        for phase in counts
        if counts[phase] > 0
    }


# ---- reporting -----------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: list[WrkResult]) -> str:
    head = f"{'scenario':<10} {'run':<12} {'req/s':>9} {'p50':>8} {'p90':>8} {'p99':>8}  status"
    rows = [head, "-" * len(head)]
    for r in results:
        run = f"load c={r.connections}" if r.mode == "load" else "c=1"
        status = "ok" if r.clean else "ERRORS: " + r.problems()
        rows.append(f"{r.scenario:<10} {run:<12} {r.rps:>9.0f} {fmt_ms(r.p50_ms):>8} "
                    f"{fmt_ms(r.p90_ms):>8} {fmt_ms(r.p99_ms):>8}  {status}")
    return "\n".join(rows)


def cpu_us_per_request(r: WrkResult) -> dict[str, float]:
    """CPU microseconds per completed request, by component (not `idle`/`other`)."""
    skip = ("idle", "other")
    return {k: round(v * 1e4 / r.rps, 1) for k, v in r.cpu_pct.items() if k not in skip}


def derive(res: dict[str, WrkResult], trouble: dict[str, float] | None) -> dict[str, Any]:
    direct, toll = res["direct/load"], res["tollgate/load"]
    d1, t1 = res["direct/c1"], res["tollgate/c1"]
    pct = 100.0 * toll.rps / direct.rps if direct.rps else 0.0
    added = (t1.p50_ms - d1.p50_ms) if t1.p50_ms is not None and d1.p50_ms is not None else None
    clean = all(r.clean for r in res.values())
    checks = {
        f"tollgate req/s >= {TARGET_RPS:.0f}": toll.rps >= TARGET_RPS,
        f"tollgate >= {TARGET_PCT_OF_DIRECT:.0f}% of direct req/s": pct >= TARGET_PCT_OF_DIRECT,
        f"added p50 at c=1 <= {TARGET_ADDED_P50_MS:.0f} ms":
            added is not None and added <= TARGET_ADDED_P50_MS,
        "no errors / non-2xx in any run": clean,
        "extproc counters clean (no Redis errors, journaling, fail-open, denials)":
            trouble == {},
    }
    noisy = [k for k, r in res.items() if r.cpu_pct.get("other", 0.0) > NOISY_OTHER_PCT]
    return {
        "noisy_runs": noisy,
        "tollgate_pct_of_direct": round(pct, 1),
        "added_p50_c1_ms": None if added is None else round(added, 3),
        "checks": checks,
        "all_runs_clean": clean,
        "extproc_trouble": trouble,
    }


def goals(res: dict[str, WrkResult], extra: dict[str, Any],
          rss: dict[str, list[float]]) -> list[tuple[str, str, bool]]:
    """Issue 12's goals against this one run: (goal, what was measured, met). One run on a
    shared machine proves little either way (bench/README.md): the verdicts are printed so
    that a run is never read as meeting a goal it did not meet, and `--rounds` gives medians."""
    direct, direct1 = res["direct/load"], res["direct/c1"]

    def share(rps: float) -> float:
        return 100.0 * rps / direct.rps if direct.rps else 0.0

    out: list[tuple[str, str, bool]] = []
    key_only = share(res["tollgate/load"].rps)
    out.append((f"key-only path >= {GOAL_KEY_ONLY_PCT:.0f} % of Envoy direct",
                f"{key_only:.1f} %", key_only >= GOAL_KEY_ONLY_PCT))
    limits = extra.get("limits")
    if limits:
        pct = share(limits["limits/load"]["rps"])
        out.append((f"full limits path >= {GOAL_LIMITS_PCT:.0f} % of Envoy direct",
                    f"{pct:.1f} %", pct >= GOAL_LIMITS_PCT))
        p50, d50 = limits["limits/c1"]["p50_ms"], direct1.p50_ms
        if p50 is not None and d50 is not None:
            out.append((f"full limits path: added p50 at c=1 <= {GOAL_LIMITS_ADDED_P50_MS} ms",
                        f"{p50 - d50:.2f} ms", p50 - d50 <= GOAL_LIMITS_ADDED_P50_MS))
        allowed, refused = (limits["script_calls_per_allowed_request"],
                            limits["script_calls_per_refused_request"])
        out.append(("Redis round trips <= 2 per allowed request, 1 per refused one",
                    f"{allowed:.2f} / {refused:.2f}", allowed <= 2.05 and refused <= 1.05))
    stream = extra.get("streaming")
    if stream:
        ttfb = min(stream["added_ttfb_ms"], stream["passthrough_added_ttfb_ms"])
        out.append((f"streaming: added time to first byte <= {GOAL_STREAM_ADDED_TTFB_MS} ms",
                    f"held {stream['added_ttfb_ms']:.2f} ms, passthrough "
                    f"{stream['passthrough_added_ttfb_ms']:.2f} ms",
                    ttfb <= GOAL_STREAM_ADDED_TTFB_MS))
        chunk = min(stream["added_per_chunk_us"], stream["passthrough_added_per_chunk_us"])
        out.append((f"streaming: added per chunk <= {GOAL_STREAM_ADDED_PER_CHUNK_US:.0f} us",
                    f"held {stream['added_per_chunk_us']:.0f} us, passthrough "
                    f"{stream['passthrough_added_per_chunk_us']:.0f} us",
                    chunk <= GOAL_STREAM_ADDED_PER_CHUNK_US))
    extproc = sorted(rss.get("extproc", []))
    workers = extproc[1:] if len(extproc) > 1 else extproc  # the smallest: the supervisor
    if workers:
        out.append((f"extproc RSS <= {GOAL_WORKER_RSS_MB:.0f} MB per worker under load",
                    ", ".join(f"{v:.0f} MB" for v in workers),
                    max(workers) <= GOAL_WORKER_RSS_MB))
    return out


def print_goals(verdicts: list[tuple[str, str, bool]]) -> None:
    print("\nissue 12 goals, this run (one run swings; see bench/README.md for medians):")
    for name, measured, met in verdicts:
        print(f"  {'met ' if met else 'MISS'}  {name}: {measured}")


def print_report(res: dict[str, WrkResult], derived: dict[str, Any]) -> None:
    print()
    print("latency in ms")
    print(table(list(res.values())))
    print()
    added = derived["added_p50_c1_ms"]
    print(f"tollgate req/s as % of direct (load): {derived['tollgate_pct_of_direct']:.1f}%")
    print(f"added p50 at c=1 (tollgate - direct): "
          f"{'-' if added is None else f'{added:.2f}'} ms")
    for name, ok in derived["checks"].items():
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    print()
    print(f"CPU during load runs (% of one core; {100 * (os.cpu_count() or 1)}% = the whole "
          "machine; other = kernel softirq + anything else running):")
    for r in res.values():
        if r.mode == "load":
            parts = ", ".join(f"{k} {v:.0f}%" for k, v in r.cpu_pct.items())
            print(f"  {r.scenario:<9} {parts}")
    print("CPU time per request during load runs (us; steadier than req/s on a shared box):")
    for r in res.values():
        if r.mode == "load" and r.rps:
            parts = ", ".join(f"{k} {us:.0f}" for k, us in cpu_us_per_request(r).items())
            print(f"  {r.scenario:<9} {parts}")
    if derived["extproc_trouble"]:
        print("WARNING: extproc counters that should be zero moved (see the extproc log):")
        for name, value in derived["extproc_trouble"].items():
            print(f"  {name} = {value:.0f}")
    if derived["noisy_runs"]:
        print(f"WARNING: other load on the machine during {', '.join(derived['noisy_runs'])} "
              f"(other > {NOISY_OTHER_PCT:.0f}% of a core): numbers are less reliable; rerun "
              "on a quiet machine")


def print_phases(phases: dict[str, dict[str, float]]) -> None:
    print()
    print("extproc time per ext_proc message (tollgate_phase_seconds, all requests of this run):")
    if not phases:
        print("  (no samples)")
    for phase, v in phases.items():
        print(f"  {phase:<18} mean {v['mean_us']:8.1f} us   count {v['count']:.0f}")
    if phases:
        total = sum(v["mean_us"] for v in phases.values())
        print(f"  {'sum of means':<18}      {total:8.1f} us per request")


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark Envoy direct vs. through Tollgate (fake upstream, loopback only)."
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run (10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections, load run (32)")
    p.add_argument("--workers", type=int, default=2, help="extproc worker processes (2)")
    p.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads (2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--rounds", type=int, default=0, metavar="N",
                   help="only the full limits path: N alternating load runs with Envoy direct, "
                        "CPU per request by component, medians (bench/README.md)")
    p.add_argument("--quick", action="store_true",
                   help="only direct vs tollgate (skip limits, refusals and streaming)")
    args = p.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.workers < 1 or args.envoy_concurrency < 1:
        p.error("--duration, --connections, --workers and --envoy-concurrency must be >= 1")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally that stops the stack


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found: install it (Debian: apt-get install wrk) or use `make bench`",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    redis_url = os.environ.get("REDIS_URL") or None
    transport = os.environ.get("TOLLGATE_GRPC_TRANSPORT") or "native"
    busy_poll = os.environ.get("TOLLGATE_BUSY_POLL_US") or "0"
    print(f"starting stack (workers={args.workers}, envoy concurrency={args.envoy_concurrency}, "
          f"gRPC transport={transport}, redis={'$REDIS_URL' if redis_url else 'embedded'}, "
          f"busy poll={busy_poll} us; logs in {log_dir}) ...", flush=True)
    # A journal of this run's own: never adopt settlements another stack left in the shared default
    # directory (they belong to another Redis), nor leave ours for the next `tollgate up`.
    env = dict(os.environ, TOLLGATE_JOURNAL_DIR=str(log_dir / "journal"))
    # Passthrough streams on: only streams whose client asked for usage itself pass through
    # (the streaming section measures both kinds); nothing else changes.
    env.setdefault("TOLLGATE_STREAM_PASSTHROUGH", "true")
    try:
        stack = start_stack(
            log_dir=log_dir,
            env=env,
            port=free_port(),
            redis_url=redis_url,
            mock_upstream=True,
            bypass=True,
            workers=args.workers,
            envoy_concurrency=args.envoy_concurrency,
        )
    except StartupError as exc:
        print(f"bench: the stack did not start: {exc}", file=sys.stderr)
        return 2
    try:
        return run_bench(args, stack, wrk, log_dir, redis_url)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"bench failed: {exc}\nlogs in {log_dir}; extproc log tail:", file=sys.stderr)
        extproc = next((p for p in stack.processes if p.name == "extproc"), None)
        if extproc is not None:
            print(extproc.log_tail(15), file=sys.stderr)
        return 2
    finally:
        stack.stop()


def environment(stack: Stack, wrk: str) -> str:
    """One line naming what was measured on: cores, OS, and the versions of every part."""
    import redis as redis_sync

    from extproc.launch import envoy_binary

    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0].strip() if lines else "?"

    envoy = first_line([envoy_binary(), "--version"]).split("version:")[-1].strip()
    wrk_version = first_line([wrk, "--version"]).split(" [")[0]
    info = redis_sync.Redis.from_url(stack.redis_url).info("server")
    return (f"{os.cpu_count()} cores, {platform.platform()}, Python "
            f"{platform.python_version()}, Envoy {envoy.split('/')[1] if '/' in envoy else envoy}, "
            f"Redis protocol server {info.get('redis_version')}, {wrk_version}")


def run_bench(
    args: argparse.Namespace, stack: Stack, wrk: str, log_dir: Path, redis_url: str | None
) -> int:
    print(f"environment: {environment(stack, wrk)}", flush=True)
    key = create_key(stack.redis_url)
    groups = {p.pid: p.name for p in stack.processes}
    bench = Bench(stack, wrk, args.duration, args.connections,
                  write_lua_script(log_dir / "post.lua", json.dumps(BODY).encode(),
                                   {"Content-Type": "application/json",
                                    "Authorization": f"Bearer {key}"}),
                  groups)
    wait_for_key(bench.url("tollgate"), key)
    check = check_paths(bench, key)
    print(f"paths checked: tollgate adds {COST_HEADER}: {check['tollgate_cost_header']}, "
          "direct does not", flush=True)

    if args.rounds:
        import extended

        summary = extended.run_rounds(bench, stack, args.duration, log_dir, args.rounds)
        metrics_text = fetch_metrics(f"http://127.0.0.1:{stack.extproc.http}/metrics")
        print_phases(phase_means(metrics_text))
        trouble = trouble_counters(metrics_text)
        trouble = {k: v for k, v in trouble.items() if "limit_denials" not in k
                   and 'decision="denied"' not in k}  # the blocked key of the setup check
        if trouble:
            print(f"WARNING: extproc counters moved: {trouble}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return 0 if not trouble else 1

    results: dict[str, WrkResult] = {}
    for scenario in ("direct", "tollgate"):
        print(f"{scenario}: warm-up {WARMUP_S}s ...", flush=True)
        bench.run(scenario, "load", WARMUP_S)
        for mode in ("load", "c1"):
            print(f"{scenario}: {mode} run {args.duration}s ...", flush=True)
            results[f"{scenario}/{mode}"] = bench.run(scenario, mode, args.duration)
    rss = rss_by_group(groups)  # after the load runs: what the workers grew to under load
    dead = stack.dead()
    if dead:
        raise RuntimeError(f"{dead[0].name} died during the run:\n{dead[0].log_tail()}")

    try:
        metrics_text: str | None = fetch_metrics(f"http://127.0.0.1:{stack.extproc.http}/metrics")
    except OSError as exc:
        print(f"\ncould not read extproc /metrics: {exc}")
        metrics_text = None
    trouble = trouble_counters(metrics_text) if metrics_text is not None else None
    derived = derive(results, trouble)
    print_report(results, derived)
    phases = phase_means(metrics_text) if metrics_text is not None else {}
    print_phases(phases)
    print("\nRSS after the load runs (MB per process; extproc = supervisor + workers):")
    for name, values in rss.items():
        print(f"  {name:<14} {', '.join(f'{v:.0f}' for v in sorted(values))}")

    # Issues 3 and 4: the full limits path, refusals, and streaming (bench/extended.py).
    import extended

    extra = {} if args.quick else extended.run_all(bench, stack, args.duration, log_dir)
    verdicts = goals(results, extra, rss)
    print_goals(verdicts)

    if args.json:
        doc = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine()},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "config": {"duration_s": args.duration, "connections": args.connections,
                       "workers": args.workers,
                       "envoy_concurrency": args.envoy_concurrency,
                       "grpc_transport": os.environ.get("TOLLGATE_GRPC_TRANSPORT") or "native",
                       "busy_poll_us": int(os.environ.get("TOLLGATE_BUSY_POLL_US") or 0),
                       "redis": "REDIS_URL" if redis_url else "embedded"},
            "results": {k: {**asdict(r), "clean": r.clean} for k, r in results.items()},
            "derived": derived,
            "phases_us": phases,
            "rss_mb": rss,
            "cpu_us_per_request": {k: cpu_us_per_request(r) for k, r in results.items()
                                   if r.mode == "load" and r.rps},
            "extended": extra,
            "goals": [{"goal": name, "measured": measured, "met": met}
                      for name, measured, met in verdicts],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if derived["all_runs_clean"] and derived["extproc_trouble"] == {} else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
