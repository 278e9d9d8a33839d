"""Redis Cluster vs one Redis node: where Tollgate's Redis work lands, and what spreads it.

Every key of one Tollgate deployment shares one hash tag (`tg:{<tag>}:...`, set with
TOLLGATE_REDIS_TAG), so each reserve/settle script touches one slot and runs unchanged on a
Cluster. The price: one deployment's Redis work all lands on the node that owns that slot. A
Cluster then adds capacity only across tags — one tag per tenant (per team, per namespace's
gateway) — which is what this benchmark shows.

Three runs of the full limits path (an RPM + TPM RateLimit, a Block and an Allow Limit applying
to every request; reserve on the request path, settle after the response), each for
`--duration` seconds, with `--procs` client processes driving Tollgate's real servicer
in-process (the messages Envoy sends, no Envoy and no gRPC: this measures the Redis tier):

  single   one standalone Redis, one tag
  cluster  a 3-node Redis Cluster, one tag           (every script on one node)
  tenants  the same Cluster, three tags (one per process group; chosen to hash to three
           different nodes)

For each run: requests/s, and per Redis node its CPU seconds and script calls. The request
rate on this 2-core machine is bounded by the Python clients, not by Redis; the per-node
columns are the result: with one tag one node does all the work whatever the Cluster's size,
with one tag per tenant the work spreads. `node capacity` is 1 s divided by the Redis CPU time
per request on the busiest node: the request rate at which that node would be saturated.

Checks that every request was allowed and settled (no errors), else reports nothing.

    .venv/bin/python bench/cluster.py [--duration 10] [--procs 2] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis as redis_sync
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server.test_observability import _headers  # the messages Envoy sends

BODY = orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 16,
                     "messages": [{"role": "user", "content": "Say hello"}]})
ANSWER = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello!"}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})


def _doc(kind: str, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": spec}


def configure(url: str, tag: str) -> str:
    """A virtual key and the limits of the full limits path under `tag`; returns the key."""
    from extproc.core.keys import generate_key, hash_key
    from extproc.core.resources import validate_document
    from extproc.store.redis_store import Store

    async def go() -> str:
        store = Store.from_url(url, tag, 5.0)
        key = generate_key()
        sel = {"keys": ["bench"]}
        await store.apply([validate_document(d) for d in (
            _doc("VirtualKey", "bench", {"keySha256": hash_key(key)}),
            _doc("RateLimit", "rates", {"per": "key", "selector": sel,
                                        "requestsPerMinute": 100_000_000,
                                        "tokensPerMinute": 1_000_000_000}),
            _doc("Limit", "block", {"type": "Block", "max": 1_000_000, "period": "month",
                                    "selector": sel}),
            _doc("Limit", "allow", {"type": "Allow", "max": 1_000_000, "period": "day",
                                    "selector": sel}),
        )])
        await store.close()
        return key

    return asyncio.run(go())


def client(url: str, tag: str, key: str, duration: float, concurrency: int, journal: str,
           out: Any) -> None:
    """One client process: `concurrency` request loops through the servicer for `duration`."""
    os.environ.setdefault("OPENAI_API_KEY", "sk-cluster-bench")
    import logging

    logging.basicConfig(level=logging.ERROR)
    from extproc.core.exchange import Options
    from extproc.server.processor import Processor
    from extproc.server.settlement import Settler
    from extproc.server.state import ConfigWatcher, KeyDirectory
    from extproc.store.quota_store import QuotaStore
    from extproc.store.redis_store import Store, connect, ready

    async def go() -> tuple[int, int, float]:
        store = Store.from_url(url, tag, 5.0)
        hot = connect(url, 1.0)
        for redis_client in (hot, store.redis):  # as the worker does before serving
            await ready(redis_client)
        quota = QuotaStore(hot, store.keys, 1000, background=store.redis)
        settler = Settler(quota, journal)
        settling = asyncio.create_task(settler.run())
        watcher = ConfigWatcher(store, journal, 1.0)
        await watcher.reload()
        processor = Processor(watcher, KeyDirectory(store), quota, settler, Options())
        messages = [
            ep.ProcessingRequest(request_headers=_headers({
                ":path": "/v1/chat/completions", ":method": "POST",
                "content-type": "application/json", "authorization": f"Bearer {key}"})),
            ep.ProcessingRequest(request_body=ep.HttpBody(body=BODY, end_of_stream=True)),
            ep.ProcessingRequest(response_headers=_headers({
                ":status": "200", "content-type": "application/json"})),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=ANSWER, end_of_stream=True)),
        ]
        done = refused = 0
        started = time.monotonic()
        stop = started + duration

        async def feed() -> Any:
            for message in messages:
                yield message

        async def loop() -> None:
            nonlocal done, refused
            while time.monotonic() < stop:
                replies = [r async for r in processor.Process(feed(), None)]
                if len(replies) != 4 or replies[0].HasField("immediate_response") or \
                        replies[1].HasField("immediate_response"):
                    refused += 1
                else:
                    done += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        settling.cancel()  # as the worker does: stop the background flush, then flush once
        await settler.close(timeout=10)
        refused += len(settler.journal)  # settlements Redis did not take
        await hot.aclose()
        await store.close()
        return done, refused, elapsed

    out.put(asyncio.run(go()))


def node_stats(ports: list[int]) -> dict[int, tuple[float, int]]:
    """Per node: CPU seconds (user + sys) and script calls (EVAL/EVALSHA/FCALL) so far."""
    stats = {}
    for port in ports:
        r = redis_sync.Redis(host="127.0.0.1", port=port)
        cpu = r.info("cpu")
        calls = sum(int(v.get("calls", 0)) for k, v in r.info("commandstats").items()
                    if k.split("|")[0] in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"))
        stats[port] = (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls)
        r.close()
    return stats


def tags_on_distinct_nodes(ports: list[int]) -> list[str]:
    """Three tags whose slots belong to three different nodes of the Cluster."""
    r = redis_sync.Redis(host="127.0.0.1", port=ports[0])
    ranges = [(lo, hi, int(p[1])) for lo, hi, p, *_ in r.execute_command("CLUSTER SLOTS")]
    chosen: dict[int, str] = {}
    for i in range(10_000):
        tag = f"tenant{i}"
        slot = int(r.execute_command("CLUSTER KEYSLOT", f"{{{tag}}}"))
        node = next(p for lo, hi, p in ranges if lo <= slot <= hi)
        chosen.setdefault(node, tag)
        if len(chosen) == len(ports):
            break
    r.close()
    return [chosen[p] for p in ports]


def run(name: str, url: str, ports: list[int], tags: list[str], args: argparse.Namespace,
        tmp: Path) -> dict[str, Any]:
    keys = {tag: configure(url, tag) for tag in tags}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    before = node_stats(ports)
    procs = []
    for i in range(args.procs):
        tag = tags[i % len(tags)]
        journal = str(tmp / f"{name}-{i}-{uuid.uuid4().hex[:6]}")
        procs.append(ctx.Process(target=client, args=(
            url, tag, keys[tag], args.duration, args.concurrency, journal, out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=args.duration + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    after = node_stats(ports)
    done = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    if refused or not done:
        raise RuntimeError(f"{name}: {refused} requests refused or unsettled, {done} done")
    nodes = {p: (after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in ports}
    rps = sum(r[0] / r[2] for r in results)  # each process's own measured span (no start-up)
    return {"name": name, "tags": len(tags), "requests": done, "rps": rps,
            "nodes": nodes}


def report(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'run':<9}{'tags':>5}{'req/s':>9}   per node: Redis CPU s / script calls"
          f"{'':>6}{'busiest node':>14}{'node capacity':>15}")
    for row in rows:
        cells = "  ".join(f"{cpu:6.2f}s/{calls:>7}" for cpu, calls in row["nodes"].values())
        busiest_cpu = max(cpu for cpu, _ in row["nodes"].values())
        total_cpu = sum(cpu for cpu, _ in row["nodes"].values()) or 1e-9
        share = busiest_cpu / total_cpu * 100
        capacity = row["requests"] / busiest_cpu if busiest_cpu else 0.0
        print(f"{row['name']:<9}{row['tags']:>5}{row['rps']:>9.0f}   {cells:<46}"
              f"{share:>12.0f} %{capacity:>13,.0f}/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    p.add_argument("--procs", type=int, default=3, help="client processes (3)")
    p.add_argument("--concurrency", type=int, default=16, help="request loops per process (16)")
    args = p.parse_args(argv)
    if not 1 <= args.duration <= 120 or not 1 <= args.procs <= 16:
        p.error("--duration 1..120, --procs 1..16")
    from extproc.launch import start_redis
    from tests.conftest import _start_cluster

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-cluster-"))
    single, single_url = start_redis(tmp / "single", prefer_embedded=False)
    cluster, cluster_url = _start_cluster(tmp)
    try:
        single_port = int(single_url.rsplit(":", 1)[1].split("/")[0])
        cluster_ports = [int(c.name.split("-")[1]) for c in cluster]  # type: ignore[attr-defined]
        info = redis_sync.Redis(host="127.0.0.1", port=single_port).info("server")
        print(f"{os.cpu_count()} cores, {platform.platform()}, Python "
              f"{platform.python_version()}, Redis {info.get('redis_version')}; "
              f"{args.procs} client processes x {args.concurrency} loops, {args.duration:g} s per "
              f"run; logs in {tmp}")
        tenants = tags_on_distinct_nodes(cluster_ports)
        rows = [
            run("single", single_url, [single_port], ["bench"], args, tmp),
            run("cluster", cluster_url, cluster_ports, ["bench"], args, tmp),
            run("tenants", cluster_url, cluster_ports, tenants, args, tmp),
        ]
        report(rows)
    except RuntimeError as exc:
        print(f"cluster: not reported, the run had errors: {exc}", file=sys.stderr)
        return 1
    finally:
        single.stop()
        for proc in cluster:
            proc.stop()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
