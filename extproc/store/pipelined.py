"""One pipelined Redis connection per client for Tollgate's script calls (EVALSHA).

Why hand-written: redis-py's asyncio client costs about as much CPU per command as the rest of the
reservation (≈ 20 % of the in-process work of the full limits path, bench/README.md): a
`BlockingConnectionPool` checkout (a condition and an asyncio timeout), a readiness poll of the
socket, a retry wrapper, observability hooks, a stream reader woken per reply and its parsing
layers. Here a call is: pack the command (hiredis), append it to the write buffer, wait on a
future that the protocol resolves from `data_received`. Redis answers the commands of one
connection in the order it received them, so replies are matched to calls in order. Calls made
in the same event-loop turn leave in one write, and their replies often arrive in one read:
fewer system calls on both sides than a connection per call.

Only the calls Tollgate makes by the thousand per second go through here (the scripts on the
request path and the settle batches). Everything else keeps redis-py, and a Redis Cluster keeps
redis-py for everything (its client routes by slot and follows redirections).

What stays as it was with redis-py's pool:
* The connection is set up by redis-py's own `Connection` class from the pool's settings (TCP,
  TLS or unix socket, AUTH, SELECT, its connect timeout); only then is its transport handed to
  this protocol.
* Each call waits at most the pool's socket timeout, then raises redis-py's `TimeoutError`. As
  redis-py discards a connection whose reply is late, the connection then takes no new call (the
  next one connects afresh); the calls already on it keep their own deadlines (a Redis that was
  only slow answers them), and it is closed once none is left waiting. Redis still runs what it
  had received (a stalled Redis resumes): the scripts are idempotent per request id and
  settle.lua cancels a late reserve, exactly as before.
* Any error of the transport becomes redis-py's `ConnectionError` (what `REDIS_DOWN` catches,
  as `_TransportErrors` does for the pool's connections); Redis' error replies become redis-py's
  exceptions (`NoScriptError`, `ResponseError`), parsed by redis-py's own parser table.
* A connection closed by Redis (restart, `CLIENT KILL`) fails the calls waiting on it with
  `ConnectionError`; the next call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc import busypoll

_NOT_READY = object()  # hiredis' "no complete reply buffered yet" (RESP2 has no False reply)


class _Waiter:
    """Calls waiting for replies, in the order their commands were written: one future per
    call or batch of `count` commands."""

    __slots__ = ("count", "future", "timer")

    def __init__(self, future: asyncio.Future[Any], count: int,
                 timer: asyncio.TimerHandle) -> None:
        self.future = future
        self.count = count
        self.timer = timer


class _Link(asyncio.Protocol):
    """One open connection: writes commands, matches replies to waiters in order."""

    def __init__(self, writer: asyncio.StreamWriter, timeout_s: float, where: str) -> None:
        # The stream writer is kept only because it closes the transport when collected.
        self.writer = writer
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self.timeout_s = timeout_s
        self.where = where
        self.closed = False
        self.stale = False  # a reply came too late: no new calls, closed when none wait
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader(protocolError=InvalidResponse,
                                     replyError=BaseParser.parse_error, notEnoughData=_NOT_READY)
        self.waiting: collections.deque[_Waiter] = collections.deque()
        self.replies: list[Any] = []  # of the batch at the head of `waiting`, so far
        self.out: list[bytes] = []  # commands of this loop turn, written by `_write`

    def send(self, commands: list[bytes]) -> asyncio.Future[Any]:
        """Queue commands; the future gets the reply (one command) or the list of replies."""
        if self.closed:
            raise RedisConnectionError(f"connection to {self.where} lost")
        future: asyncio.Future[Any] = self.loop.create_future()
        timer = self.loop.call_later(self.timeout_s, self._expire, future)
        self.waiting.append(_Waiter(future, len(commands), timer))
        if not self.out:
            self.loop.call_soon(self._write)
        self.out += commands
        return future

    def _write(self) -> None:
        out, self.out = self.out, []
        if self.closed or not out:
            return
        try:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        except Exception as exc:  # a transport torn down under us: as any connection loss
            self.drop(RedisConnectionError(f"connection to {self.where} lost while writing: "
                                           f"{exc!r}"))

    def data_received(self, data: bytes) -> None:
        busypoll.extend()  # opt-in (extproc/busypoll.py)
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except InvalidResponse as exc:
                self.drop(RedisConnectionError(f"bad reply from {self.where}: {exc}"))
                return
            if reply is _NOT_READY:
                if self.stale and not waiting:
                    self.drop(RedisConnectionError(f"connection to {self.where} retired"))
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.drop(RedisConnectionError(f"unexpected reply from {self.where}"))
                return
            head = waiting[0]
            if head.count == 1:
                waiting.popleft()
                head.timer.cancel()
                if not head.future.done():  # done: the caller was cancelled
                    if isinstance(reply, Exception):
                        head.future.set_exception(reply)
                    else:
                        head.future.set_result(reply)
                continue
            self.replies.append(reply)
            if len(self.replies) == head.count:
                waiting.popleft()
                head.timer.cancel()
                replies, self.replies = self.replies, []
                if not head.future.done():
                    head.future.set_result(replies)

    def _expire(self, future: asyncio.Future[Any]) -> None:
        # A future already done was cancelled by its caller; its reply, if it comes, is skipped.
        if not future.done():
            future.set_exception(RedisTimeoutError(f"Timeout reading from {self.where}"))
            self.stale = True
        if self.stale and all(w.future.done() for w in self.waiting):
            self.drop(RedisConnectionError(
                f"connection to {self.where} dropped: a reply took over {self.timeout_s} s"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.drop(RedisConnectionError(
            f"connection to {self.where} lost" + (f": {exc}" if exc else "")))

    def drop(self, error: Exception) -> None:
        """Close the connection and fail every call still waiting on it."""
        if not self.closed:
            self.closed = True
            self.transport.abort()
        while self.waiting:
            waiter = self.waiting.popleft()
            waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self.replies = []
        self.out = []


class PipelinedConnection:
    """Script calls on one lazily (re)opened connection, set up like the pool's own."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        kwargs = pool.connection_kwargs
        self.timeout_s = float(kwargs.get("socket_timeout") or 5.0)
        self.where = str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}")
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None

    async def call(self, *args: Any) -> Any:
        """One command; its reply, or the error Redis answered raised as redis-py's."""
        link = self._link
        if link is None or link.closed or link.stale:
            link = await self._connected()
        return await link.send([_pack(args)])

    async def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands written at once; their replies, Redis' errors as values."""
        link = self._link
        if link is None or link.closed or link.stale:
            link = await self._connected()
        replies: list[Any] = await link.send([_pack(c) for c in commands])
        return replies

    async def _connected(self) -> _Link:
        # One connect shared by the callers that need it at once; shielded, so that a caller
        # cancelled meanwhile does not cancel it for the others.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(_retrieve)
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Link:
        try:
            conn = self.pool.make_connection()
            await conn.connect()
            # redis-py 8.1 (pinned) keeps its stream writer here; the transport is ours from now
            # on, and the Connection object, emptied, no longer reports it as unclosed.
            writer = conn._writer
            conn._writer = conn._reader = None
            link = _Link(writer, self.timeout_s, self.where)
            link.transport.set_protocol(link)
            self._link = link
            return link
        finally:
            self._connecting = None

    def close(self) -> None:
        if self._link is not None:
            self._link.drop(RedisConnectionError(f"connection to {self.where} closed"))
            self._link = None


def _pack(args: tuple[Any, ...]) -> bytes:
    try:
        packed: bytes = hiredis.pack_command(args)
    except TypeError as exc:  # an argument of a type Redis cannot take: redis-py's error
        raise DataError(f"cannot send {args[0]!r}: {exc}") from exc
    return packed


def _retrieve(task: asyncio.Task[_Link]) -> None:
    """A failed connect whose callers were all cancelled: not an "exception never retrieved"."""
    if not task.cancelled():
        task.exception()
