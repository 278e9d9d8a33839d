"""How Tollgate's costs grow with the amount of configuration and with limits per request.

In-process, against its own Redis (started here, loopback only), with Tollgate's real store,
config watcher, key directory and ext_proc servicer (driven with the messages Envoy sends; no
Envoy, no gRPC, so the numbers are Tollgate's own work):

  keys     10 / 1k / 100k virtual keys: apply time, snapshot load time and the longest the
           event loop stalled during it, reload time after one change, RSS growth of the
           process, key lookup time (KeyDirectory.resolve)
  limits   1 / 10 / 100 Block limits applying to one request: request latency through the
           servicer, Redis time per reserve
  stored   1k / 100k Limit resources stored (none applying to the request): apply time, load
           time, reload time after one of them changed, request latency (does limit matching
           scan them all?)

Checks that it measures the intended path (every request allowed, the reserve carries the
number of limits asked for) and refuses to report a table with errors. Prints the environment.

    .venv/bin/python bench/scale.py [--max-keys 100000] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis as redis_sync

from extproc.core.exchange import Options
from extproc.core.keys import generate_key, hash_key
from extproc.core.resources import validate_document
from extproc.launch import start_redis
from extproc.server.processor import Processor
from extproc.server.settlement import Settler
from extproc.server.state import ConfigWatcher, KeyDirectory
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import Store, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server.test_admission import Stream, body, headers  # the messages Envoy sends

# 100k resources do not load within the default 1 s Redis timeout (TOLLGATE_REDIS_TIMEOUT_MS)
# on a busy 2-core machine: reading and parsing the reply alone takes about that long.
LOAD_TIMEOUT_S = 30.0


def doc(kind: str, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": spec}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def apply_batched(store: Store, docs: list[dict[str, object]], batch: int = 5000) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(docs), batch):
        await store.apply([validate_document(d) for d in docs[i:i + batch]])
    return time.perf_counter() - t0


async def timed_reload(watcher: ConfigWatcher) -> float:
    return (await stalled_reload(watcher))[0]


async def stalled_reload(watcher: ConfigWatcher) -> tuple[float, float]:
    """Seconds the reload took, and the longest the event loop went without running anything
    else meanwhile (a ticker that wants to run every millisecond): what requests wait."""
    stall = 0.0
    done = False

    async def tick() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall, last = max(stall, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.005)  # the ticker is running
    t0 = time.perf_counter()
    await watcher.reload()
    elapsed = time.perf_counter() - t0
    done = True
    await ticker
    return elapsed, stall


async def keys_row(url: str, tmp: Path, n: int) -> dict[str, Any]:
    store = Store.from_url(url, "scale-" + uuid.uuid4().hex[:8], LOAD_TIMEOUT_S)
    try:
        keys = [generate_key() for _ in range(n)]
        apply_s = await apply_batched(store, [
            doc("VirtualKey", f"k{i}", {"keySha256": hash_key(k)}) for i, k in enumerate(keys)])
        watcher = ConfigWatcher(store, str(tmp), 1.0)
        rss0 = rss_mb()
        load_s, stall_s = await stalled_reload(watcher)
        rss1 = rss_mb()
        await store.apply([validate_document(doc("VirtualKey", "k0", {
            "keySha256": hash_key(keys[0]), "tags": ["changed"]}))])
        reload_s = await timed_reload(watcher)
        directory = KeyDirectory(store)
        snapshot = watcher.snapshot
        assert snapshot is not None
        from extproc.core.keys import find_key
        sample = [find_key({"authorization": f"Bearer {k}"}) for k in keys[:: max(1, n // 1000)]]
        t0 = time.perf_counter()
        found = 0
        for presented in sample:
            assert presented is not None
            found += await directory.resolve(snapshot, presented) is not None
        lookup_us = (time.perf_counter() - t0) / len(sample) * 1e6
        if found != len(sample):
            raise RuntimeError(f"{n} keys: {len(sample) - found} lookups failed")
        return {"keys": n, "apply_s": apply_s, "load_s": load_s, "stall_ms": stall_s * 1000,
                "reload_s": reload_s,
                "rss_mb": rss1 - rss0, "lookup_us": lookup_us}
    finally:
        await store.close()


async def request_latency(url: str, tmp: Path, limits: int, stored: int,
                          requests: int) -> dict[str, Any]:
    """Median latency of one request through the servicer (request phases), with `limits`
    Block limits applying to it and `stored` Limit resources that do not."""
    store = Store.from_url(url, "scale-" + uuid.uuid4().hex[:8], LOAD_TIMEOUT_S)
    hot = connect(url, 1.0)
    quota = QuotaStore(hot, store.keys, 1000, background=store.redis)
    settler = Settler(quota, str(tmp / ("journal-" + uuid.uuid4().hex[:6])))
    settle_task = asyncio.create_task(settler.run())
    try:
        key = generate_key()
        docs = [doc("VirtualKey", "app", {"keySha256": hash_key(key)})]
        docs += [doc("Limit", f"on{i}", {"type": "Block", "max": 1_000_000,
                                        "selector": {"keys": ["app"]}}) for i in range(limits)]
        docs += [doc("Limit", f"other{i}", {"type": "Block", "max": 1_000_000,
                                           "selector": {"keys": [f"nobody{i}"]}})
                 for i in range(stored)]
        apply_s = await apply_batched(store, docs)
        watcher = ConfigWatcher(store, str(tmp), 1.0)
        reload_s = await timed_reload(watcher)
        change_s = 0.0
        if stored:  # one stored Limit changed: does the reload re-read the others?
            await store.apply([validate_document(doc("Limit", "other0", {
                "type": "Block", "max": 2_000_000, "selector": {"keys": ["nobody0"]}}))])
            change_s = await timed_reload(watcher)
            assert watcher.snapshot is not None
            changed = [s for s in watcher.snapshot.limits if s.name == "other0"]
            if len(changed) != 1 or changed[0].max_nanos != 2_000_000 * 10**9:
                raise RuntimeError(f"the changed Limit was not reloaded: {changed}")
        processor = Processor(watcher, KeyDirectory(store), quota, settler, Options())
        reserve_s: list[float] = []
        planned: list[int] = []
        original = quota.reserve

        async def timed_reserve(plan: Any, base: bytes) -> Any:
            planned.append(len(plan.limits))
            t0 = time.perf_counter()
            try:
                return await original(plan, base)
            finally:
                reserve_s.append(time.perf_counter() - t0)

        quota.reserve = timed_reserve  # type: ignore[method-assign]
        latencies = []
        for i in range(requests + 20):
            stream = Stream(processor)
            t0 = time.perf_counter()
            await stream.send(headers(key))
            reply = await stream.send(body())
            elapsed = time.perf_counter() - t0
            await stream.close()
            if not reply.HasField("request_body"):
                raise RuntimeError(f"request refused: {reply}")
            if i >= 20:  # warm-up excluded
                latencies.append(elapsed)
        if limits and set(planned) != {limits}:
            raise RuntimeError(f"reserve carried {set(planned)} limits, not {limits}")
        return {"limits": limits, "stored": stored, "apply_s": apply_s, "reload_s": reload_s,
                "change_s": change_s,
                "p50_ms": statistics.median(latencies) * 1000,
                "reserve_ms": statistics.median(reserve_s[20:]) * 1000 if reserve_s else 0.0}
    finally:
        await settler.close(timeout=5)
        settle_task.cancel()
        await hot.aclose()
        await store.close()


async def run(args: argparse.Namespace, url: str, tmp: Path) -> None:
    sizes = [n for n in (10, 1_000, 100_000) if n <= args.max_keys]
    print("\nvirtual keys")
    print(f"{'keys':>8}{'apply s':>10}{'load s':>10}{'stall ms':>10}{'reload s':>10}"
          f"{'RSS +MB':>9}{'lookup us':>11}")
    for n in sizes:
        r = await keys_row(url, tmp, n)
        print(f"{n:>8}{r['apply_s']:>10.3f}{r['load_s']:>10.3f}{r['stall_ms']:>10.1f}"
              f"{r['reload_s']:>10.3f}"
              f"{r['rss_mb']:>9.1f}{r['lookup_us']:>11.2f}", flush=True)
    print("\nlimits applying to one request (request phases through the servicer)")
    print(f"{'limits':>8}{'p50 ms':>10}{'reserve ms':>12}")
    for n in (1, 10, 100):
        r = await request_latency(url, tmp, n, 0, args.requests)
        print(f"{n:>8}{r['p50_ms']:>10.3f}{r['reserve_ms']:>12.3f}", flush=True)
    print("\nLimit resources stored (one applies to the request)")
    print(f"{'stored':>8}{'apply s':>10}{'load s':>10}{'change s':>10}{'p50 ms':>10}"
          f"{'reserve ms':>12}")
    for n in (1_000, 100_000):
        if n > args.max_keys:
            continue
        r = await request_latency(url, tmp, 1, n, args.requests)
        print(f"{n:>8}{r['apply_s']:>10.3f}{r['reload_s']:>10.3f}{r['change_s']:>10.3f}"
              f"{r['p50_ms']:>10.3f}"
              f"{r['reserve_ms']:>12.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-keys", type=int, default=100_000,
                   help="largest key / stored-limit count (100000)")
    p.add_argument("--requests", type=int, default=300, help="requests per latency row (300)")
    args = p.parse_args(argv)
    if not 10 <= args.max_keys <= 100_000 or not 10 <= args.requests <= 10_000:
        p.error("--max-keys 10..100000, --requests 10..10000")
    os.environ.setdefault("OPENAI_API_KEY", "sk-scale-bench")  # the upstream credential
    import logging

    logging.basicConfig(level=logging.ERROR)  # no client address here (no Envoy): expected
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-scale-"))
    server, url = start_redis(tmp, prefer_embedded=True)
    try:
        info = redis_sync.Redis.from_url(url).info("server")
        print(f"{os.cpu_count()} cores, {platform.platform()}, Python "
              f"{platform.python_version()}, Redis protocol server {info.get('redis_version')}; "
              f"{args.requests} requests per latency row; logs in {tmp}")
        asyncio.run(run(args, url, tmp))
    except RuntimeError as exc:
        print(f"scale: not reported, the run had errors: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
