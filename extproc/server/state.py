"""Live state a worker holds outside the per-request path: the configuration snapshot (reloaded
when the generation moves) and the virtual-key directory."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from importlib import resources as importlib_resources
from pathlib import Path

import yaml

from extproc.core.keys import PresentedKey, hash_key
from extproc.core.resources import KeyRecord, Resource, key_record, validate_documents
from extproc.core.snapshot import Snapshot, build_snapshot, patch_snapshot, refresh_secrets
from extproc.server import metrics, tracing
from extproc.server.phrase_index import automaton
from extproc.store.redis_store import Store, StoreUnavailable

log = logging.getLogger(__name__)


def builtin_resources() -> list[Resource]:
    text = importlib_resources.files("extproc").joinpath("data/builtin.yaml").read_text()
    return validate_documents(yaml.safe_load_all(text), "builtin.yaml")


def secret_reader(secrets_dir: str) -> Callable[[str], str | None]:
    """Provider secrets come from the environment or from files mounted in `secrets_dir`
    (a Kubernetes Secret volume), by name. They are never stored in Redis."""

    def read(name: str) -> str | None:
        value = os.environ.get(name)
        if value:
            return value
        try:
            return (Path(secrets_dir) / name).read_text().strip() or None
        except OSError:
            return None

    return read


class ConfigWatcher:
    """Keeps `snapshot` current: reload on a pub/sub notice, with polling as the backstop (a
    notice can be missed during a reconnect). A reload applies only what changed when the
    store's change log accounts for every write since the snapshot (a key created among 100,000
    takes milliseconds, not the seconds of a full load); otherwise, and every `FULL_RELOAD_S` as
    a backstop against writes that bypass the log, everything is loaded, in a thread, while
    requests go on with the current snapshot. Secret files are re-read at least every 30 s."""

    SECRETS_S = 30.0
    FULL_RELOAD_S = 600.0

    def __init__(self, store: Store, secrets_dir: str, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self.snapshot: Snapshot | None = None
        self.redis_ok = False
        self._builtin = builtin_resources()
        self._secrets = secret_reader(secrets_dir)
        self._loaded_at = 0.0  # last full load
        self._secrets_at = 0.0
        self.changed = asyncio.Event()

    async def reload(self) -> None:
        """Bring the snapshot up to the stored generation: the changes if they can be read,
        everything otherwise."""
        if self.snapshot is not None:
            changes = await self.store.load_changes(self.snapshot.generation)
            if changes is not None:
                patched = patch_snapshot(self.snapshot, changes.generation, changes.changes,
                                         self._builtin, self._secrets, automaton)
                if patched is not None:
                    self._swap(patched)
                    log.info("configuration generation %d loaded (%d changed resources)",
                             patched.generation, len(changes.changes))
                    return
        await self.full_reload()

    async def full_reload(self) -> None:
        generation, stored = await self.store.load()
        # Built in a thread, like the decoding in `load`: about a second per 100,000
        # resources, during which the loop keeps serving with the current snapshot.
        self._swap(await asyncio.to_thread(build_snapshot, generation, self._builtin, stored,
                                           self._secrets, automaton))
        self._loaded_at = time.monotonic()
        log.info("configuration generation %d loaded (%d resources)", generation, len(stored))

    def _swap(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._secrets_at = time.monotonic()
        metrics.CONFIG_GENERATION.set(snapshot.generation)
        metrics.CONFIG_RELOADS.inc()
        self.changed.set()
        self.changed.clear()

    async def _check(self) -> None:
        try:
            generation = await self.store.generation()
            self.redis_ok = True
            now = time.monotonic()
            if self.snapshot is None or now - self._loaded_at > self.FULL_RELOAD_S:
                await self.full_reload()
            elif generation != self.snapshot.generation:
                await self.reload()
            elif now - self._secrets_at > self.SECRETS_S:
                self.snapshot = refresh_secrets(self.snapshot, self._secrets)
                self._secrets_at = now
        except StoreUnavailable as exc:
            if self.redis_ok:
                log.warning("redis unavailable, serving the cached configuration: %s", exc)
            self.redis_ok = False
            metrics.REDIS_ERRORS.labels("config").inc()

    async def run(self) -> None:
        pubsub = None
        while True:
            await self._check()
            try:
                if pubsub is None:
                    pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(self.store.keys.config_channel)
                # Wait for a notice, at most one poll interval.
                await pubsub.get_message(timeout=self.poll_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # the pubsub connection broke: poll, and resubscribe next time
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                pubsub = None
                await asyncio.sleep(self.poll_s)


class KeyDirectory:
    """Resolves a presented key to its record.

    The snapshot holds every key, so a hit costs no I/O. A miss may be a key created after the
    snapshot was built, so it is checked in Redis, but only within a small per-second budget and
    behind a negative cache: a flood of random keys cannot turn into a flood of Redis calls.
    """

    def __init__(
        self,
        store: Store,
        negative_ttl_s: float = 5.0,
        misses_per_s: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.negative_ttl_s = negative_ttl_s
        self.misses_per_s = misses_per_s
        self.clock = clock
        self._negative: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._late: dict[str, tuple[int, KeyRecord]] = {}
        self._window = 0
        self._spent = 0

    async def resolve(self, snapshot: Snapshot, presented: PresentedKey) -> KeyRecord | None:
        digest = hash_key(presented.value)
        record = snapshot.keys_by_hash.get(digest)
        if record is not None:
            metrics.count(metrics.labelled(metrics.KEY_LOOKUPS, "snapshot"))
            return record
        late = self._late.get(digest)
        if late is not None and late[0] == snapshot.generation:
            return late[1]
        now = self.clock()
        expiry = self._negative.get(digest)
        if expiry is not None and expiry > now:
            metrics.KEY_LOOKUPS.labels("negative_cache").inc()
            return None
        window = int(now)
        if window != self._window:
            self._window, self._spent = window, 0
        if self._spent >= self.misses_per_s:
            metrics.KEY_LOOKUPS.labels("throttled").inc()
            return None
        self._spent += 1
        metrics.KEY_LOOKUPS.labels("redis").inc()
        try:
            with tracing.span("redis.key_lookup", {}):
                name = await self.store.key_name(digest)
                resource = await self.store.get("VirtualKey", name) if name else None
        except StoreUnavailable:
            metrics.REDIS_ERRORS.labels("key_lookup").inc()
            return None
        if resource is None or resource.spec["keySha256"] != digest:
            self._negative[digest] = now + self.negative_ttl_s
            self._negative.move_to_end(digest)
            while len(self._negative) > 100_000:
                self._negative.popitem(last=False)
            return None
        record = key_record(resource)
        if len(self._late) > 10_000:
            self._late.clear()
        self._late[digest] = (snapshot.generation, record)
        return record
