"""Counting what content policies did, and the opt-in body log, off the request path.

Each request's hits are added to an in-memory tally (no I/O); a background task writes the
tally to Redis once a second in one pipeline (HINCRBY per field, TTL 35 days), where
`tollgate get policies` and the operator's Policy status read it (store/live_state.py). A
failed write keeps the tally for the next round: counts are for people, so a replica stopping
between two flushes may lose at most a second of them.

The body log (Policy `logBodies`, off by default) is written the same way: one XADD per request
to a stream trimmed on every write to `BODY_LOG_MAXLEN` entries and `BODY_LOG_TTL_S` of age.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable

from extproc.core.policy.engine import Hit
from extproc.server import metrics
from extproc.server.bodylog_file import BodyLogFile
from extproc.store.live_state import utc_day
from extproc.store.redis_store import REDIS_DOWN, Store

log = logging.getLogger(__name__)
_TTL_S = 35 * 86_400
BODY_LOG_MAXLEN = 10_000
BODY_LOG_TTL_S = 86_400
_MAX_PENDING_LOGS = 1_000  # Redis unreachable: older entries are dropped, memory stays bounded


class PolicyHitRecorder:
    def __init__(self, store: Store, body_file: BodyLogFile | None = None) -> None:
        self.store = store
        # Opt-in second target (TOLLGATE_BODY_LOG_FILE): the same entries as JSON lines.
        self.body_file = body_file
        self.file_logs: collections.deque[bytes] = collections.deque(maxlen=_MAX_PENDING_LOGS)
        self.tally: collections.Counter[tuple[str, str]] = collections.Counter()
        self.logs: collections.deque[bytes] = collections.deque(maxlen=_MAX_PENDING_LOGS)

    def log_bodies(self, entry: bytes) -> None:
        """One request's opt-in body log entry (JSON), written with the next flush."""
        self.logs.append(entry)
        if self.body_file is not None:
            self.file_logs.append(entry)

    def record(self, hits: Iterable[Hit]) -> None:
        """One request's hits: each rule that acted counts the request once per action."""
        for hit in hits:
            metrics.POLICY_ACTIONS.labels(hit.policy, hit.rule, hit.action, hit.side).inc()
            self.tally[(hit.policy, hit.action)] += 1
            self.tally[(hit.policy, f"{hit.rule}:{hit.action}")] += 1

    async def flush(self) -> None:
        if self.file_logs and self.body_file is not None:
            lines = list(self.file_logs)
            self.file_logs.clear()
            # Written whatever Redis does; a thread, so a slow disk never stalls requests.
            await asyncio.to_thread(self.body_file.write, lines)
        if not self.tally and not self.logs:
            return
        tally, self.tally = self.tally, collections.Counter()
        logs = list(self.logs)
        self.logs.clear()
        day = utc_day()
        stream = self.store.keys.body_log
        try:
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for (policy, field), count in tally.items():
                    key = self.store.keys.policy_hits(policy, day)
                    pipe.hincrby(key, field, count)
                    pipe.expire(key, _TTL_S)
                for entry in logs:
                    pipe.xadd(stream, {"entry": entry}, maxlen=BODY_LOG_MAXLEN,
                              approximate=True)
                if logs:
                    oldest_ms = int((time.time() - BODY_LOG_TTL_S) * 1000)
                    pipe.xtrim(stream, minid=str(oldest_ms), approximate=False)
                    pipe.expire(stream, BODY_LOG_TTL_S)
                await pipe.execute()
        except REDIS_DOWN as exc:
            self.tally.update(tally)  # try again next round
            self.logs.extendleft(reversed(logs))
            log.debug("policy hit counts not written yet: %s", exc)

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self.body_file is not None:
            self.body_file.close()
