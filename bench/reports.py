"""Report speed: `tollgate usage --by ...` over N hours of rolled-up usage, against the raw-stream
scan it replaces.

Starts its own Redis (127.0.0.1, a free port), writes `--events` usage events spread evenly over
`--hours` hours through the real settle script (QuotaStore.settle_many, pipelined, so the
rollups are exactly what production writes), then times:

* report: the CLI's own code path (Store.read_rollups + rollup.aggregate) for `--by key,model`
  and `--by tag` over all hours, best of 3;
* dashboard: the built-in dashboard's summary (`read_summary`) for each of its ranges, best of 3;
* scan: XRANGE of the whole usage stream + protobuf decode + the same grouping, once — what a
  report would cost without rollups.

Dimension cardinality is set by --keys/--models/--tags (each event: a random key, model and one
tag; user and group follow the key), which bounds the fields per hourly hash.

    .venv/bin/python bench/reports.py                       # 1,000,000 events over 168 hours
    .venv/bin/python bench/reports.py --events 100000 --hours 720
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import start_redis
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import Store, connect, ready
from extproc.store.rollup import HOUR_MS, aggregate


async def main_async(args: argparse.Namespace, url: str) -> None:
    client = connect(url, 30.0)
    await ready(client)
    schema = KeySchema("bench-" + uuid.uuid4().hex[:6])
    quota = QuotaStore(client, schema, stream_maxlen=args.events + 1000, background=client)
    rng = random.Random(1)
    last_hour = int(time.time() * 1000) // HOUR_MS
    first_hour = last_hour - args.hours + 1
    keys = [f"key-{i}" for i in range(args.keys)]
    models = [f"model-{i}" for i in range(args.models)]
    tags = [f"tag-{i}" for i in range(args.tags)]
    started = time.perf_counter()
    batch = []
    for n in range(args.events):
        hour = first_hour + n * args.hours // args.events
        key = rng.choice(keys)
        cost = rng.randint(1_000, 5_000_000)
        ev = usage_pb2.UsageEvent(
            request_id=f"r{n}", key=key, user="u-" + key, group="g-" + key[-1],
            model=rng.choice(models), upstream="openai", tags=[rng.choice(tags)],
            tokens=usage_pb2.TokenCounts(input=rng.randint(1, 4000), output=rng.randint(1, 800)),
            cost=usage_pb2.Cost(total_nanos=cost),
            timestamp_ms=hour * HOUR_MS + rng.randrange(HOUR_MS)).SerializeToString()
        batch.append(quota.settle_call(None, cost, 0, ev, confirmed=False, request_id=f"r{n}"))
        if len(batch) == 2000:
            await quota.settle_many(batch)
            batch = []
    if batch:
        await quota.settle_many(batch)
    write_s = time.perf_counter() - started
    store = Store(client, schema)
    hours = list(range(first_hour, last_hour + 1))
    fields = sum(len(h) for h in await store.read_rollups(hours)) // 4
    print(f"wrote {args.events} events over {args.hours} hours through settle.lua in "
          f"{write_s:.1f} s; {fields} (hour, dimension tuple) cells")
    for by in (("key", "model"), ("tag",), ()):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            report = aggregate(await store.read_rollups(hours), by)
            best = min(best, time.perf_counter() - t0)
        total = sum(t.requests for t in report.groups.values())
        print(f"report --by {','.join(by) or '(total)':10} {len(report.groups):5} groups, "
              f"{total} requests: {best * 1000:8.1f} ms")
    # The dashboard's summary (server/dashboard.py): the same rollups, per key and per model,
    # plus a series per bar; no Limits/RateLimits here, so this is its rollup part.
    from extproc.server.dashboard import RANGES, read_summary

    for range_ in RANGES:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            await read_summary(store, range_, int(time.time() * 1000))
            best = min(best, time.perf_counter() - t0)
        print(f"dashboard summary, range {range_:4}: {best * 1000:8.1f} ms")
    t0 = time.perf_counter()
    sums: dict[tuple[str, str], int] = defaultdict(int)
    last = "-"
    while True:
        entries = await client.xrange(schema.usage_stream, min=last, count=10_000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            break
        for _eid, fields_ in entries:
            e = usage_pb2.UsageEvent.FromString(fields_[b"event"])
            sums[(e.key, e.model)] += e.cost.total_nanos
        last = entries[-1][0]
    print(f"raw stream scan --by key,model ({sum(1 for _ in sums)} groups): "
          f"{(time.perf_counter() - t0) * 1000:8.1f} ms")
    await client.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--hours", type=int, default=168)
    p.add_argument("--keys", type=int, default=50)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--tags", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(Path(tmp), prefer_embedded=False)
        try:
            asyncio.run(main_async(args, url))
        finally:
            proc.stop()


if __name__ == "__main__":
    main()
