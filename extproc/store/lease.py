"""A Redis lease: at most one holder at a time, for as long as it keeps renewing.

Used so that only one operator replica writes configuration (the same Redis it writes to decides,
so there is no second system to agree with). Acquire is `SET key holder NX PX ttl`; renewal and
release are compare-and-act scripts, so a holder whose lease expired can never extend or delete
its successor's. A holder that cannot renew for a whole lease time must assume it lost the lease:
by then another replica may hold it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from importlib import resources as importlib_resources

import redis.asyncio as aioredis

from extproc.store.redis_store import REDIS_DOWN

log = logging.getLogger(__name__)


def _lua(name: str) -> str:
    return importlib_resources.files("extproc.store").joinpath(f"lua/{name}").read_text()


class RedisLease:
    def __init__(self, client: aioredis.Redis, key: str, holder: str, ttl_s: float = 15.0) -> None:
        self.redis = client
        self.key = key
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self._renew = client.register_script(_lua("lease_renew.lua"))
        self._release = client.register_script(_lua("lease_release.lua"))
        self._valid_until = 0.0  # monotonic time up to which the lease is surely ours

    @property
    def held(self) -> bool:
        """True while the last successful acquire/renew is younger than the lease time."""
        return time.monotonic() < self._valid_until

    async def try_acquire(self) -> bool:
        """One attempt: take the lease if it is free (or already ours)."""
        started = time.monotonic()
        try:
            if await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms):
                self._valid_until = started + self.ttl_ms / 1000
                return True
            return await self.renew()
        except REDIS_DOWN as exc:
            log.warning("lease %s: cannot reach Redis: %s", self.key, exc)
            return False

    async def acquire(self, poll_s: float = 1.0, timeout_s: float | None = None) -> bool:
        """Wait until the lease is ours (or `timeout_s` passes: False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not await self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours. Redis errors propagate."""
        started = time.monotonic()
        if int(await self._renew(keys=[self.key], args=[self.holder, self.ttl_ms])):
            self._valid_until = started + self.ttl_ms / 1000
            return True
        self._valid_until = 0.0
        return False

    async def release(self) -> None:
        self._valid_until = 0.0
        try:
            await self._release(keys=[self.key], args=[self.holder])
        except REDIS_DOWN as exc:
            log.warning("lease %s: release failed (it will expire): %s", self.key, exc)

    async def keep(self, on_lost: Callable[[], None], every_s: float | None = None) -> None:
        """Renew every third of the lease time until cancelled. Calls `on_lost` (once) and
        returns when the lease is taken by someone else, or when renewals failed for so long
        that it may have expired."""
        interval = every_s if every_s is not None else self.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.renew():
                    continue
                log.error("lease %s: now held by someone else", self.key)
            except REDIS_DOWN as exc:
                if self.held:
                    log.warning("lease %s: renewal failed, retrying: %s", self.key, exc)
                    continue
                log.error("lease %s: not renewed within the lease time: %s", self.key, exc)
            on_lost()
            return
