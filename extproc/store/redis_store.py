"""The async Redis store: resource documents, the key index and the usage stream.

Redis errors never leave this module raw: they become `StoreUnavailable`, and the caller decides
(from configuration) whether that fails open or closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from extproc.core.resources import KINDS, Resource, ResourceError, split_id, validate_document
from extproc.core.snapshot import ConfigChange
from extproc.store.keyschema import KeySchema
from extproc.store.pipelined import PipelinedConnection

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """Redis could not be reached or did not answer in time: retrying later may help."""


class StoreRejected(Exception):
    """Redis answered with an error for this call (e.g. a script error): retrying will not help."""


# What a Redis call raises when Redis is down, slow or its connection breaks. (A transport error
# redis-py leaks raw is turned into a ConnectionError by the connections themselves:
# `_TransportErrors` below.)
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError)

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

# Configuration writes the change log keeps (approximately: trimmed with `MAXLEN ~`). A replica
# further behind than that, or shown more changed resources than this at once, reloads
# everything instead.
CHANGE_LOG_LENGTH = 1000
# A write touching more resources than this is logged as "reload everything".
LOGGED_IDS = 100


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    generation: int
    changes: tuple[ConfigChange, ...]


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def connect(url: str, timeout_s: float, max_connections: int = 64) -> aioredis.Redis:
    """A client for `url`. `redis+cluster://host:port` (or `rediss+cluster://`) means a Redis
    Cluster reached through any of its nodes: every key Tollgate uses shares one hash tag, so
    each script and transaction lands on a single slot and runs there unchanged."""
    if is_cluster_url(url):
        from redis.asyncio.cluster import RedisCluster

        plain = url.replace("+cluster", "", 1)
        # The cluster client has no blocking pool: allow enough connections per node for a
        # burst (every Tollgate key lives on one node, so one node takes all the traffic).
        cluster = RedisCluster.from_url(
            plain,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=max(1024, max_connections),
        )
        # Connections the cluster client opens (to the startup nodes and to those it discovers)
        # are of this class.
        manager = cluster.nodes_manager
        wrapped = _with_transport_errors(manager.connection_kwargs["connection_class"])
        manager.connection_kwargs["connection_class"] = wrapped
        for node in manager.startup_nodes.values():
            node.connection_class = wrapped
        return cluster  # type: ignore[return-value]  # same command surface for our use
    # A blocking pool: under a burst, calls wait (up to the timeout) for a free connection
    # instead of failing with "Too many connections".
    pool = _Pool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    # The scheme chose the class (TCP, TLS, unix socket): the same one, packing with hiredis.
    base = pool.connection_class
    pool.connection_class = type(f"Packed{base.__name__}",
                                 (_HiredisPacking, _with_transport_errors(base)), {})
    pool.pipelined = PipelinedConnection(pool)
    return aioredis.Redis(connection_pool=pool)


class _Pool(aioredis.BlockingConnectionPool):
    """redis-py's pool, plus the pipelined connection for script calls (store/pipelined.py),
    set up from the same settings and closed with the pool."""

    pipelined: PipelinedConnection

    async def disconnect(self, inuse_connections: bool = True) -> None:
        self.pipelined.close()
        await super().disconnect(inuse_connections)


def pipelined(client: object) -> PipelinedConnection | None:
    """The pipelined connection of a client made by `connect` (None: a Cluster client, or one
    made elsewhere, which keep redis-py's path for everything)."""
    return getattr(getattr(client, "connection_pool", None), "pipelined", None)


def _with_transport_errors(base: type[Any]) -> type[Any]:
    return type(f"Checked{base.__name__}", (_TransportErrors, base), {})


class _TransportErrors:
    """redis-py 8.1 can leak the transport's own TypeError or AttributeError when it writes on a
    connection torn down under it (redis/redis-py#4287; seen here with a Cluster client's first
    burst of concurrent commands, before it knew the topology). They become the ConnectionError
    every layer above already handles (redis-py's retries and topology refresh, then
    `StoreUnavailable`: fail open/closed, journal, breaker) instead of a 500 and a traceback."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except (AttributeError, TypeError) as exc:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise RedisConnectionError(f"connection lost while writing: {exc!r}") from exc


class _HiredisPacking:
    """Commands packed by hiredis' C packer. redis-py's sync client already uses it; its
    asyncio connection packs every argument in Python instead, ≈ 10 µs for a reservation's
    40-odd arguments on the request path. Same bytes (checked by tests/store); a command name
    with a space (`SCRIPT LOAD`) or an argument hiredis does not take goes the Python way."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if not (b" " in first if isinstance(first, bytes) else " " in str(first)):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
        return packed


async def ready(client: aioredis.Redis) -> None:
    """Finish connecting before concurrent use: a cluster client discovers the topology on its
    first command, and many first commands at once race each other doing it."""
    init = getattr(client, "initialize", None)
    if init is not None and is_cluster_client(client):
        await init()


def is_cluster_client(client: object) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


class Store:
    def __init__(self, client: aioredis.Redis, schema: KeySchema) -> None:
        self.redis = client
        self.keys = schema
        # (kind, field) -> (stored bytes, resource) of the last load: a reload re-validates only
        # the documents whose bytes changed (validation was most of a reload's time: ~3 s for
        # 100,000 keys, bench/scale.py), and drops the ones no longer stored.
        # Kept as a 16-byte digest of the bytes, not the bytes (~250 B per resource).
        # One map per kind (no (kind, field) tuple per resource: ≈ 60 B each with 100k keys).
        self._decoded: dict[str, dict[str, tuple[bytes, Resource]]] = {}
        # Position in the change log (`KeySchema.config_changes`) of the last load: where
        # `load_changes` reads on from. None until a full load has set it.
        self._change_id: str | None = None

    @classmethod
    def from_url(cls, url: str, tag: str = "llm", timeout_s: float = 1.0) -> Store:
        return cls(connect(url, timeout_s), KeySchema(tag))

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except REDIS_DOWN:
            return False

    # -- configuration ---------------------------------------------------------------------

    async def generation(self) -> int:
        try:
            value = await self.redis.get(self.keys.generation)
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        return int(value or 0)

    async def load(self) -> tuple[int, list[Resource]]:
        """The generation and every stored resource, read in one round trip."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self.keys.generation)
                for kind in KINDS:
                    pipe.hgetall(self.keys.config(kind))
                pipe.xrevrange(self.keys.config_changes, count=1)
                replies = await pipe.execute()
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        generation = int(replies[0] or 0)
        last = replies[-1]
        # Decoding, and validating what changed, is the long part with many resources (seconds
        # for 100,000): in a thread, so that the worker's event loop keeps serving meanwhile
        # (it gets the GIL back every few milliseconds) instead of stalling.
        resources = await asyncio.to_thread(self._decode_all, replies[1:-1])
        self._change_id = _text(last[0][0]) if last else "0-0"
        return generation, resources

    def _decode_all(self, hashes: list[dict[bytes | str, bytes | str]]) -> list[Resource]:
        resources: list[Resource] = []
        previous = self._decoded
        decoded: dict[str, dict[str, tuple[bytes, Resource]]] = {}
        for kind, docs in zip(KINDS, hashes, strict=True):
            before = previous.get(kind, {})
            now = decoded[kind] = {}
            for name, raw in docs.items():
                label = name.decode() if isinstance(name, bytes) else name
                digest = _digest(raw)
                resource = self._decoded_once(kind, label, raw, digest, before)
                if resource is not None:
                    now[label] = (digest, resource)
                    resources.append(resource)
        self._decoded = decoded
        return resources

    @staticmethod
    def _decoded_once(kind: str, label: str, raw: bytes | str, digest: bytes,
                      before: dict[str, tuple[bytes, Resource]]) -> Resource | None:
        """The document as a resource, validated only if its bytes changed since `before`."""
        known = before.get(label)
        if known is not None and known[0] == digest:
            return known[1]
        resource = _decode(kind, label, raw)
        if resource is not None and kind == "VirtualKey":
            resource = _compact(resource, kind)
        return resource

    async def load_changes(self, generation: int) -> ConfigChanges | None:
        """What was stored or deleted since the last load (or change set), if the change log
        accounts for every write between `generation` (the caller's) and now; otherwise None,
        and the caller loads everything. Two round trips: the log, then the touched documents.

        A write's log entry and its generation bump are one transaction, so the entries read
        with the generation are exactly the writes up to it: as many entries as generations, or
        something wrote without logging (an older Tollgate, a hand edit) or the log was trimmed
        past us."""
        if self._change_id is None:
            return None
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self.keys.generation)
                # From the last entry seen, inclusive (exclusive ranges need Redis 6.2).
                pipe.xrange(self.keys.config_changes, min=self._change_id,
                            count=CHANGE_LOG_LENGTH + 2)
                current, entries = await pipe.execute()
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        entries = [e for e in entries if _text(e[0]) != self._change_id]
        current = int(current or 0)
        if len(entries) != current - generation or len(entries) > CHANGE_LOG_LENGTH:
            return None
        touched: dict[str, dict[str, None]] = {}  # kind -> ids, in write order
        try:
            for _entry_id, fields in entries:
                logged = orjson.loads(fields.get(b"c") or fields.get("c") or b"")
                if not isinstance(logged, list):
                    return None  # `*`: a bulk write
                for kind, ident in logged:
                    if kind not in KINDS or not isinstance(ident, str):
                        return None
                    touched.setdefault(kind, {})[ident] = None
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if sum(len(ids) for ids in touched.values()) > CHANGE_LOG_LENGTH:
            return None
        raws: list[list[bytes | None]] = []
        if touched:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for kind, ids in touched.items():
                        pipe.hmget(self.keys.config(kind), list(ids))
                    raws = await pipe.execute()
            except REDIS_DOWN as exc:
                raise StoreUnavailable(str(exc)) from exc
        changes: list[ConfigChange] = []
        for (kind, ids), docs in zip(touched.items(), raws, strict=True):
            cache = self._decoded.setdefault(kind, {})
            for ident, raw in zip(ids, docs, strict=True):
                known = cache.get(ident)
                after = None
                if raw is not None:
                    digest = _digest(raw)
                    after = self._decoded_once(kind, ident, raw, digest, cache)
                if after is None:
                    cache.pop(ident, None)
                else:
                    cache[ident] = (digest, after)
                if known is None and after is None:
                    continue
                if known is not None and after is known[1]:
                    continue  # stored again unchanged
                changes.append(ConfigChange(kind, ident, known[1] if known else None, after))
        if entries:
            self._change_id = _text(entries[-1][0])
        return ConfigChanges(current, tuple(changes))

    async def list_kind(self, kind: str) -> list[Resource]:
        try:
            docs = await self.redis.hgetall(self.keys.config(kind))
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        found = (_decode(kind, name, raw) for name, raw in docs.items())
        return sorted((r for r in found if r is not None), key=lambda r: (r.namespace, r.name))

    async def get(self, kind: str, ident: str) -> Resource | None:
        """The resource with this canonical id (`ns/name`, bare name in `default`)."""
        try:
            raw = await self.redis.hget(self.keys.config(kind), ident)
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        return None if raw is None else _decode(kind, ident, raw)

    async def apply(self, resources: Sequence[Resource]) -> int:
        """Store resources atomically, keep the key index in step, bump and announce the
        generation. Returns the new generation."""
        try:
            old_hashes: dict[str, str] = {}
            keys = [r for r in resources if r.kind == "VirtualKey"]
            if keys:
                ids = [r.id for r in keys]
                raws = await self.redis.hmget(self.keys.config("VirtualKey"), ids)
                for resource, raw in zip(keys, raws, strict=True):
                    if raw is not None:
                        old_hashes[resource.id] = orjson.loads(raw)["spec"]["keySha256"]
            async with self.redis.pipeline(transaction=True) as pipe:
                for resource in resources:
                    # Field = canonical id: a resource of `default` keeps its bare name, so data
                    # written before namespaces existed is read as namespace `default`.
                    pipe.hset(
                        self.keys.config(resource.kind),
                        resource.id,
                        orjson.dumps(resource.document()),
                    )
                    if resource.kind == "VirtualKey":
                        new_hash = resource.spec["keySha256"]
                        old_hash = old_hashes.get(resource.id)
                        if old_hash and old_hash != new_hash:
                            pipe.delete(self.keys.key_index(old_hash))
                        if resource.spec["revoked"]:
                            pipe.delete(self.keys.key_index(new_hash))
                        else:
                            pipe.set(self.keys.key_index(new_hash), resource.id)
                self._log_change(pipe, [(r.kind, r.id) for r in resources])
                pipe.incr(self.keys.generation)
                replies = await pipe.execute()
            generation = int(replies[-1])
            await self.redis.publish(self.keys.config_channel, str(generation))
            return generation
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def delete(self, kind: str, ident: str) -> bool:
        try:
            existing = await self.get(kind, ident)
            if existing is None:
                return False
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.keys.config(kind), ident)
                if kind == "VirtualKey":
                    pipe.delete(self.keys.key_index(existing.spec["keySha256"]))
                self._log_change(pipe, [(kind, ident)])
                pipe.incr(self.keys.generation)
                replies = await pipe.execute()
            await self.redis.publish(self.keys.config_channel, str(replies[-1]))
            return True
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _log_change(self, pipe: Any, touched: list[tuple[str, str]]) -> None:
        """The change log entry of a write, queued in the write's own transaction. A bulk write
        is logged as `*` ("reload everything", which it is cheaper to do anyway): an entry holds
        at most LOGGED_IDS ids, so the log stays within a few MB."""
        entry = orjson.dumps(touched if len(touched) <= LOGGED_IDS else "*")
        pipe.xadd(self.keys.config_changes, {"c": entry},
                  maxlen=CHANGE_LOG_LENGTH, approximate=True)

    async def key_name(self, key_sha256: str) -> str | None:
        """Name of the VirtualKey with this hash, straight from the index (cache misses only)."""
        try:
            raw = await self.redis.get(self.keys.key_index(key_sha256))
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    async def limit_states(self, names_periods: list[tuple[str, str]]) -> list[dict[str, int]]:
        """Live state of limits (by canonical id) for the given periods: spent, held (money in
        the store's unit) and request counts by state. The one reader of limit state: the CLI
        and the operator's status both go through it."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, period in names_periods:
                    pipe.hgetall(self.keys.limit_state(name, period))
                replies = await pipe.execute()
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [{k.decode(): int(v) for k, v in reply.items()} for reply in replies]

    # -- usage -----------------------------------------------------------------------------

    async def read_usage(self, count: int = 100) -> list[tuple[str, bytes]]:
        """The newest `count` usage entries, oldest first: (stream id, event bytes)."""
        try:
            entries: Any = await self.redis.xrevrange(self.keys.usage_stream, count=count)
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [(eid.decode(), fields[b"event"]) for eid, fields in reversed(entries)]

    async def read_rollups(self, hours: list[int]) -> list[dict[bytes, bytes]]:
        """The hourly usage rollups (store/rollup.py) of these hours, in one pipelined round
        trip (an absent hour reads as empty)."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for hour in hours:
                    pipe.hgetall(self.keys.rollup(hour))
                replies: list[dict[bytes, bytes]] = await pipe.execute()
        except REDIS_DOWN as exc:
            raise StoreUnavailable(str(exc)) from exc
        return replies


def _digest(raw: bytes | str) -> bytes:
    return hashlib.blake2b(raw if isinstance(raw, bytes) else raw.encode(),
                           digest_size=16).digest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _compact(resource: Resource, kind: str) -> Resource:
    """A VirtualKey as the snapshot keeps it: its spec without the fields at their defaults
    (empty lists and strings, False, None; `key_record` reads them with the same defaults).
    A validated spec holds all twelve fields, three of them fresh empty lists: ≈ 800 B per key
    and per worker, most of a worker's memory with 100,000 keys (bench/scale.py)."""
    spec = {name: value for name, value in resource.spec.items()
            if value is not None and value is not False and value != "" and value != []}
    # `kind`: the one shared string, not a copy per document from the JSON parser.
    return Resource(kind, resource.name, spec, resource.namespace)


def _decode(kind: str, ident: bytes | str, raw: bytes | str) -> Resource | None:
    label = ident.decode() if isinstance(ident, bytes) else ident
    try:
        namespace, _ = split_id(label)
        resource = validate_document(orjson.loads(raw), f"redis {kind}/{label}", namespace)
    except (ResourceError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        # A document edited by hand into something invalid must not stop the others loading.
        log.error("skipping invalid stored resource: %s", exc)
        return None
    if resource.id != label:
        log.error("skipping stored %s %r: its document names %r", kind, label, resource.id)
        return None
    return resource
