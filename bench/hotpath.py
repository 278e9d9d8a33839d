"""CPU time of Tollgate's own handlers per request on the full limits path (no Envoy, no gRPC).

In-process, against its own Redis (started here, loopback only), with the real store, config
watcher, key directory, settler and ext_proc servicer, driven with the four messages Envoy sends
for a chat/completions call (request headers, request body, response headers, buffered JSON
response body with usage). The key is under the same limits as `bench/extended.py`'s `limits`
scenario (RPM + TPM + a Block and an Allow limit), so every request reserves and settles.

What it prints is the process CPU time per request (`time.process_time`, i.e. the handlers, the
redis-py client and the settler's batches, without the gRPC transport), the median of
`--rounds` rounds: far steadier on a shared machine than req/s through Envoy. `--profile`
writes a cProfile of one more round and prints its top functions (by own time).

    .venv/bin/python bench/hotpath.py [--requests 3000] [--rounds 5] [--concurrency 16] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Metrics as in a worker: Prometheus multiprocess mode (set before prometheus_client loads).
_METRICS_DIR = tempfile.mkdtemp(prefix="tollgate-hotpath-metrics-")
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _METRICS_DIR)

import orjson  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep  # noqa: E402

from extproc.core.exchange import Options  # noqa: E402
from extproc.core.keys import generate_key, hash_key  # noqa: E402
from extproc.core.resources import validate_document  # noqa: E402
from extproc.launch import start_redis  # noqa: E402
from extproc.server import metrics  # noqa: E402
from extproc.server.processor import Processor  # noqa: E402
from extproc.server.settlement import Settler  # noqa: E402
from extproc.server.state import ConfigWatcher, KeyDirectory  # noqa: E402
from extproc.store.quota_store import QuotaStore  # noqa: E402
from extproc.store.redis_store import Store, connect  # noqa: E402

PHASES = ("request_headers", "request_body", "response_headers", "response_body")
BODY = orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 16,
                     "messages": [{"role": "user", "content": "Say hello"}]})
ANSWER = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello!"}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})


def doc(kind: str, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "tollgate.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": spec}


def header_map(pairs: dict[str, str]) -> ep.HttpHeaders:
    message = ep.HttpHeaders()
    for name, value in pairs.items():
        message.headers.headers.append(base_pb2.HeaderValue(key=name, raw_value=value.encode()))
    return message


def messages(key: str) -> list[ep.ProcessingRequest]:
    """What Envoy sends for one call, as Envoy's config for Tollgate asks for it."""
    return [
        ep.ProcessingRequest(request_headers=header_map({
            ":authority": "127.0.0.1", ":path": "/v1/chat/completions", ":method": "POST",
            ":scheme": "http", "content-type": "application/json",
            "content-length": str(len(BODY)), "user-agent": "wrk",
            "authorization": f"Bearer {key}", "x-request-id": str(uuid.uuid4()),
            "x-forwarded-proto": "http"})),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=BODY, end_of_stream=True)),
        ep.ProcessingRequest(response_headers=header_map({
            ":status": "200", "content-type": "application/json",
            "content-length": str(len(ANSWER))})),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=ANSWER, end_of_stream=True)),
    ]


async def one_request(processor: Processor, sequence: list[ep.ProcessingRequest]) -> None:
    async def requests():  # type: ignore[no-untyped-def]
        for message in sequence:
            yield message

    replies = [reply async for reply in processor.Process(requests(), None)]
    if len(replies) != 4 or not replies[3].HasField("response_body"):
        raise RuntimeError(f"not the full path: {replies[-1]}")
    if replies[1].HasField("immediate_response"):
        raise RuntimeError(f"refused: {replies[1].immediate_response.details}")


async def run(args: argparse.Namespace, url: str, tmp: Path) -> None:
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    store = Store.from_url(url, "hot-" + uuid.uuid4().hex[:8], 5.0)
    hot = connect(url, args.redis_timeout)
    quota = QuotaStore(hot, store.keys, 1000, background=store.redis)
    settler = Settler(quota, str(tmp / "journal"))
    settle_task = asyncio.create_task(settler.run())
    try:
        key = generate_key()
        await store.apply([validate_document(d) for d in (
            doc("VirtualKey", "bench-limited", {"keySha256": hash_key(key)}),
            doc("RateLimit", "bench-rates", {"per": "key", "selector": {"keys": ["bench-limited"]},
                                             "requestsPerMinute": 100_000_000,
                                             "tokensPerMinute": 1_000_000_000}),
            doc("Limit", "bench-block", {"type": "Block", "max": 1_000_000, "period": "month",
                                         "selector": {"keys": ["bench-limited"]}}),
            doc("Limit", "bench-allow", {"type": "Allow", "max": 1, "threshold": 0.5,
                                         "period": "day", "selector": {"keys": ["bench-limited"]}}),
        )])
        if args.log_file is not None:  # the access log line as a worker writes it
            # Imported here: checkouts before the access log (PYTHONPATH=<old tree>, to compare
            # with git history) have no `logs` module and run without it.
            try:
                from extproc.server import logs
            except ImportError:
                logs = None  # type: ignore[assignment]
        if args.log_file is not None and logs is not None:
            logs.configure("INFO", "text", "worker-0")
            handler = logging.getLogger().handlers[0]
            assert isinstance(handler, logging.StreamHandler)
            handler.setStream(open(args.log_file, "a"))  # noqa: SIM115 (for the whole run)
        watcher = ConfigWatcher(store, str(tmp), 1.0)
        await watcher.reload()
        processor = Processor(watcher, KeyDirectory(store), quota, settler, Options())
        sequence = messages(key)
        for _ in range(200):  # warm-up: caches, the scripts loaded, the key looked up
            await one_request(processor, sequence)

        async def round_cpu(n: int) -> tuple[float, float]:
            await asyncio.sleep(0.2)  # the warm-up's settlements land
            c0, w0 = time.process_time(), time.perf_counter()

            async def client() -> None:  # like one wrk connection: one request at a time
                for _ in range(n // args.concurrency):
                    await one_request(processor, sequence)

            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            while settler.pending:  # the settlements are part of the cost (bounded)
                if time.perf_counter() - w0 > 600:
                    raise RuntimeError("settlements never landed")
                await asyncio.sleep(0.005)
            n = n // args.concurrency * args.concurrency
            return ((time.process_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6)

        def handler_s() -> float:  # tollgate_phase_seconds: the handlers' own time, all phases
            return sum(metrics.PHASE_SECONDS.labels(p)._sum.get() for p in PHASES)

        tally = getattr(metrics, "TALLY", None)  # batched metric writes (absent before)

        def flush() -> None:
            if tally is not None:
                tally.flush()

        cpu, wall, handler = [], [], []
        for r in range(args.rounds):
            flush()
            h0 = handler_s()
            c, w = await round_cpu(args.requests)
            flush()
            h = (handler_s() - h0) / (args.requests // args.concurrency * args.concurrency) * 1e6
            cpu.append(c)
            wall.append(w)
            handler.append(h)
            print(f"round {r + 1}: {c:7.1f} us CPU per request, {w:7.1f} us wall, "
                  f"{h:6.1f} us in the phase handlers", flush=True)
        print(f"median: {statistics.median(cpu):.1f} us CPU per request "
              f"(min {min(cpu):.1f}, max {max(cpu):.1f}), "
              f"{statistics.median(handler):.1f} us handler time per request "
              f"over {args.rounds} x {args.requests}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await round_cpu(args.requests)
            profiler.disable()
            out = args.profile_out or tmp / "hotpath.prof"
            profiler.dump_stats(out)
            stats = pstats.Stats(str(out))
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
    finally:
        settle_task.cancel()  # then close() writes what is left (two flushes would race)
        with contextlib.suppress(asyncio.CancelledError):
            await settle_task
        await settler.close(timeout=5)
        await hot.aclose()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    p.add_argument("--redis-timeout", type=float, default=1.0,
                   help="request-path Redis timeout, s (raise it under valgrind)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--profile-out", type=Path, help="keep the cProfile data (pstats) here")
    p.add_argument("--log-file", default="/dev/null",
                   help="access log lines go here, as in a worker (default /dev/null)")
    p.add_argument("--no-log", dest="log_file", action="store_const", const=None,
                   help="logging not configured (access log off)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tollgate-hotpath-") as tmpdir:
        tmp = Path(tmpdir)
        redis, url = start_redis(tmp)
        try:
            import uvloop  # as in the worker (server/worker.py)

            uvloop.run(run(args, url, tmp))
        finally:
            redis.stop()
            shutil.rmtree(_METRICS_DIR, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
