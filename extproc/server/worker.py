"""One extproc worker process: the gRPC server on the shared port (SO_REUSEPORT).

Envoy opens one HTTP/2 connection per Envoy worker thread, so several worker processes bound to
one port spread the load across cores. On SIGTERM a worker reports NOT_SERVING, stops accepting
streams, lets in-flight ones finish (up to the grace period), flushes pending settlements and exits.
A state file in the run directory tells the supervisor whether this worker is ready. A worker that
cannot bind the port (taken, not permitted, not an address of this host) says why in its state file
(or on stderr when it has none) and exits with EXIT_CANNOT_BIND, which the supervisor does not
restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import busypoll
from extproc.core.exchange import Options
from extproc.core.policy.cors import Cors
from extproc.server import h2grpc, logfilter
from extproc.server.admission import LoopLag
from extproc.server.balance import Balancer
from extproc.server.bodylog_file import BodyLogFile, worker_path
from extproc.server.moderation import ModerationClient
from extproc.server.policy_hits import PolicyHitRecorder
from extproc.server.processor import Processor
from extproc.server.settlement import Settler
from extproc.server.state import ConfigWatcher, KeyDirectory
from extproc.server.supervisor import (
    EXIT_CANNOT_BIND,
    FATAL_BIND_ERRORS,
    bind_reason,
    cannot_bind,
)
from extproc.settings import Settings
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import REDIS_DOWN, Store, connect
from extproc.store.redis_store import ready as connect_ready

log = logging.getLogger("tollgate.worker")
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"


def _write_state(path: Path | None, **state: object) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **state}))
    tmp.replace(path)  # atomic: the supervisor never reads half a file


async def run_worker(settings: Settings, index: int) -> None:
    store = Store.from_url(settings.redis_url, settings.redis_tag, settings.redis_timeout_s)
    watcher = ConfigWatcher(store, settings.secrets_dir, settings.reload_poll_s)
    keys = KeyDirectory(store)
    # The request path gets its own client with a short timeout: a slow Redis must cost a
    # request tens of milliseconds, not the second that a configuration load may take.
    hot = connect(settings.redis_url, settings.redis_hot_timeout_s)
    quota = QuotaStore(hot, store.keys, settings.usage_stream_maxlen, background=store.redis)
    settler = Settler(quota, settings.journal_path)
    body_file = BodyLogFile(
        worker_path(settings.body_log_file, index), settings.body_log_file_max_bytes,
        settings.body_log_file_backups) if settings.body_log_file else None
    policy_hits = PolicyHitRecorder(store, body_file)
    options = Options(
        max_body_bytes=settings.max_body_bytes,
        result_object=settings.result_object,
        stream_passthrough=settings.stream_passthrough,
        default_max_output_tokens=settings.default_max_output_tokens,
        hold_seconds=settings.hold_seconds,
        image_tokens=settings.image_tokens,
        unpriced=settings.unpriced,
        cors=Cors(tuple(settings.cors_origins)),  # a list after the JSON hand-over
        denied_models=tuple(settings.denied_models),
        max_retries=max(0, settings.max_retries),
        retry_deadline_ms=max(0, settings.retry_deadline_ms),
    )

    lag = LoopLag(settings.max_lag_s)
    moderation = ModerationClient(settings.moderation_url)
    processor = Processor(watcher, keys, quota, settler, options, policy_hits,
                          max_pending=settings.max_pending, lag=lag, moderation=moderation)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    state_file = Path(settings.run_dir) / f"worker-{index}.json" if settings.run_dir else None
    try:
        server = await serve_grpc(settings, processor, index)
    except OSError as exc:
        if exc.errno not in FATAL_BIND_ERRORS:  # e.g. out of file descriptors: a restart may do
            raise SystemExit(f"tollgate worker {index}: cannot bind {address}: {exc}") from None
        if state_file is not None:  # the supervisor prints it, once for all its workers
            _write_state(state_file, ready=False, cannot_bind=bind_reason(exc))
        else:
            print(cannot_bind("gRPC", settings.grpc_host, settings.grpc_port, bind_reason(exc)),
                  file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CANNOT_BIND) from None
    lag.start()
    if settings.busy_poll_us and settings.grpc_transport == "native":
        busypoll.start(settings.busy_poll_us)
        log.info("worker %d polls on for %d us after each read (TOLLGATE_BUSY_POLL_US)",
                 index, settings.busy_poll_us)
    elif settings.busy_poll_us:
        log.warning("TOLLGATE_BUSY_POLL_US is ignored with the grpcio transport (its reads "
                    "happen in grpc's own threads)")
    # A Cluster client must learn the topology before concurrent use (see `ready`). Redis down
    # at start: retried every half second below, before the first burst of requests can race.
    unready = [client for client in (store.redis, hot) if not await _ready(client, warn=True)]

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    watch_task = asyncio.create_task(watcher.run(), name="config-watcher")
    hits_task = asyncio.create_task(policy_hits.run(), name="policy-hits")
    settle_task = asyncio.create_task(settler.run(), name="settler")
    sweep_task = asyncio.create_task(settler.sweep(settings.sweep_interval_s), name="sweeper")
    serving = False
    log.info("worker %d (pid %d) listening on %s", index, os.getpid(), address)
    while not stopping.is_set():
        if unready:
            unready = [client for client in unready if not await _ready(client)]
        ready = watcher.snapshot is not None
        if ready != serving:
            await server.set_serving(ready)
            serving = ready
        generation = watcher.snapshot.generation if watcher.snapshot else -1
        _write_state(state_file, ready=ready, draining=False, redis_ok=watcher.redis_ok,
                     generation=generation, pending_usage=settler.pending,
                     requests=processor.streams, **server.connection_counts())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=0.5)

    log.info("worker %d draining", index)
    _write_state(state_file, ready=False, draining=True, redis_ok=watcher.redis_ok,
                 generation=-1, pending_usage=settler.pending)
    await server.stop(settings.shutdown_grace_s)
    processor.settle_unobserved()  # before the settler's last flush below
    lag.stop()
    busypoll.stop()
    watch_task.cancel()
    hits_task.cancel()
    await policy_hits.close()
    await moderation.close()
    sweep_task.cancel()
    settle_task.cancel()
    await settler.close(timeout=5)
    await hot.aclose()
    await store.close()
    log.info("worker %d stopped", index)


def health_method(status: dict[str, int]) -> h2grpc.Method:
    """gRPC health's Check (grpc.health.v1) answering from `status` (service -> status)."""

    async def check(request: health_pb2.HealthCheckRequest,
                    _context: h2grpc.Context) -> health_pb2.HealthCheckResponse:
        if request.service not in status:
            raise h2grpc.GrpcError(h2grpc.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status[request.service])

    return h2grpc.Method(check, health_pb2.HealthCheckRequest.FromString,
                         health_pb2.HealthCheckResponse.SerializeToString, unary=True)


class _Native:
    """The ext_proc and gRPC health services on Tollgate's own HTTP/2 server (h2grpc.py)."""

    def __init__(self, server: h2grpc.GrpcServer, status: dict[str, int]) -> None:
        self.server = server
        self.status = status

    async def set_serving(self, ready: bool) -> None:
        value = health_pb2.HealthCheckResponse.SERVING if ready else (
            health_pb2.HealthCheckResponse.NOT_SERVING)
        self.status.update({"": value, SERVICE: value})

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)

    def connection_counts(self) -> dict[str, int]:
        """Envoy connections served, and handed to a sibling worker (/readyz)."""
        balancer = self.server.balancer
        return {"connections": len(self.server.connections),
                "handed_over": balancer.handed if balancer is not None else 0}


class _GrpcAio:
    """The same services on grpc.aio (TOLLGATE_GRPC_TRANSPORT=grpcio)."""

    def __init__(self, server: grpc.aio.Server, health_servicer: Any) -> None:
        self.server = server
        self.health = health_servicer

    async def set_serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else (
            health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    def connection_counts(self) -> dict[str, int]:
        return {}  # grpc.aio does not tell


async def serve_grpc(settings: Settings, processor: Processor, index: int = 0
                     ) -> _Native | _GrpcAio:
    """The ext_proc service (and gRPC health) on the transport the settings name; with several
    workers, connections are balanced over them (balance.py, native transport only)."""
    limit = settings.grpc_max_message_bytes
    if settings.grpc_transport == "native":
        status: dict[str, int] = {}
        native = h2grpc.GrpcServer({
            h2grpc.EXT_PROC_PATH: h2grpc.Method(
                processor.Process, ep.ProcessingRequest.FromString,
                ep.ProcessingResponse.SerializeToString),
            HEALTH_CHECK_PATH: health_method(status),
        }, max_message_bytes=limit)
        balancer = Balancer(settings.run_dir, index, settings.workers) if (
            settings.workers > 1 and settings.run_dir) else None
        await native.start(settings.grpc_host, settings.grpc_port, balancer)
        return _Native(native, status)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_concurrent_streams", 10_000),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    except RuntimeError:  # grpcio >= 1.56 raises instead of returning 0, and never says why
        bound = 0
    if bound == 0:
        raise _why_not_bound(settings.grpc_host, settings.grpc_port)
    await server.start()
    return _GrpcAio(server, health_servicer)


def _why_not_bound(host: str, port: int) -> OSError:
    """grpcio's bind failed: bind a socket the same way (SO_REUSEPORT) to learn the errno."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(address)
            probe.listen(1)
    except OSError as exc:
        return exc
    return OSError(f"grpcio could not bind {host}:{port}")


async def _ready(client: Any, warn: bool = False) -> bool:
    try:
        await connect_ready(client)
    except REDIS_DOWN as exc:
        if warn:  # the watcher keeps trying to load the configuration meanwhile
            log.warning("redis not reachable yet: %s", exc)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollgate-worker")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    from extproc.server.supervisor import settings_for_worker

    settings = settings_for_worker() or Settings.from_env()
    from extproc.server.logs import configure

    configure(settings.log_level, settings.log_format, f"worker-{args.index}")
    logfilter.install()  # bounded logs whatever clients send
    if not settings.access_log:
        logging.getLogger("tollgate.access").setLevel(logging.WARNING)
    from extproc.server import tracing

    tracing.enable_from_env()  # off unless OTEL_EXPORTER_OTLP_ENDPOINT is set
    import uvloop

    try:
        uvloop.run(run_worker(settings, args.index))
    finally:  # what waited for a loop turn that never came
        from extproc.server import logs, metrics

        metrics.TALLY.flush()
        logs.flush_access()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
