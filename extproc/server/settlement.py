"""Settlement off and on the request path, the journal, and the hold sweeper.

* `settle_now`: inline, when the response must report limit states. If Redis cannot take it the
  call is journaled and the response reports the states seen at reservation.
* `enqueue`: requests without limits only need their usage event written: such calls are sent in
  pipelined batches off the request path.
* The journal: every call that could not be written is appended to a file (one JSON line each)
  and kept in memory; a replayer retries with backoff. On start a worker adopts the journal files
  of workers that died, so a crash loses nothing either. Replays are safe because the settle
  script is idempotent per request id.
* The sweeper settles holds whose deadline passed (a request whose stream vanished without a
  trace) at their estimate. Every replica sweeps; idempotency makes that harmless.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import time
from pathlib import Path

from extproc.server import metrics, tracing
from extproc.store.quota_store import QuotaStore, SettleCall
from extproc.store.redis_store import StoreRejected, StoreUnavailable

log = logging.getLogger(__name__)


class Settler:
    def __init__(self, quota: QuotaStore, journal_dir: str, max_batch: int = 200) -> None:
        self.quota = quota
        self.max_batch = max_batch
        self.batch: collections.deque[SettleCall] = collections.deque()
        self.journal: collections.deque[SettleCall] = collections.deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task[list[int] | None]] = set()
        self.dir = Path(journal_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"journal-{os.getpid()}.jsonl"
        self.dead_path = self.dir / "rejected.jsonl"
        self._adopt_orphans()

    # -- journal ---------------------------------------------------------------------------

    def _adopt_orphans(self) -> None:
        for path in sorted(self.dir.glob("journal-*.jsonl")):
            try:
                pid = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and _alive(pid):
                continue
            try:
                lines = path.read_bytes().splitlines()
            except OSError:
                continue
            adopted = 0
            for line in lines:
                with contextlib.suppress(ValueError, KeyError):
                    self._journal(SettleCall.from_json(line))
                    adopted += 1
            if path != self.path:
                path.unlink(missing_ok=True)
            if adopted:
                log.warning("adopted %d unwritten settlements from %s", adopted, path.name)

    def _journal(self, call: SettleCall) -> None:
        with open(self.path, "ab") as fh:
            fh.write(call.to_json() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.journal.append(call)
        metrics.JOURNALED.inc()
        metrics.JOURNAL_PENDING.inc()
        self._wake.set()

    def _dead_letter(self, call: SettleCall, reason: str) -> None:
        """A call Redis refuses (not one it could not take): kept aside for an operator rather
        than blocking every settlement queued behind it."""
        log.error("settlement %s rejected by Redis, kept in %s: %s", call.request_id,
                  self.dead_path.name, reason)
        with open(self.dead_path, "ab") as fh:
            fh.write(call.to_json() + b"\n")
        metrics.REDIS_ERRORS.labels("settle_rejected").inc()

    async def _replay(self) -> None:
        while self.journal:
            call = self.journal.popleft()  # before the await: see `flush`
            try:
                await self.quota.settle(call, background=True)
            except StoreRejected as exc:
                self._dead_letter(call, str(exc))
            except BaseException:
                self.journal.appendleft(call)
                raise
            metrics.JOURNAL_PENDING.dec()
        with contextlib.suppress(OSError):
            self.path.write_bytes(b"")  # everything landed: start the file afresh

    # -- paths -----------------------------------------------------------------------------

    async def settle_now(self, call: SettleCall) -> list[int] | None:
        try:
            return await self.quota.settle(call)
        except StoreRejected as exc:
            self._dead_letter(call, str(exc))
            return None
        except StoreUnavailable as exc:
            metrics.REDIS_ERRORS.labels("settle").inc()
            log.warning("settlement of %s journaled: %s", call.request_id, exc)
            self._journal(call)
            return None

    def settle_later(self, call: SettleCall) -> None:
        """Settle inline but off this coroutine: used from `finally` blocks of cancelled streams,
        where the cancellation must not cut the settlement short."""
        task = asyncio.create_task(self.settle_now(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def enqueue(self, call: SettleCall) -> None:
        self.batch.append(call)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self.batch) + len(self.journal)

    @property
    def in_flight(self) -> int:
        """Settlements started by `settle_later` that have not finished yet (the set holds them
        so the event loop's weak reference does not drop a task mid-way; finished ones leave)."""
        return len(self._tasks)

    async def flush(self) -> None:
        # Calls leave the queue before the await, so two flushes at once (the background loop
        # and `close`, when a cancellation was swallowed inside the Redis client) never take the
        # same calls; a flush cut short puts its calls back (settling twice is harmless).
        while self.batch:
            calls = [self.batch.popleft() for _ in range(min(self.max_batch, len(self.batch)))]
            try:
                with tracing.span("redis.settle_batch", {"tollgate.settlements": len(calls)}):
                    await self.quota.settle_many(calls)
                metrics.USAGE_WRITTEN.inc(len(calls))
            except (StoreUnavailable, StoreRejected):
                # Journaled one by one: a rejected call is then set aside alone on replay.
                metrics.REDIS_ERRORS.labels("usage").inc()
                for call in calls:
                    self._journal(call)
            except BaseException:
                self.batch.extendleft(reversed(calls))
                raise
        if self.journal:
            await self._replay()

    async def run(self) -> None:
        backoff = 0.05
        # Ends when `close` starts, also if the cancellation meant to stop it was swallowed
        # inside the Redis client (seen with redis-py's timeouts under load).
        while not self._closing:
            await self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            await asyncio.sleep(0.002)  # let concurrent requests share one round trip
            try:
                await self.flush()
                backoff = 0.05
            except StoreUnavailable as exc:
                log.warning("%d settlements waiting for Redis: %s", len(self.journal), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wake.set()

    async def close(self, timeout: float) -> None:
        self._closing = True
        self._wake.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        try:
            await asyncio.wait_for(self.flush(), timeout=timeout)
        except (StoreUnavailable, TimeoutError) as exc:
            # Journaled on disk (the queued ones too): the next worker to start here replays it.
            while self.batch:
                self._journal(self.batch.popleft())
            log.error("stopping with %d settlements journaled: %s", len(self.journal), exc)

    # -- sweeper ---------------------------------------------------------------------------

    async def sweep_once(self, now_ms: int | None = None) -> int:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        calls = await self.quota.expired_holds(now_ms)
        for call in calls:
            try:
                reply = await self.quota.settle(call, background=True)
            except StoreRejected as exc:
                self._dead_letter(call, str(exc))
                await self.quota.drop_hold(call.request_id)
                continue
            if reply and reply[0] == 1:
                metrics.HOLDS_SWEPT.inc()
                log.warning("hold %s expired; settled at its estimate", call.request_id)
        return len(calls)

    async def sweep(self, interval_s: float = 1.0) -> None:
        migrated = False
        while True:
            # Jitter keeps replicas from sweeping in lockstep.
            await asyncio.sleep(interval_s * (0.5 + random.random()))
            try:
                if not migrated:
                    # Limit state left in micro-dollars by an older version (once per start;
                    # idempotent, so every replica may do it).
                    moved = await self.quota.migrate_money()
                    if moved:
                        log.warning("moved %d limit state key(s) to nano-dollars", moved)
                    migrated = True
                await self.sweep_once()
            except StoreUnavailable:
                pass
            except Exception:  # the sweeper must outlive any single bad hold
                log.exception("sweep failed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
