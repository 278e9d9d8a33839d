"""What a streamed chunk waits on each way through, and what each way costs per chunk: five
paths over one stack (Tollgate with TOLLGATE_STREAM_PASSTHROUGH=true, the fake upstream, Redis)
and two more Envoys on the same extproc, alternating for --rounds:

  direct       the bypass listener: Envoy straight to the fake upstream
  held         Tollgate, a stream that needs a rewrite (no include_usage): every chunk goes
               through the extproc and waits for its reply
  passthrough  Tollgate, the same stream with include_usage: chunks go straight on, the
               observer filter (observability mode) sends the extproc a copy of each
  no-observer  a second Envoy whose bootstrap lacks the observer filter: the chunks pass and
               nothing meters them (the floor; never a configuration to run: such calls are
               charged their estimate once no observer claims them)
  lua          a third Envoy where a Lua filter stands in for the observer, reading every chunk
               as it passes (`bodyChunks()`) and keeping a head and a rolling tail of the stream:
               the per-chunk work a meter inside Envoy would do before one report per call
               (only that part: nothing is reported, so these calls are charged their estimate
               too)

Per path and round: time to first byte, the median transit of every event after a stream's
first (the fake upstream stamps its send time into the event, `x-mock-stamp`; one clock), and
the CPU time per event of the extproc and of the Envoy serving that path (`/proc`, 100 Hz
ticks). Loopback only; every process started here is stopped by its PID.

    .venv/bin/python bench/stream_paths.py [--rounds 3] [--streams 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import httpx
from extended import _stream_once

from bench import PATH
from extproc import envoyconf
from extproc.launch import Managed, free_port, start_envoy, start_stack

# The per-chunk work of a meter inside Envoy: read each chunk as it passes, keep the first
# 4 KB (Anthropic's message_start) and a rolling tail (the usage events), leave them for a
# report at the end. Only for responses the extproc marked passthrough.
LUA_METER = """
function envoy_on_response(handle)
  if handle:headers():get("x-tollgate-stream") ~= "passthrough" then return end
  local head, tail = "", ""
  for chunk in handle:bodyChunks() do
    local s = chunk:getBytes(0, chunk:length())
    if #head < 4096 then head = head .. s end
    tail = tail .. s
    if #tail > 16384 then tail = string.sub(tail, -8192) end
  end
  handle:streamInfo():dynamicMetadata():set("tollgate.meter", "tail", tail)
end
"""

PATHS = ("direct", "held", "passthrough", "no-observer", "lua")


def _process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _cpu_us(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(stat[11]) + int(stat[12])
    return ticks * 1e6 / os.sysconf("SC_CLK_TCK")


def _variant(stack: Any, log_dir: Path, name: str) -> tuple[int, Managed]:
    """Another Envoy on the stack's extproc, its observer filter removed or replaced."""
    admin, port = free_port(), free_port()
    config = envoyconf.render_bootstrap(
        clusters=envoyconf.mock_clusters("127.0.0.1", stack.mock_port),
        listen_port=port, admin_port=admin, extproc_port=stack.extproc.grpc)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    filters = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.match_delegate"]
    if name == "lua":
        filters.insert(0, {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA_METER}}})
    hcm["http_filters"] = filters
    return port, start_envoy(log_dir / name, config, admin, concurrency=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", type=int, default=40, help="streams per path and round (40)")
    args = p.parse_args(argv)
    if not (1 <= args.rounds <= 10 and 10 <= args.streams <= 500):
        p.error("--rounds 1..10, --streams 10..500")
    log_dir = Path(tempfile.mkdtemp(prefix="tollgate-stream-paths-"))
    env = dict(os.environ, TOLLGATE_STREAM_PASSTHROUGH="true",
               TOLLGATE_JOURNAL_DIR=str(log_dir / "journal"))
    print(f"{os.cpu_count()} cores; {args.rounds} rounds x {args.streams} streams of 50 events "
          f"per path; logs in {log_dir}", flush=True)
    stack = start_stack(log_dir=log_dir, env=env, port=free_port(), mock_upstream=True,
                        bypass=True, workers=2, envoy_concurrency=2)
    variants: dict[str, tuple[int, Managed]] = {}
    try:
        key = subprocess.run(
            [sys.executable, "-m", "extproc", "keys", "create", "stream-paths",
             "--redis-url", stack.redis_url],
            capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
        for name in ("no-observer", "lua"):
            variants[name] = _variant(stack, log_dir, name)
        pids = {proc.name: proc.pid for proc in stack.processes}
        extproc = _process_tree(pids["extproc"])
        ports = {"direct": stack.bypass_port, "held": stack.port, "passthrough": stack.port,
                 **{name: port for name, (port, _proc) in variants.items()}}
        envoys = {"no-observer": variants["no-observer"][1].pid, "lua": variants["lua"][1].pid}
        rows: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
        for round_ in range(args.rounds):
            for path in PATHS:
                url = f"http://127.0.0.1:{ports[path]}{PATH}"
                with_usage = path not in ("direct", "held")
                envoy = [envoys.get(path, pids["envoy"])]
                with httpx.Client() as client:
                    for _ in range(5):
                        _stream_once(client, url, key, with_usage)  # warm-up
                    x0, e0 = _cpu_us(extproc), _cpu_us(envoy)
                    samples = [_stream_once(client, url, key, with_usage)
                               for _ in range(args.streams)]
                    x1, e1 = _cpu_us(extproc), _cpu_us(envoy)
                events = sum(s[2] for s in samples)
                later = [t for s in samples for t in s[3][1:]]
                rows[path].append({
                    "ttfb_ms": statistics.median(s[0] for s in samples) * 1000,
                    "transit_us": statistics.median(later) / 1000,
                    "extproc_us": (x1 - x0) / events, "envoy_us": (e1 - e0) / events})
                r = rows[path][-1]
                print(f"  round {round_ + 1} {path:<12} TTFB {r['ttfb_ms']:5.2f} ms, chunk "
                      f"transit {r['transit_us']:4.0f} us; CPU per event: extproc "
                      f"{r['extproc_us']:4.0f} us, Envoy {r['envoy_us']:4.0f} us", flush=True)
    finally:
        for _port, proc in variants.values():
            proc.stop()
        stack.stop()
    print(f"\nmedians of {args.rounds} rounds")
    print(f"{'path':<13}{'TTFB ms':>9}{'transit us':>12}{'added us':>10}{'extproc us':>12}"
          f"{'Envoy us':>10}")
    direct = statistics.median(r["transit_us"] for r in rows["direct"])
    for path in PATHS:
        med = {k: statistics.median(r[k] for r in rows[path]) for k in rows[path][0]}
        print(f"{path:<13}{med['ttfb_ms']:>9.2f}{med['transit_us']:>12.0f}"
              f"{med['transit_us'] - direct:>10.0f}{med['extproc_us']:>12.0f}"
              f"{med['envoy_us']:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
