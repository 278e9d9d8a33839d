"""Reloads that read only what changed (`Store.load_changes` + `patch_snapshot`): the snapshot a
replica patches must be the one a full load would build, and anything the change log cannot
account for must fall back to a full load. Against real Redis, standalone and Cluster."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from extproc.core import quota
from extproc.core.keys import generate_key, hash_key
from extproc.core.quota import Subject
from extproc.core.resources import Resource, validate_document
from extproc.core.snapshot import Snapshot, build_snapshot
from extproc.server.state import ConfigWatcher, builtin_resources
from extproc.store import redis_store
from extproc.store.redis_store import Store

pytestmark = pytest.mark.redis


def document(kind: str, name: str, spec: dict[str, object]) -> Resource:
    return validate_document({"apiVersion": "tollgate.io/v1alpha1", "kind": kind,
                              "metadata": {"name": name}, "spec": spec})


def key_doc(name: str, key: str, **spec: object) -> Resource:
    return document("VirtualKey", name, {"keySha256": hash_key(key), **spec})


class CountingStore(Store):
    """The real store, counting how often it reads everything."""

    full_loads = 0

    async def load(self) -> tuple[int, list[Resource]]:
        self.full_loads += 1
        return await super().load()


@pytest.fixture
async def counting(store: Store) -> CountingStore:
    counted = CountingStore(store.redis, store.keys)
    return counted


def view(snapshot: Snapshot) -> dict[str, object]:
    """What requests read from a snapshot, comparable between two builds."""
    return {
        "generation": snapshot.generation,
        "keys": snapshot.keys_by_hash,
        "resources": snapshot.resources,
        "prices": {m: snapshot.price(m) for m in ("gpt-4o-mini", "my-model", "gpt-4o")},
        "upstreams": snapshot.upstreams,
        "limits": snapshot.limits,
        "rate_limits": snapshot.rate_limits,
        "policies": [(p.id, p.selector, p.rules) for p in snapshot.policies],
        "secrets": snapshot.secrets,
    }


async def full_build(store: Store, tmp_path: Path) -> Snapshot:
    fresh = Store(store.redis, store.keys)
    generation, stored = await fresh.load()
    watcher = ConfigWatcher(fresh, str(tmp_path), poll_s=1.0)
    return build_snapshot(generation, builtin_resources(), stored, watcher._secrets)


async def test_a_new_key_is_read_without_reloading_everything(
    counting: CountingStore, tmp_path: Path
) -> None:
    keys = [generate_key() for _ in range(50)]
    await counting.apply([key_doc(f"k{i}", k) for i, k in enumerate(keys)])
    watcher = ConfigWatcher(counting, str(tmp_path), poll_s=1.0)
    await watcher.reload()
    assert counting.full_loads == 1
    late = generate_key()
    generation = await counting.apply([key_doc("late", late, user="bob")])
    await watcher.reload()
    snapshot = watcher.snapshot
    assert snapshot is not None and snapshot.generation == generation
    assert snapshot.keys_by_hash[hash_key(late)].user == "bob"
    assert hash_key(keys[7]) in snapshot.keys_by_hash
    assert counting.full_loads == 1  # only the change was read
    assert view(snapshot) == view(await full_build(counting, tmp_path))


async def test_patched_snapshots_match_a_full_build_through_random_changes(
    counting: CountingStore, tmp_path: Path
) -> None:
    rng = random.Random(12)
    keys: dict[str, str] = {f"k{i}": generate_key() for i in range(20)}
    await counting.apply([key_doc(n, k) for n, k in keys.items()])
    watcher = ConfigWatcher(counting, str(tmp_path), poll_s=1.0)
    await watcher.reload()
    builtin_price = next(r for r in builtin_resources() if r.kind == "PriceTable")
    for step in range(60):
        action = rng.choice(["create", "rotate", "revoke", "delete", "limit", "unlimit",
                             "prices", "unprices", "upstream", "unupstream", "mixed",
                             "policy", "unpolicy", "limits"])
        name = rng.choice(sorted(keys))
        if action == "create":
            keys[f"n{step}"] = generate_key()
            await counting.apply([key_doc(f"n{step}", keys[f"n{step}"], tags=["new"])])
        elif action == "rotate":
            keys[name] = generate_key()
            await counting.apply([key_doc(name, keys[name])])
        elif action == "revoke":
            await counting.apply([key_doc(name, keys[name], revoked=True)])
        elif action == "delete":
            await counting.delete("VirtualKey", name)
            keys.pop(name)
        elif action == "limit":
            await counting.apply([document("Limit", f"l{step % 3}", {
                "type": "Block", "max": 5 + step, "selector": {"keys": [name]}})])
        elif action == "unlimit":
            await counting.delete("Limit", f"l{step % 3}")
        elif action == "prices":  # a stored table that replaces the built-in one
            await counting.apply([document("PriceTable", builtin_price.name, {
                "models": {"my-model": {"input": step, "output": 1}}})])
        elif action == "unprices":  # the built-in table comes back
            await counting.delete("PriceTable", builtin_price.id)
        elif action == "upstream":
            await counting.apply([document("Upstream", "extra", {
                "provider": "openai", "cluster": "openai", "models": ["m-*"],
                "priority": step,
                "credentials": [{"name": "default", "secretRef": "OPENAI_API_KEY"}]})])
        elif action == "unupstream":
            await counting.delete("Upstream", "extra")
        elif action == "policy":
            await counting.apply([document("Policy", f"p{step % 2}", {
                "selector": {"keys": [name]},
                "wordLists": [{"name": "w", "words": [f"word{step}"], "action": "block"}]})])
        elif action == "unpolicy":
            await counting.delete("Policy", f"p{step % 2}")
        elif action == "limits":  # several limits in one write, one of them the default name
            await counting.apply([document("Limit", n, {
                "type": "Allow", "max": step, "selector": {"keys": [name]}})
                for n in ("default", f"l{(step + 1) % 3}")] + [
                # "z" moves between covering every request and one key's
                document("Limit", "z", {"type": "Block", "max": step,
                                        "selector": {} if step % 2 else {"keys": [name]}})])
        else:  # one write touching several kinds
            keys[f"m{step}"] = generate_key()
            await counting.apply([key_doc(f"m{step}", keys[f"m{step}"]),
                                  document("RateLimit", "r", {
                                      "per": "key", "requestsPerMinute": 10 + step})])
        before = watcher.snapshot
        await watcher.reload()
        assert watcher.snapshot is not None
        full = await full_build(counting, tmp_path)
        assert view(watcher.snapshot) == view(full), action
        if watcher.snapshot.limits is not before.limits and before.limits:
            # Indexed from the previous snapshot's index, not on the next request.
            assert id(watcher.snapshot.limits) in quota._INDEXES, action
        for name in [*keys, "nobody"]:  # the limits each key's requests are held to
            subject = Subject(name, "", "", (), "gpt-4o-mini", "")
            assert (quota.applicable(watcher.snapshot.limits, subject, ["l1", "gone"])
                    == quota.applicable(full.limits, subject, ["l1", "gone"])), action
    assert counting.full_loads == 1


async def test_a_write_that_bypasses_the_log_is_still_loaded(
    counting: CountingStore, tmp_path: Path
) -> None:
    watcher = ConfigWatcher(counting, str(tmp_path), poll_s=1.0)
    await watcher.reload()
    key = generate_key()
    # An older Tollgate (or a hand edit) writes the document and bumps the generation only.
    raw = orjson.dumps(key_doc("by-hand", key).document())
    await counting.redis.hset(counting.keys.config("VirtualKey"), "by-hand", raw)
    await counting.redis.incr(counting.keys.generation)
    await watcher.reload()
    assert watcher.snapshot is not None
    assert hash_key(key) in watcher.snapshot.keys_by_hash
    assert counting.full_loads == 2


async def test_a_replica_further_behind_than_the_log_loads_everything(
    counting: CountingStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "CHANGE_LOG_LENGTH", 3)
    watcher = ConfigWatcher(counting, str(tmp_path), poll_s=1.0)
    await watcher.reload()
    keys = [generate_key() for _ in range(6)]
    for i, key in enumerate(keys):  # six writes: the log keeps about three
        await counting.apply([key_doc(f"k{i}", key)])
    await watcher.reload()
    assert watcher.snapshot is not None
    assert all(hash_key(k) in watcher.snapshot.keys_by_hash for k in keys)
    assert counting.full_loads == 2
    # Within the log's reach again: changes only.
    await counting.delete("VirtualKey", "k0")
    await watcher.reload()
    assert hash_key(keys[0]) not in watcher.snapshot.keys_by_hash
    assert counting.full_loads == 2
    assert view(watcher.snapshot) == view(await full_build(counting, tmp_path))


async def test_a_bulk_write_is_logged_as_reload_everything(
    counting: CountingStore, tmp_path: Path
) -> None:
    watcher = ConfigWatcher(counting, str(tmp_path), poll_s=1.0)
    await watcher.reload()
    keys = [generate_key() for _ in range(redis_store.LOGGED_IDS + 1)]
    await counting.apply([key_doc(f"b{i}", k) for i, k in enumerate(keys)])
    entries = await counting.redis.xrange(counting.keys.config_changes)
    assert len(entries[-1][1][b"c"]) < 10  # not a hundred ids
    await watcher.reload()
    assert watcher.snapshot is not None
    assert all(hash_key(k) in watcher.snapshot.keys_by_hash for k in keys)
    assert counting.full_loads == 2
