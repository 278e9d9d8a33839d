"""Tollgate's own gRPC server (extproc/server/h2grpc.py) against an independent gRPC client:
grpc.aio's C core over loopback, plus a raw socket for what a well-behaved client never sends.

Each test is something Envoy (the one real client) would notice: replies in order and intact,
bodies of many MiB both ways (flow control), a cancelled stream that really stops its handler,
clean gRPC statuses for errors, and a graceful stop that lets in-flight streams finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.launch import free_port
from extproc.server import h2grpc
from extproc.server.balance import Balancer

pytestmark = pytest.mark.unit

ECHO = "/test.Echo/Stream"
UNARY = "/test.Echo/Once"


@dataclass
class Served:
    server: h2grpc.GrpcServer
    port: int
    channel: grpc.aio.Channel
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    metadata: list[tuple[tuple[str, str], ...]] = field(default_factory=list)

    def stream(self) -> Any:
        return self.channel.stream_stream(ECHO)()


async def _failed(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a stream that must end in an error (grpc.aio raises it from read)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    return raised.value.code(), raised.value.details()


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    holder: list[Served] = []

    async def echo(requests: AsyncIterator[bytes],
                   context: h2grpc.Context) -> AsyncIterator[bytes]:
        state = holder[0]
        state.metadata.append(context.invocation_metadata())
        try:
            async for message in requests:
                if message == b"boom":
                    raise RuntimeError("injected bug")
                if message.startswith(b"status:"):
                    raise h2grpc.GrpcError(h2grpc.NOT_FOUND, message[7:].decode())
                if message == b"hold":
                    await state.release.wait()
                yield b"echo:" + message
        except asyncio.CancelledError:
            state.cancelled.set()
            raise

    async def once(request: bytes, _context: h2grpc.Context) -> bytes:
        return request[::-1]

    server = h2grpc.GrpcServer({
        ECHO: h2grpc.Method(echo, _identity, _identity),
        UNARY: h2grpc.Method(once, _identity, _identity, unary=True),
    }, max_message_bytes=32 << 20)
    port = await server.start("127.0.0.1", free_port())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20)])
    holder.append(Served(server, port, channel))
    try:
        yield holder[0]
    finally:
        await channel.close()
        await server.stop(1)


async def test_a_stream_gets_its_replies_in_order_and_an_ok_status(served: Served) -> None:
    call = served.channel.stream_stream(ECHO)(metadata=(("x-tollgate-role", "try"),))
    for i in range(5):
        await call.write(b"m%d" % i)
        assert await call.read() == b"echo:m%d" % i
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert ("x-tollgate-role", "try") in served.metadata[-1]


async def test_many_mib_travel_both_ways_intact(served: Served) -> None:
    """Larger than every initial flow-control window: both sides must hand windows back."""
    body = bytes(range(256)) * (12 * 4096)  # 12 MiB
    call = served.stream()
    await call.write(body)
    reply = await call.read()
    assert reply == b"echo:" + body
    await call.write(b"small")  # the stream still works after the big exchange
    assert await call.read() == b"echo:small"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_concurrent_streams_each_get_their_own_replies(served: Served) -> None:
    async def one(i: int) -> bytes:
        call = served.stream()
        await call.write(b"%d" % i + b"x" * (i * 97))
        reply: bytes = await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return reply

    replies = await asyncio.gather(*(one(i) for i in range(300)))
    assert replies == [b"echo:%d" % i + b"x" * (i * 97) for i in range(300)]


async def test_a_cancelled_stream_stops_its_handler(served: Served) -> None:
    call = served.stream()
    await call.write(b"hold")
    await asyncio.sleep(0.1)  # the handler is now waiting inside the stream
    call.cancel()
    await asyncio.wait_for(served.cancelled.wait(), 5)
    # The connection carries on.
    second = served.stream()
    await second.write(b"after")
    assert await second.read() == b"echo:after"
    await second.done_writing()


async def test_a_handler_bug_is_an_internal_status_and_the_server_carries_on(
        served: Served) -> None:
    call = served.stream()
    await call.write(b"boom")
    # No traceback text to the client.
    assert await _failed(call) == (grpc.StatusCode.INTERNAL, "internal error")
    call = served.stream()
    await call.write(b"fine")
    assert await call.read() == b"echo:fine"
    await call.done_writing()


async def test_a_grpc_error_keeps_its_code_and_message(served: Served) -> None:
    call = served.stream()
    await call.write("status:no such thing — 100% gone".encode())
    assert await _failed(call) == (grpc.StatusCode.NOT_FOUND, "no such thing — 100% gone")


async def test_unknown_methods_are_unimplemented(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await served.channel.unary_unary("/test.Echo/Nope")(b"x")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_unary_methods(served: Served) -> None:
    assert await served.channel.unary_unary(UNARY)(b"abc") == b"cba"


async def test_a_message_over_the_limit_is_refused_and_the_connection_survives(
        served: Served) -> None:
    call = served.stream()
    with contextlib.suppress(grpc.aio.AioRpcError):  # the server may stop the write midway
        await call.write(b"x" * ((32 << 20) + 1))
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await served.channel.unary_unary(UNARY)(b"ok") == b"ko"


async def test_graceful_stop_lets_open_streams_finish_and_refuses_new_ones(
        served: Served) -> None:
    call = served.stream()
    await call.write(b"hold")
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(served.server.stop(10))
    await asyncio.sleep(0.3)
    assert not stopping.done()  # waiting for the open stream
    # A new connection is not accepted any more.
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.close()
    served.release.set()
    assert await call.read() == b"echo:hold"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(stopping, 5)
    assert not served.cancelled.is_set()


async def test_graceful_stop_cancels_what_outlives_the_grace(served: Served) -> None:
    call = served.stream()
    await call.write(b"hold")
    await asyncio.sleep(0.1)
    await asyncio.wait_for(served.server.stop(0.2), 5)
    await asyncio.wait_for(served.cancelled.wait(), 5)
    assert await call.code() != grpc.StatusCode.OK


# --- a raw client, for what grpc.aio never sends ------------------------------------------


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + \
        stream_id.to_bytes(4, "big") + payload


def _request_frames(message: bytes) -> bytes:
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", ECHO),
                                    (":authority", "x"), ("content-type", "application/grpc"),
                                    ("te", "trailers")])
    # HEADERS split into a CONTINUATION, DATA padded: both legal, both rare.
    half = len(block) // 2
    data = b"\x00" + struct.pack(">I", len(message)) + message
    return (h2grpc.PREFACE + _frame(h2grpc.SETTINGS, 0, 0)
            + _frame(h2grpc.HEADERS, 0, 1, block[:half])
            + _frame(h2grpc.CONTINUATION, h2grpc.END_HEADERS, 1, block[half:])
            + _frame(h2grpc.DATA, h2grpc.PADDED | h2grpc.END_STREAM, 1,
                     bytes((3,)) + data + b"\x00\x00\x00"))


def _read_frames(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    """Frames until the connection closes or stream 1 ends."""
    buf, frames = b"", []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return frames
        buf += chunk
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, flags = buf[3], buf[4]
            stream_id = int.from_bytes(buf[5:9], "big")
            frames.append((kind, flags, stream_id, buf[9:9 + length]))
            buf = buf[9 + length:]
            if kind == h2grpc.HEADERS and stream_id == 1 and flags & h2grpc.END_STREAM:
                return frames


async def test_a_request_trickling_in_byte_by_byte_is_served(served: Served) -> None:
    def run() -> list[tuple[int, int, int, bytes]]:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in _request_frames(b"slow"):
                sock.sendall(bytes((byte,)))
            return _read_frames(sock)

    frames = await asyncio.to_thread(run)
    data = [payload for kind, _f, sid, payload in frames if kind == h2grpc.DATA and sid == 1]
    assert data == [b"\x00" + struct.pack(">I", 9) + b"echo:slow"]
    trailers = [payload for kind, flags, sid, payload in frames
                if kind == h2grpc.HEADERS and flags & h2grpc.END_STREAM]
    assert dict(hpack.Decoder().decode(trailers[-1])) == {"grpc-status": "0"}


async def test_a_client_that_does_not_speak_http2_is_disconnected(served: Served) -> None:
    def run() -> list[tuple[int, int, int, bytes]]:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return _read_frames(sock)

    frames = await asyncio.to_thread(run)
    goaway = [payload for kind, _f, _s, payload in frames if kind == h2grpc.GOAWAY]
    assert goaway and struct.unpack(">I", goaway[0][4:8])[0] == h2grpc.PROTOCOL_ERROR
    assert await served.channel.unary_unary(UNARY)(b"still up") == b"pu llits"


async def test_the_worker_serves_grpc_health() -> None:
    """grpc.aio's health stub against the worker's native wiring (SERVING once ready)."""
    from extproc.server.worker import HEALTH_CHECK_PATH, SERVICE, _Native, health_method

    status: dict[str, int] = {}
    server = h2grpc.GrpcServer({HEALTH_CHECK_PATH: health_method(status)}, 1 << 20)
    port = await server.start("127.0.0.1", free_port())
    await _Native(server, status).set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Check(health_pb2.HealthCheckRequest(service="other"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        await _Native(server, status).set_serving(False)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.stop(1)


async def test_connections_are_spread_evenly_over_the_workers(tmp_path: Path) -> None:
    """Two servers as two workers of one run directory. The kernel gives every connection to
    the first (the second listens elsewhere, so the hash cannot help): it hands every other
    one to the second, and every handed-over connection is served."""

    async def once(request: bytes, _context: h2grpc.Context) -> bytes:
        return request

    servers, ports = [], []
    for index in range(2):
        server = h2grpc.GrpcServer({UNARY: h2grpc.Method(once, _identity, _identity,
                                                         unary=True)}, 1 << 20)
        ports.append(await server.start("127.0.0.1", free_port(),
                                        Balancer(str(tmp_path), index, 2)))
        servers.append(server)
    channels = []
    try:
        for n in range(6):
            # A channel per connection: grpc.aio would share one between identical targets.
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}",
                                                options=[("grpc.channel_id", n)])
            channels.append(channel)
            assert await channel.unary_unary(UNARY)(b"%d" % n) == b"%d" % n
        assert [len(s.connections) for s in servers] == [3, 3]
        assert servers[0].balancer is not None and servers[0].balancer.handed == 3
        for n, channel in enumerate(channels):  # every connection still answers
            assert await channel.unary_unary(UNARY)(b"again%d" % n) == b"again%d" % n
        await channels.pop().close()  # a closed connection is counted out
        await asyncio.sleep(0.2)
        assert sorted(len(s.connections) for s in servers) == [2, 3]
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(1)


async def test_garbage_after_the_preface_closes_only_that_connection(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """Random frames (bad lengths, unknown types, broken header blocks, data for streams that
    never opened) from one client: that connection is closed or ignored, with a one-line
    warning and no traceback, and the server goes on serving the others."""
    import random

    rng = random.Random(12)

    def run(seed: int) -> None:
        rng.seed(seed)
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
            sock.settimeout(2)
            frames = h2grpc.PREFACE + _frame(h2grpc.SETTINGS, 0, 0)
            for _ in range(20):
                kind = rng.choice([0, 1, 3, 4, 6, 8, 9, 0x20, rng.randrange(256)])
                payload = rng.randbytes(rng.choice([0, 1, 5, 8, 40]))
                frames += _frame(kind, rng.randrange(256), rng.randrange(8), payload)
            frames += rng.randbytes(rng.randrange(64))
            try:
                sock.sendall(frames)
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # closed by the server, or the 2 s timeout with nothing more to read

    for seed in range(25):
        await asyncio.to_thread(run, seed)
        assert await served.channel.unary_unary(UNARY)(b"ok%d" % seed) == (b"ok%d" % seed)[::-1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
