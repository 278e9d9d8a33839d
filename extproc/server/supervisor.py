"""`tollgate serve`: starts N worker processes on one gRPC port and serves the HTTP endpoints.

  /healthz  200 while every worker process is alive (liveness)
  /readyz   200 when every worker has loaded a configuration and is not draining (readiness)
  /metrics  Prometheus text, summed over the workers (prometheus_client multiprocess mode)
  /dashboard  spend, limits, rate-limit pressure, cooldowns; only with TOLLGATE_DASHBOARD=1
            and an admin token (server/dashboard.py)

Health is the AND of its parts, as in envoyproxy/ratelimit. A worker that dies is restarted,
except one that could not bind the gRPC port (exit status EXIT_CANNOT_BIND: the port is taken or
not ours to use): a restart would fail the same way, so the server stops with one error line, as it
does when the HTTP port cannot be bound.
SIGTERM/SIGINT: forward SIGTERM to the workers, wait for them to drain, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from extproc.server import logfilter
from extproc.settings import Settings

log = logging.getLogger("tollgate.supervisor")
SETTINGS_ENV = "TOLLGATE_SETTINGS_JSON"
# A worker's exit status when it cannot bind the gRPC port for good (in use, not permitted, not
# an address of this host): the supervisor then stops instead of restarting it.
EXIT_CANNOT_BIND = 3
FATAL_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def bind_reason(exc: OSError) -> str:
    """'address already in use', 'permission denied', ... (without aiohttp's or Python's
    decorations)."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def cannot_bind(what: str, host: str, port: int, reason: str) -> str:
    """The one line `serve` prints when it cannot listen on a port (launch.py reads it)."""
    return (f"tollgate: error: cannot bind {what} port {host}:{port}: {reason}; "
            "stop the other server or choose other ports")


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.own_run_dir = not settings.run_dir
        run_dir = settings.run_dir or tempfile.mkdtemp(prefix="tollgate-")
        self.settings = dataclasses.replace(settings, run_dir=run_dir)
        self.run_dir = Path(run_dir)
        self.prom_dir = self.run_dir / "prometheus"
        self.prom_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.prom_dir.glob("*.db"):
            stale.unlink()
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.prom_dir)
        # Workers never serve the dashboard: they do not get its token.
        env.pop("TOLLGATE_ADMIN_TOKEN", None)
        env[SETTINGS_ENV] = json.dumps(dataclasses.asdict(
            dataclasses.replace(self.settings, admin_token="")))
        return env

    async def _spawn(self, index: int) -> None:
        state = self.run_dir / f"worker-{index}.json"
        state.unlink(missing_ok=True)
        self.workers[index] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc.server.worker", "--index", str(index), env=self._env()
        )

    def worker_states(self) -> list[dict[str, Any]]:
        states = []
        now = time.time()
        for index, proc in sorted(self.workers.items()):
            alive = proc.returncode is None
            state: dict[str, Any] = {"index": index, "pid": proc.pid, "alive": alive}
            path = self.run_dir / f"worker-{index}.json"
            try:
                data = json.loads(path.read_text())
                fresh = now - path.stat().st_mtime < 3.0
                if data.get("pid") == proc.pid:
                    state.update(data)
                    state["ready"] = bool(data.get("ready")) and fresh and state["alive"]
            except (OSError, ValueError):
                state["ready"] = False
            state.setdefault("ready", False)
            states.append(state)
        return states

    # -- HTTP ------------------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        states = self.worker_states()
        ok = bool(states) and all(s["alive"] for s in states) and not self.stopping.is_set()
        return web.json_response({"status": "ok" if ok else "failing", "workers": states},
                                 status=200 if ok else 503)

    async def readyz(self, _request: web.Request) -> web.Response:
        states = self.worker_states()
        ok = bool(states) and all(s["ready"] for s in states) and not self.stopping.is_set()
        return web.json_response({"status": "ready" if ok else "not ready", "workers": states},
                                 status=200 if ok else 503)

    async def metrics(self, _request: web.Request) -> web.Response:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.prom_dir))
        return web.Response(body=generate_latest(registry),
                            content_type="text/plain", charset="utf-8")

    # -- lifecycle -------------------------------------------------------------------------

    def busy_ports(self) -> list[str]:
        """Ports this server needs that someone already listens on. The workers share the gRPC
        port through SO_REUSEPORT, which would let them join another server's port unnoticed."""
        from extproc.ports import port_in_use

        s = self.settings
        wanted = (("gRPC", s.grpc_host, s.grpc_port), ("HTTP", s.http_host, s.http_port))
        return [f"{what} port {host}:{port}" for what, host, port in wanted
                if port_in_use(host, port)]

    async def run(self) -> int:
        from extproc.server.dashboard import startup_problem

        problem = startup_problem(self.settings)
        if problem:
            print(f"tollgate: error: {problem}", file=sys.stderr, flush=True)
            if self.own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            return 1
        busy = self.busy_ports()
        if busy:
            print(f"tollgate: error: {' and '.join(busy)} already in use; stop the other "
                  "server or choose other ports", file=sys.stderr, flush=True)
            if self.own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        if self.settings.dashboard:  # off: no route, nothing imported, nothing read
            from extproc.server.dashboard import Dashboard

            Dashboard(self.settings).add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
        try:
            await site.start()
        except OSError as exc:  # taken since busy_ports() looked, or not ours to use
            print(cannot_bind("HTTP", self.settings.http_host, self.settings.http_port,
                              bind_reason(exc)), file=sys.stderr, flush=True)
            await runner.cleanup()
            if self.own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            return 1
        for index in range(self.settings.workers):
            await self._spawn(index)
        from extproc.cli_output import redacted

        log.info(
            "serving ext_proc on %s:%d with %d worker(s); health on http://%s:%d; Redis %s",
            self.settings.grpc_host, self.settings.grpc_port, self.settings.workers,
            self.settings.http_host, self.settings.http_port, redacted(self.settings.redis_url),
        )
        announced = False
        failure = ""
        while not self.stopping.is_set():
            for index, proc in list(self.workers.items()):
                if proc.returncode == EXIT_CANNOT_BIND and not self.stopping.is_set():
                    failure = self._bind_failure(index, proc.pid)
                    self.stopping.set()  # a restart would fail the same way
                elif proc.returncode is not None and not self.stopping.is_set():
                    log.error("worker %d exited with %s; restarting", index, proc.returncode)
                    self._mark_dead(proc.pid)
                    await asyncio.sleep(0.5)
                    await self._spawn(index)
            if not announced and all(s["ready"] for s in self.worker_states()):
                log.info("tollgate extproc ready on %s:%d", self.settings.grpc_host,
                         self.settings.grpc_port)
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=0.2)
        if failure:
            print(failure, file=sys.stderr, flush=True)
        await self._stop_workers()
        await runner.cleanup()
        if self.own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return 1 if failure else 0

    def _bind_failure(self, index: int, pid: int) -> str:
        """The error line for worker `index` (pid `pid`), which exited with EXIT_CANNOT_BIND; the
        reason is in its state file."""
        reason = "see the worker's log"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            data = json.loads((self.run_dir / f"worker-{index}.json").read_text())
            if data.get("pid") == pid and data.get("cannot_bind"):
                reason = str(data["cannot_bind"])
        return cannot_bind("gRPC", self.settings.grpc_host, self.settings.grpc_port, reason)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(pid, str(self.prom_dir))

    async def _stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = self.settings.shutdown_grace_s + 5
        for proc in self.workers.values():
            try:
                await asyncio.wait_for(proc.wait(), timeout=deadline)
            except TimeoutError:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def settings_for_worker() -> Settings | None:
    raw = os.environ.get(SETTINGS_ENV)
    return Settings(**json.loads(raw)) if raw else None


def serve(settings: Settings) -> int:
    import uvloop

    from extproc.server.logs import configure

    configure(settings.log_level, settings.log_format, "supervisor")
    logfilter.install()  # bounded logs whatever clients send
    return uvloop.run(Supervisor(settings).run())
