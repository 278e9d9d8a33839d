"""A port extproc cannot listen on stops it at once, with one line naming the port.

`tollgate serve` checks its ports before it starts anything, but a port free at that check can be
taken before a worker binds it. A worker that cannot bind exits with EXIT_CANNOT_BIND and the
supervisor then stops (a restart would fail the same way) instead of restarting it until whoever
waits for /readyz gives up. `start_extproc` picks new ports when one it picked was taken, and
says so at once when the caller chose them.

Real processes on loopback against a real Redis. The race (a port taken between the check and the
bind) is produced by running the real CLI with the supervisor's check turned off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc import launch
from extproc.launch import ExtprocPorts, StartupError, free_port, start_extproc

pytestmark = pytest.mark.redis

# The real `tollgate serve`, as if every port had been free when the supervisor looked.
RACE = ("import sys\n"
        "from extproc.server.supervisor import Supervisor\n"
        "Supervisor.busy_ports = lambda self: []\n"
        "from extproc.cli import main\n"
        "sys.exit(main())\n")


@pytest.fixture
def held() -> Iterator[int]:
    """A loopback port someone else listens on (no SO_REUSEPORT: nobody can join it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def env(tag: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TOLLGATE_SETTINGS_JSON"}
    return dict(env, TOLLGATE_REDIS_TAG=tag, TOLLGATE_JOURNAL_DIR=str(tmp_path))


def serve(argv: list[str], env: dict[str, str], timeout: float = 30
          ) -> tuple[int | None, str, float]:
    """Runs a `serve` command; (exit status or None if it was still running at `timeout`,
    stderr, seconds taken). Whatever it started is killed afterwards (its process group)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _out, err = proc.communicate(timeout=timeout)
        status: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        status = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _out, err = proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
    return status, err, time.monotonic() - started


def serve_argv(redis_url: str, grpc: int, http: int, workers: int = 1,
               code: str | None = None) -> list[str]:
    start = [sys.executable, "-c", code] if code else [sys.executable, "-m", "extproc"]
    return [*start, "serve", "--redis-url", redis_url, "--grpc-port", str(grpc),
            "--http-port", str(http), "--workers", str(workers)]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tollgate: error:")]


def test_serve_exits_at_once_when_its_grpc_port_is_held(
    redis_url: str, held: int, env: dict[str, str]
) -> None:
    status, err, took = serve(serve_argv(redis_url, held, free_port()), env)
    assert status is not None and status != 0, err
    assert took < 15
    assert len(errors(err)) == 1 and f"127.0.0.1:{held}" in errors(err)[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_a_worker_that_cannot_bind_stops_the_server_instead_of_restarting(
    redis_url: str, held: int, env: dict[str, str], transport: str
) -> None:
    """The port taken after the supervisor's check: both workers fail to bind, the server exits
    with one line for them, and no worker is restarted."""
    env = dict(env, TOLLGATE_GRPC_TRANSPORT=transport)
    status, err, took = serve(serve_argv(redis_url, held, free_port(), 2, RACE), env)
    assert status == 1, f"still running after 30 s (restarting its workers?):\n{err[-2000:]}"
    assert took < 15
    assert errors(err) == [f"tollgate: error: cannot bind gRPC port 127.0.0.1:{held}: address "
                           "already in use; stop the other server or choose other ports"], err
    assert "restarting" not in err and "Traceback" not in err


def test_the_http_port_taken_after_the_check_stops_the_server_with_one_line(
    redis_url: str, held: int, env: dict[str, str]
) -> None:
    status, err, took = serve(serve_argv(redis_url, free_port(), held, 1, RACE), env)
    assert status == 1, err
    assert took < 15
    assert errors(err) == [f"tollgate: error: cannot bind HTTP port 127.0.0.1:{held}: address "
                           "already in use; stop the other server or choose other ports"], err
    assert "Traceback" not in err


def test_start_extproc_picks_other_ports_when_one_it_picked_is_taken(
    redis_url: str, held: int, env: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    picked: list[int] = []

    def unlucky() -> int:  # the first pick is taken by the time extproc binds it
        port = held if not picked else free_port()
        picked.append(port)
        return port

    monkeypatch.setattr(launch, "free_port", unlucky)
    started = time.monotonic()
    proc, ports = start_extproc(tmp_path, redis_url, env=env)
    try:
        assert time.monotonic() - started < 30
        assert held not in (ports.grpc, ports.http)
        assert picked[0] == held and len(picked) == 4  # two picks, then two more
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/readyz", timeout=5) as ready:
            assert ready.status == 200
        with socket.create_connection(("127.0.0.1", ports.grpc), timeout=5):
            pass  # its gRPC port is its own
        assert proc.alive()
    finally:
        proc.stop()


def test_start_extproc_fails_at_once_when_the_port_it_was_given_is_taken(
    redis_url: str, held: int, env: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_pick() -> int:
        raise AssertionError("explicit ports are not replaced")

    monkeypatch.setattr(launch, "free_port", no_pick)
    started = time.monotonic()
    with pytest.raises(StartupError, match=rf"taken.*127\.0\.0\.1:{held}") as failure:
        start_extproc(tmp_path, redis_url, env=env, ports=ExtprocPorts(held, free_port()))
    assert time.monotonic() - started < 15
    assert "already in use" in str(failure.value)
