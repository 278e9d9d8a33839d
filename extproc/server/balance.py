"""Even connections over the workers: a worker hands a new connection to a sibling with fewer.

The workers share the gRPC port (SO_REUSEPORT), and the kernel picks the worker of each new
connection by a hash of its addresses. Envoy keeps one long-lived HTTP/2 connection per Envoy
thread, so with 2 threads and 2 workers both connections land on one worker about half of the
time, and that worker serves everything while the other idles (docs/performance.md). Balancing
streams instead of connections is not an option: a call's streams must stay in one worker for the
failover (server/failover.py).

So each worker counts its connections in a small file in the run directory, and when the kernel
gives it a connection while a sibling has fewer (by two or more, counting the new one), it passes
the socket to that sibling over a Unix datagram socket (SCM_RIGHTS) before reading a byte of it;
the sibling serves it as if it had accepted it. Connections are rare events (Envoy opens a few at
start and after a restart), so reading the siblings' files then costs nothing on the request path.
If the sibling cannot take it (not started, restarting, gone), the worker keeps the connection.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class Balancer:
    def __init__(self, run_dir: str, index: int, workers: int) -> None:
        self.dir = Path(run_dir)
        self.index = index
        self.workers = workers
        self.count = 0  # connections this worker serves
        self.handed = 0  # connections passed to siblings (for /readyz and tests)
        self._inbox: socket.socket | None = None
        self._stopped = False
        self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.setblocking(False)  # a sibling that does not read is skipped, not waited for

    def _count_path(self, index: int) -> Path:
        return self.dir / f"connections-{index}"

    def _inbox_path(self, index: int) -> str:
        return str(self.dir / f"handoff-{index}.sock")

    def start(self, adopt: Callable[[socket.socket], None]) -> None:
        """Listens for sockets from siblings; `adopt` serves one."""
        path = self._inbox_path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous worker of this index
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.bind(path)
        inbox.setblocking(False)
        self._inbox = inbox
        self._publish()

        def receive() -> None:
            while True:
                try:
                    _msg, fds, _flags, _addr = socket.recv_fds(inbox, 16, 4)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.warning("connection hand-over failed: %s", exc)
                    return
                for fd in fds:
                    adopt(socket.socket(fileno=fd))

        asyncio.get_running_loop().add_reader(inbox.fileno(), receive)

    def stop(self) -> None:
        self._stopped = True
        if self._inbox is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._inbox.fileno())
            self._inbox.close()
            self._inbox = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._inbox_path(self.index))
        self._outbox.close()
        with contextlib.suppress(FileNotFoundError):
            self._count_path(self.index).unlink()

    def opened(self) -> None:
        self.count += 1
        self._publish()

    def closed(self) -> None:
        self.count -= 1
        self._publish()

    def _publish(self) -> None:
        if self._stopped:
            return
        path = self._count_path(self.index)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(str(self.count))
            tmp.replace(path)  # atomic: a sibling never reads half a number
        except OSError as exc:
            log.warning("cannot write the connection count: %s", exc)

    def _sibling_counts(self) -> list[tuple[int, int]]:
        counts = []
        for index in range(self.workers):
            if index == self.index:
                continue
            try:
                counts.append((int(self._count_path(index).read_text()), index))
            except (OSError, ValueError):
                continue  # not started yet, or restarting
        return sorted(counts)

    def hand_over(self, conn: socket.socket) -> bool:
        """Passes a just-accepted connection to the sibling with the fewest connections if that
        sibling has fewer than this worker has now (so it still has no more after taking it).
        True when passed: the caller then closes its own descriptor, and the sibling's keeps
        the connection open."""
        for count, index in self._sibling_counts():
            if count >= self.count:
                return False  # nobody would end up with fewer than this worker
            try:
                # sendmsg, not socket.send_fds: that one drops its `address` argument.
                self._outbox.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [conn.fileno()]))],
                                     0, self._inbox_path(index))
            except OSError:
                continue  # that sibling is not listening: try the next
            self.handed += 1
            return True
        return False
