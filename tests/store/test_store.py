"""The Redis store against a real Redis: documents, key index, generation, usage stream, and the
replica-side pieces built on it (config reload, key directory, usage writer)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from extproc.core.keys import PresentedKey, generate_key, hash_key
from extproc.core.resources import Resource, validate_document
from extproc.core.snapshot import build_snapshot
from extproc.gen.tollgate.v1 import usage_pb2
from extproc.launch import free_port, redis_ping, start_process, wait_until
from extproc.server.state import ConfigWatcher, KeyDirectory, builtin_resources
from extproc.store.redis_store import Store, StoreUnavailable, connect

pytestmark = pytest.mark.redis


def virtual_key(name: str, key: str, **spec: object) -> Resource:
    return validate_document(
        {
            "apiVersion": "tollgate.io/v1alpha1",
            "kind": "VirtualKey",
            "metadata": {"name": name},
            "spec": {"keySha256": hash_key(key), **spec},
        }
    )


async def test_apply_and_load_round_trip(store: Store) -> None:
    key = generate_key()
    prices = validate_document({
        "apiVersion": "tollgate.io/v1alpha1", "kind": "PriceTable",
        "metadata": {"name": "custom"},
        "spec": {"models": {"my-model": {"input": 1.5, "output": 3}}},
    })
    gen1 = await store.apply([virtual_key("team-a", key, user="alice"), prices])
    generation, resources = await store.load()
    assert generation == gen1 == 1
    assert {(r.kind, r.name) for r in resources} == {("VirtualKey", "team-a"),
                                                     ("PriceTable", "custom")}
    loaded = next(r for r in resources if r.kind == "VirtualKey")
    assert loaded.spec["user"] == "alice"
    # The key itself is stored nowhere, only its hash.
    dump = [v for k in await store.redis.keys(f"tg:{{{store.keys.tag}}}:*")
            if (await store.redis.type(k)) == b"hash"
            for v in (await store.redis.hgetall(k)).values()]
    assert all(key.encode() not in v for v in dump)
    assert await store.apply([prices]) == 2


async def test_key_index_follows_rotation_and_revocation(store: Store) -> None:
    old, new = generate_key(), generate_key()
    await store.apply([virtual_key("svc", old)])
    assert await store.key_name(hash_key(old)) == "svc"
    await store.apply([virtual_key("svc", new)])
    assert await store.key_name(hash_key(old)) is None
    assert await store.key_name(hash_key(new)) == "svc"
    await store.apply([virtual_key("svc", new, revoked=True)])
    assert await store.key_name(hash_key(new)) is None
    assert await store.delete("VirtualKey", "svc") is True
    assert await store.delete("VirtualKey", "svc") is False
    assert await store.list_kind("VirtualKey") == []


async def test_invalid_stored_document_is_skipped_not_fatal(store: Store) -> None:
    await store.apply([virtual_key("good", generate_key())])
    await store.redis.hset(store.keys.config("VirtualKey"), "broken", b"{not json")
    _, resources = await store.load()
    assert [r.name for r in resources] == ["good"]


async def test_apply_announces_the_generation(store: Store) -> None:
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(store.keys.config_channel)
    generation = await store.apply([virtual_key("k", generate_key())])
    message = None
    deadline = time.monotonic() + 2
    while message is None and time.monotonic() < deadline:  # the first read may be the
        message = await pubsub.get_message(timeout=0.5)     # (ignored) subscribe confirmation
    assert message is not None and int(message["data"]) == generation
    await pubsub.aclose()


async def test_usage_stream_round_trip_and_trim(store: Store) -> None:
    events = [
        usage_pb2.UsageEvent(request_id=f"r{i}", key="k", model="gpt-4o",
                             cost=usage_pb2.Cost(total_nanos=i)).SerializeToString()
        for i in range(300)
    ]
    # Events are written by the settle script, in pipelined batches, as the settler does.
    from extproc.store.quota_store import QuotaStore

    quota = QuotaStore(store.redis, store.keys, stream_maxlen=100)
    # Batches go through the background client, whatever the request path's breaker says.
    quota.breaker.failures, quota.breaker.open_until = 99, time.monotonic() + 3600
    await quota.settle_many([
        quota.settle_call(None, 0, 0, event, False, request_id=f"r{i}")
        for i, event in enumerate(events)
    ])
    newest = await store.read_usage(count=3)
    decoded = [usage_pb2.UsageEvent.FromString(raw) for _, raw in newest]
    assert [e.request_id for e in decoded] == ["r297", "r298", "r299"]
    assert decoded[-1].cost.total_nanos == 299
    # Approximate trimming keeps the stream bounded (Redis trims whole radix-tree nodes).
    assert await store.redis.xlen(store.keys.usage_stream) < 300


async def test_config_watcher_reloads_on_change(store: Store, tmp_path: Path) -> None:
    watcher = ConfigWatcher(store, str(tmp_path), poll_s=5.0)  # slow poll: pub/sub must do it
    task = asyncio.create_task(watcher.run())
    try:
        for _ in range(100):
            if watcher.snapshot is not None:
                break
            await asyncio.sleep(0.02)
        assert watcher.snapshot is not None and watcher.snapshot.generation == 0
        key = generate_key()
        started = time.monotonic()
        await store.apply([virtual_key("late", key)])
        while watcher.snapshot.generation == 0 and time.monotonic() - started < 3:
            await asyncio.sleep(0.01)
        assert hash_key(key) in watcher.snapshot.keys_by_hash
        assert time.monotonic() - started < 1.0  # pub/sub, not the 5 s poll
    finally:
        task.cancel()


async def test_secret_files_are_read_by_name(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "OPENAI_API_KEY").write_text("sk-from-file\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    watcher = ConfigWatcher(store, str(tmp_path), poll_s=1.0)
    await watcher.reload()
    assert watcher.snapshot is not None
    # The mounted file, by the secret's name, without its trailing newline ...
    assert watcher.snapshot.secrets["OPENAI_API_KEY"] == "sk-from-file"
    # ... unless the environment sets the variable: then the environment wins.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    await watcher.reload()
    assert watcher.snapshot.secrets["OPENAI_API_KEY"] == "sk-from-env"


class CountingStore(Store):
    lookups = 0

    async def key_name(self, key_sha256: str) -> str | None:
        self.lookups += 1
        return await super().key_name(key_sha256)


async def test_key_directory_finds_new_keys_and_shields_redis(redis_url: str, tag: str) -> None:
    store = CountingStore.from_url(redis_url, tag=tag)
    assert isinstance(store, CountingStore)
    try:
        snapshot = build_snapshot(0, builtin_resources(), [], lambda _: None)
        now = [100.0]
        directory = KeyDirectory(store, negative_ttl_s=5, misses_per_s=3, clock=lambda: now[0])
        # A key created after the snapshot was built is found through the index.
        key = generate_key()
        await store.apply([virtual_key("fresh", key, user="bob")])
        record = await directory.resolve(snapshot, PresentedKey(key, "authorization"))
        assert record is not None and record.name == "fresh" and record.user == "bob"
        # The same unknown key twice: one Redis lookup, then the negative cache answers.
        store.lookups = 0
        now[0] += 1.0  # a new one-second budget window
        bogus = PresentedKey("tg-not-a-key", "authorization")
        assert await directory.resolve(snapshot, bogus) is None
        assert await directory.resolve(snapshot, bogus) is None
        assert store.lookups == 1
        # A flood of random keys is capped at misses_per_s Redis lookups per second.
        for _ in range(50):
            assert await directory.resolve(snapshot, PresentedKey(generate_key(), "x-api-key")) \
                is None
        assert store.lookups == 3
        now[0] += 1.0
        await directory.resolve(snapshot, PresentedKey(generate_key(), "x-api-key"))
        assert store.lookups == 4
    finally:
        await store.close()


async def test_settlements_survive_a_redis_outage(tmp_path: Path) -> None:
    """Redis killed mid-run: settlements are journaled, nothing is lost, every one lands once
    it is back, and a worker that dies with a journal hands it to the next one."""
    from extproc.launch import find_redis_binary
    from extproc.server.settlement import Settler
    from extproc.store.keyschema import KeySchema
    from extproc.store.quota_store import QuotaStore
    from extproc.store.redis_store import connect

    binary = find_redis_binary(prefer_embedded=False)
    assert binary is not None
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def up():  # type: ignore[no-untyped-def]
        proc = start_process(f"redis-{time.monotonic_ns()}", argv, tmp_path)
        wait_until(lambda: redis_ping(port), proc, 10, "starting")
        return proc

    proc = up()
    client = connect(f"redis://127.0.0.1:{port}/0", 0.2)
    quota = QuotaStore(client, KeySchema("outage"), stream_maxlen=10_000)
    journal = tmp_path / "journal"

    def call(rid: str):  # type: ignore[no-untyped-def]
        event = usage_pb2.UsageEvent(request_id=rid).SerializeToString()
        return quota.settle_call(None, 10, 1, event, False, request_id=rid)

    settler = Settler(quota, str(journal))
    task = asyncio.create_task(settler.run())
    try:
        settler.enqueue(call("before"))
        await _eventually(lambda: settler.pending == 0)
        proc.stop()
        for i in range(10):
            settler.enqueue(call(f"during-{i}"))
        assert await settler.settle_now(call("inline")) is None  # journaled, not lost
        await _eventually(lambda: len(settler.journal) == 11)
        assert len(settler.path.read_bytes().splitlines()) == 11  # on disk too
        with pytest.raises(StoreUnavailable):
            await quota.settle(call("probe"))
        proc = up()
        await _eventually(lambda: settler.pending == 0, timeout=10)
        assert not task.done()  # the settler outlived the outage, retrying with backoff
        ids = sorted(usage_pb2.UsageEvent.FromString(raw).request_id
                     for _, raw in await Store(client, KeySchema("outage")).read_usage(100))
        assert ids == sorted([f"during-{i}" for i in range(10)] + ["inline"])
        assert settler.path.read_bytes() == b""
    finally:
        task.cancel()

    # A worker that died with journaled settlements: the next worker adopts and replays them.
    (journal / "journal-999999999.jsonl").write_bytes(call("orphan").to_json() + b"\n")
    adopter = Settler(quota, str(journal))
    assert [c.request_id for c in adopter.journal] == ["orphan"]
    await adopter.flush()
    assert not (journal / "journal-999999999.jsonl").exists()
    # Replaying what already landed changes nothing: settlement is idempotent per request id.
    assert (await quota.settle(call("orphan")))[0] == 0
    await client.aclose()
    proc.stop()


async def _eventually(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_settle_batch_lands_after_redis_lost_its_scripts(store: Store) -> None:
    """Batches call EVALSHA directly (no SCRIPT EXISTS first): after a Redis restart or a
    SCRIPT FLUSH the script is loaded again and the batch still lands, once."""
    from extproc.store.quota_store import QuotaStore

    quota = QuotaStore(store.redis, store.keys, stream_maxlen=1000)
    event = usage_pb2.UsageEvent(request_id="before", key="k").SerializeToString()
    await quota.settle_many([quota.settle_call(None, 0, 0, event, False, request_id="before")])
    await store.redis.script_flush()
    events = [usage_pb2.UsageEvent(request_id=f"after{i}", key="k").SerializeToString()
              for i in range(3)]
    await quota.settle_many([quota.settle_call(None, 0, 0, e, False, request_id=f"after{i}")
                             for i, e in enumerate(events)])
    ids = [usage_pb2.UsageEvent.FromString(raw).request_id
           for _, raw in await store.read_usage(count=10)]
    assert ids == ["before", "after0", "after1", "after2"]


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    """The request path's connections pack with hiredis: the same bytes as redis-py's own
    packer, for every kind of argument Tollgate sends; what hiredis refuses goes the Python
    way (and fails as redis-py fails)."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    client = connect("redis://127.0.0.1:1/0", 1.0)
    packed = client.connection_pool.connection_class()
    assert "hiredis" in type(packed).__mro__[1].__doc__  # the packing class is in place
    plain = Connection()
    for args in [("EVALSHA", "ab" * 20, 2, "k1", b"k2", -5, 0, 2**53, "é", 1.5, b"\x00\xff"),
                 ("SCRIPT LOAD", "return 1"), (b"CLIENT SETINFO", b"LIB-NAME", "x"),
                 ("GET", "")]:
        assert b"".join(packed.pack_command(*args)) == b"".join(plain.pack_command(*args))
    with pytest.raises(DataError):
        packed.pack_command("SET", "k", True)
