"""A gRPC server over HTTP/2 in the worker's own event loop, for the one client it has: Envoy.

Why not grpc.aio: its C core reads the socket on its own threads and hands every event to the
asyncio loop through a completion-queue poller thread, so each of the four ext_proc messages of a
request crosses threads twice. Measured with a trivial ext_proc (`bench/ext_proc_modes.py`
--transport), that hand-over was most of the extproc's CPU per request and most of the latency
Tollgate adds at low load. Here the frames are read and written by an `asyncio.Protocol` in the
loop that runs the handlers: no threads, one write per loop turn.

What it serves is deliberately small, because the peer is Envoy's gRPC client on a cluster we
configure (plaintext HTTP/2, prior knowledge):

* stream-stream and unary-unary methods, identity encoding only (no gRPC compression);
* HTTP/2 framing, HPACK (the `hpack` package decodes; replies use a few fixed literal header
  blocks), flow control in both directions, PING, SETTINGS, RST_STREAM, CONTINUATION, padding;
* a graceful stop: GOAWAY in two steps (as gRPC servers do: "no new streams" with a PING, then
  the real last stream id), in-flight streams finish within the grace period.

Not served: TLS (Envoy and the extproc share a pod or host; the port binds to loopback by
default), server push, priorities (ignored), gRPC compression (rejected as INTERNAL).

A handler error ends its stream with grpc-status INTERNAL (Envoy then answers the client with its
own 500, as with grpc.aio); a client's RST_STREAM or a lost connection cancels the handler task,
like grpc.aio's cancellation, so the processor's settle-on-cancel path runs unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import hpack

from extproc import busypoll
from extproc.server.balance import Balancer

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 2, 3, 6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 7, 8, 9
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 4, 5

#: The one method Tollgate serves to Envoy.
EXT_PROC_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
# Frames Envoy may send us: large, so a multi-MiB request body is a few frames, not hundreds.
OUR_MAX_FRAME = 2**24 - 1
# Windows are handed back once this much was consumed: rarely, in one frame.
REFILL_AT = 2**30

# gRPC status codes used here.
OK, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 5, 8, 12, 13

_U32 = struct.Struct(">I")


_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id: a frame's 9 bytes
_DATA_HEAD = struct.Struct(">IBIBI")  # a DATA frame's head + the gRPC message's 5-byte prefix


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """One header as an HPACK literal without indexing, new name, no Huffman: never touches the
    peer's dynamic table, so the blocks below can be built once and reused on any connection."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# `:status: 200` is entry 8 of HPACK's static table.
_RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _trailers(code: int, message: str) -> bytes:
    if code == OK:
        return _OK_TRAILERS
    block = _literal(b"grpc-status", str(code).encode())
    if message:  # percent-encoded, as the gRPC wire spec asks
        block += _literal(b"grpc-message", urllib.parse.quote(message, safe=" ").encode())
    return block


class GrpcError(Exception):
    """Ends a stream with this status (raised by a handler, or by the server itself)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Method:
    """One served method. `handler(requests, context)` is an async generator of replies for a
    stream-stream method, or a coroutine returning the reply for a unary one."""

    handler: Callable[..., Any]
    decode: Callable[[bytes], Any]
    encode: Callable[[Any], bytes]
    unary: bool = False


class Context:
    """What a handler may ask about its stream (the subset of grpc.aio's context Tollgate uses)."""

    __slots__ = ("_metadata",)

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class _Stream:
    __slots__ = (
        "buffer",
        "closed",
        "headers_sent",
        "id",
        "inbox",
        "metadata",
        "method",
        "pending",
        "pending_end",
        "recv_unacked",
        "remote_done",
        "send_window",
        "task",
        "waiter",
    )

    def __init__(self, stream_id: int, method: Method, send_window: int,
                 metadata: tuple[tuple[str, str], ...]) -> None:
        self.id = stream_id
        self.method = method
        self.inbox: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.remote_done = False  # the client's END_STREAM arrived
        self.buffer = bytearray()  # a gRPC message spread over DATA frames
        self.send_window = send_window
        self.pending = bytearray()  # DATA payload waiting for flow-control window
        self.pending_end: bytes | None = None  # trailers to send once `pending` is out
        self.headers_sent = False
        self.task: asyncio.Task[None] | None = None
        self.recv_unacked = 0
        self.closed = False  # our END_STREAM or a reset: nothing more is written
        self.metadata = metadata

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def messages(self) -> AsyncIterator[Any]:
        inbox, decode = self.inbox, self.method.decode
        while True:
            if inbox:
                yield decode(inbox.popleft())
            elif self.remote_done:
                return
            else:
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
                self.waiter = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.inbuf = bytearray()
        self.need = 0  # bytes `inbuf` must hold before parsing is worth it
        self.preface_seen = False
        self.decoder = hpack.Decoder()
        self.header_cache: dict[bytes, list[tuple[str, str]]] = {}
        self.table_first: object = None  # the dynamic table's newest entry, by identity
        self.table_state = (0, self.decoder.header_table.maxsize)
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        self.header_block: bytearray | None = None  # HEADERS awaiting CONTINUATION
        self.header_stream = 0
        self.header_end_stream = False
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.send_window = DEFAULT_WINDOW  # connection-level, towards Envoy
        self.recv_unacked = 0
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.blocked: dict[int, _Stream] = {}  # streams with data waiting for window
        self.going_away = False
        self.goaway_limit = MAX_WINDOW  # streams above this id are refused
        self.drain_ping: bytes | None = None
        self.closed = False

    # --- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        if self.server.balancer is not None:
            self.server.balancer.opened()
        settings = b"".join(struct.pack(">HI", key, value) for key, value in (
            (S_ENABLE_PUSH, 0),
            (S_MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams),
            (S_INITIAL_WINDOW_SIZE, MAX_WINDOW),
            (S_MAX_FRAME_SIZE, OUR_MAX_FRAME),
        ))
        # The connection window cannot be set by SETTINGS: open it with a WINDOW_UPDATE.
        self._write(_frame(SETTINGS, 0, 0, settings)
                    + _frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - DEFAULT_WINDOW)))
        if self.server.stopping:
            self.start_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.server.balancer is not None:
            self.server.balancer.closed()
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.streams.clear()
        self.server.check_idle()

    def data_received(self, data: bytes) -> None:
        busypoll.kick(len(self.streams))  # opt-in: poll for the next message, not sleep
        if self.inbuf:
            # A frame spread over reads: collected until it is whole, then parsed from one
            # bytes object (never re-copied per read, so a multi-MiB body stays linear).
            self.inbuf += data
            if len(self.inbuf) < self.need:
                return
            data = bytes(self.inbuf)
            self.inbuf = bytearray()
        pos, size = 0, len(data)
        if not self.preface_seen:
            if size < len(PREFACE):
                if not PREFACE.startswith(data):
                    self._abort(PROTOCOL_ERROR, "not an HTTP/2 client")
                    return
                self.inbuf, self.need = bytearray(data), len(PREFACE)
                return
            if not data.startswith(PREFACE):
                self._abort(PROTOCOL_ERROR, "not an HTTP/2 client")
                return
            pos = len(PREFACE)
            self.preface_seen = True
        view = memoryview(data)  # slices of an immutable bytes: no copies until kept
        try:
            while size - pos >= 9:
                length = int.from_bytes(view[pos:pos + 3], "big")
                if length > OUR_MAX_FRAME:
                    self._abort(FRAME_SIZE_ERROR, "frame too large")
                    return
                end = pos + 9 + length
                if end > size:
                    self.need = end - pos
                    break
                kind = data[pos + 3]
                flags = data[pos + 4]
                stream_id = int.from_bytes(view[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                payload = view[pos + 9:end]
                pos = end
                if kind == DATA:
                    self._on_data(stream_id, flags, payload)
                elif self.header_block is not None and kind != CONTINUATION:
                    self._abort(PROTOCOL_ERROR, "expected CONTINUATION")
                    return
                elif kind == HEADERS:
                    self._on_headers(stream_id, flags, payload)
                elif kind == CONTINUATION:
                    self._on_continuation(stream_id, flags, payload)
                elif kind == WINDOW_UPDATE:
                    self._on_window_update(stream_id, payload)
                elif kind == SETTINGS:
                    self._on_settings(flags, payload)
                elif kind == PING:
                    self._on_ping(flags, payload)
                elif kind == RST_STREAM:
                    stream = self.streams.pop(stream_id, None)
                    if stream is not None:
                        self._cancel(stream)
                elif kind == GOAWAY:
                    pass  # Envoy opens a new connection for new streams; ours finish
                elif kind == PUSH_PROMISE:
                    self._abort(PROTOCOL_ERROR, "push from a client")
                    return
                if self.closed:
                    return
            else:
                self.need = 9
        except _ConnectionError as exc:
            self._abort(exc.code, str(exc))
            return
        except (IndexError, ValueError, struct.error):
            # A frame too short for what its type and flags promise, in a spot not checked
            # above: the peer is not a correct HTTP/2 client, and only its connection ends.
            self._abort(PROTOCOL_ERROR, "malformed frame")
            return
        if pos < size:
            self.inbuf = bytearray(view[pos:])

    # --- frames in -----------------------------------------------------------------------

    def _on_headers(self, stream_id: int, flags: int, payload: memoryview) -> None:
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise _ConnectionError(PROTOCOL_ERROR, "bad HEADERS padding")
            start, end = 1, end - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if stream_id == 0 or start > end:
            raise _ConnectionError(PROTOCOL_ERROR, "bad HEADERS frame")
        block = payload[start:end]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, bytes(block), bool(flags & END_STREAM))
        else:
            self.header_block = bytearray(block)
            self.header_stream = stream_id
            self.header_end_stream = bool(flags & END_STREAM)

    def _on_continuation(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if self.header_block is None or stream_id != self.header_stream:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self.header_block += payload
        if len(self.header_block) > 1 << 20:
            raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
        if flags & END_HEADERS:
            block, self.header_block = bytes(self.header_block), None
            self._on_header_block(stream_id, block, self.header_end_stream)

    def _on_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        # Decoded even for a stream we refuse: the dynamic table must stay in step.
        headers = self._decode(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: the request side is over
            if end_stream:
                self._remote_end(stream)
            return
        if stream_id <= self.last_stream_id or not stream_id & 1:
            return  # a closed (or server-initiated) stream: nothing to do
        self.last_stream_id = stream_id
        if stream_id > self.goaway_limit or len(self.streams) >= \
                self.server.max_concurrent_streams:
            self._write(_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        path = ""
        metadata = []
        for name, value in headers:
            if name == ":path":
                path = value
            elif name[0] != ":":
                metadata.append((name, value))
        method = self.server.methods.get(path)
        if method is None:
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id, _RESPONSE_HEADERS
                               + _trailers(UNIMPLEMENTED, f"unknown method {path}")))
            return
        stream = _Stream(stream_id, method, self.peer_initial_window, tuple(metadata))
        stream.remote_done = end_stream
        self.streams[stream_id] = stream
        stream.task = self.loop.create_task(self._serve(stream))

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        """HPACK-decodes a header block, from a cache when decoding it cannot change anything.

        Envoy sends every stream's request headers as the same few bytes once its dynamic table
        is warm, but `:path` as a Huffman literal that is never indexed, and decoding that in
        pure Python was about 40 % of this transport's CPU per request. A block whose decoding
        left the dynamic table as it was decodes to the same headers for as long as the table
        stays so; any block that changes the table empties the cache."""
        entry = self.header_cache.get(block)
        if entry is not None:
            return entry
        table = self.decoder.header_table
        try:
            # str pairs (raw=False), whatever the package's annotations say
            headers = cast(list[tuple[str, str]], self.decoder.decode(block))
        except hpack.HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, "bad header block") from exc
        entries = table.dynamic_entries
        first = entries[0] if entries else None
        state = (len(entries), table.maxsize)
        if first is not self.table_first or state != self.table_state:
            self.table_first, self.table_state = first, state
            self.header_cache.clear()
        elif len(self.header_cache) < 64:
            self.header_cache[block] = headers
        return headers

    def _on_data(self, stream_id: int, flags: int, payload: memoryview) -> None:
        length = len(payload)
        self.recv_unacked += length
        if self.recv_unacked >= REFILL_AT:
            self._write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_done:
            return  # a stream we ended or reset: its data is dropped (and counted above)
        stream.recv_unacked += length
        if stream.recv_unacked >= REFILL_AT:
            self._write(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.recv_unacked)))
            stream.recv_unacked = 0
        if flags & PADDED:
            if length == 0 or payload[0] >= length:
                raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
            payload = payload[1:length - payload[0]]
        buffer = stream.buffer
        if not buffer and len(payload) >= 5 and payload[0] == 0 and \
                _U32.unpack_from(payload, 1)[0] == len(payload) - 5:
            # The usual case: one whole message in one frame, taken without copying twice.
            if len(payload) - 5 > self.server.max_message_bytes:
                self._fail(stream, RESOURCE_EXHAUSTED, "message larger than the limit")
                return
            stream.inbox.append(bytes(payload[5:]))
        else:
            buffer += payload
            while len(buffer) >= 5:
                if buffer[0] != 0:
                    self._fail(stream, INTERNAL, "compressed messages are not accepted")
                    return
                size = _U32.unpack_from(buffer, 1)[0]
                if size > self.server.max_message_bytes:
                    self._fail(stream, RESOURCE_EXHAUSTED, "message larger than the limit")
                    return
                if len(buffer) < 5 + size:
                    break
                stream.inbox.append(bytes(buffer[5:5 + size]))
                del buffer[:5 + size]
        if flags & END_STREAM:
            self._remote_end(stream)
        else:
            stream.wake()

    def _remote_end(self, stream: _Stream) -> None:
        stream.remote_done = True
        stream.wake()
        if stream.closed:
            self.streams.pop(stream.id, None)

    def _on_window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "window overflow")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.send_window += increment
        if self.blocked:
            for stream in list(self.blocked.values()):
                self._send_pending(stream)

    def _on_settings(self, flags: int, payload: memoryview) -> None:
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad SETTINGS")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= OUR_MAX_FRAME:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE only bounds the peer's decoder; our replies never index.
        self._write(_frame(SETTINGS, ACK, 0))
        if self.blocked:
            for stream in list(self.blocked.values()):
                self._send_pending(stream)

    def _on_ping(self, flags: int, payload: memoryview) -> None:
        if len(payload) != 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad PING")
        if not flags & ACK:
            self._write(_frame(PING, ACK, 0, bytes(payload)))
        elif self.drain_ping is not None and bytes(payload) == self.drain_ping:
            # Every stream Envoy opened before our first GOAWAY has arrived by now.
            self.drain_ping = None
            self.goaway_limit = self.last_stream_id
            self._write(_frame(GOAWAY, 0, 0, _U32.pack(self.last_stream_id)
                               + _U32.pack(NO_ERROR)))
            self.server.check_idle()

    # --- streams ---------------------------------------------------------------------------

    async def _serve(self, stream: _Stream) -> None:
        method = stream.method
        context = Context(stream.metadata)
        try:
            if method.unary:
                requests = stream.messages()
                request = None
                async for message in requests:
                    request = message
                    break
                if request is None:
                    raise GrpcError(INTERNAL, "no request message")
                self._send_message(stream, method.encode(await method.handler(request, context)))
            else:
                encode = method.encode
                async for reply in method.handler(stream.messages(), context):
                    self._send_message(stream, encode(reply))
            self._end(stream, OK, "")
        except asyncio.CancelledError:
            return  # the client reset the stream or the connection went away
        except GrpcError as exc:
            self._end(stream, exc.code, exc.message)
        except Exception:
            log.exception("ext_proc handler failed")
            self._end(stream, INTERNAL, "internal error")
        finally:
            stream.task = None
            if stream.closed and stream.remote_done:
                self.streams.pop(stream.id, None)
            self.server.check_idle()

    def _send_message(self, stream: _Stream, message: bytes) -> None:
        if stream.closed or self.closed:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self._write(_frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS))
        size = len(message) + 5
        if stream.pending or size > min(stream.send_window, self.send_window,
                                        self.peer_max_frame):
            stream.pending += b"\x00" + len(message).to_bytes(4, "big") + message
            self._send_pending(stream)
            return
        stream.send_window -= size
        self.send_window -= size
        # Head and message as two pieces: the one join per loop turn is the only copy.
        self._write(_DATA_HEAD.pack(size << 8 | DATA, 0, stream.id, 0, len(message)))
        self._write(message)

    def _send_pending(self, stream: _Stream) -> None:
        """Writes as much of the stream's waiting data as both windows allow, then its
        trailers once nothing is left."""
        pending = stream.pending
        while pending:
            size = min(len(pending), stream.send_window, self.send_window, self.peer_max_frame)
            if size <= 0:
                self.blocked[stream.id] = stream
                return
            chunk = bytes(pending[:size])
            del pending[:size]
            stream.send_window -= size
            self.send_window -= size
            self._write(_frame(DATA, 0, stream.id, chunk))
        self.blocked.pop(stream.id, None)
        if stream.pending_end is not None:
            trailers, stream.pending_end = stream.pending_end, None
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, trailers))

    def _end(self, stream: _Stream, code: int, message: str) -> None:
        if stream.closed or self.closed:
            return
        stream.closed = True
        block = _trailers(code, message)
        if not stream.headers_sent:  # trailers-only reply
            stream.headers_sent = True
            block = _RESPONSE_HEADERS + block
        if stream.pending:
            stream.pending_end = block
            return
        self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id, block))

    def _fail(self, stream: _Stream, code: int, message: str) -> None:
        """Ends a stream the server itself refuses (bad framing, too large a message)."""
        self._end(stream, code, message)
        # NO_ERROR after a complete reply: "stop sending the rest" (RFC 9113 section 8.1).
        self._write(_frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
        self.streams.pop(stream.id, None)
        self._cancel(stream)

    def _cancel(self, stream: _Stream) -> None:
        stream.closed = True
        stream.remote_done = True
        self.blocked.pop(stream.id, None)
        if stream.task is not None:
            stream.task.cancel()

    # --- output ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Queued and written once per loop turn: the replies of one turn leave in one write,
        so Envoy wakes once for them."""
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        out, self.out = self.out, []
        if self.transport is not None and not self.closed and out:
            self.transport.write(b"".join(out))

    def _abort(self, code: int, reason: str) -> None:
        log.warning("closing an ext_proc connection: %s", reason)
        self._write(_frame(GOAWAY, 0, 0, _U32.pack(self.last_stream_id) + _U32.pack(code)))
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start_drain(self) -> None:
        """First GOAWAY step: no new streams please, and a PING to learn when Envoy has seen it."""
        if self.going_away or self.closed:
            return
        self.going_away = True
        self.drain_ping = b"tolldrain"[:8]
        self._write(_frame(GOAWAY, 0, 0, _U32.pack(MAX_WINDOW) + _U32.pack(NO_ERROR))
                    + _frame(PING, 0, 0, self.drain_ping))

    @property
    def idle(self) -> bool:
        return not self.streams and self.drain_ping is None


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("serving an ext_proc connection failed: %s", task.exception())


class GrpcServer:
    """Serves `methods` ({"/package.Service/Method": Method}) on one TCP port."""

    def __init__(self, methods: dict[str, Method], max_message_bytes: int,
                 max_concurrent_streams: int = 10_000) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.balancer: Balancer | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    async def start(self, host: str, port: int, balancer: Balancer | None = None) -> int:
        """Binds (SO_REUSEPORT: the workers share the port) and serves; returns the bound port
        (useful with port 0). With a `balancer`, new connections may go to a sibling worker."""
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(address)
            listener.listen(1024)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.balancer = balancer
        if balancer is not None:
            balancer.start(self._adopt)
        self._accepting = asyncio.get_running_loop().create_task(self._accept(listener))
        bound: int = listener.getsockname()[1]
        return bound

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _address = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # e.g. EMFILE: wait instead of spinning
                log.warning("accepting an ext_proc connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if self.balancer is not None and self.balancer.hand_over(conn):
                conn.close()  # the sibling's descriptor keeps the connection open
                continue
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        """Serves an accepted connection (ours, or one a sibling handed over)."""
        if self.stopping:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: _Connection(self), conn))
        task.add_done_callback(_log_failure)

    def check_idle(self) -> None:
        if self.stopping and all(conn.idle for conn in self.connections):
            self._idle.set()

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets open streams finish for up to `grace` seconds, then cancels
        what is left and closes the connections."""
        self.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        if self.balancer is not None:
            self.balancer.stop()
        for conn in list(self.connections):
            conn.start_drain()
        self.check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning("stopping with ext_proc streams still open")
        for conn in list(self.connections):
            for stream in list(conn.streams.values()):
                conn._cancel(stream)
            conn._flush()
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)
