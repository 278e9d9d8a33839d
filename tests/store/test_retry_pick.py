"""retry_pick.lua against a real Redis (standalone and Cluster): the credential for the next
try of a retried request — after the one that failed, primaries before fallbacks, never one
tried already, resting or full unless nothing else is left — and its windows charged."""

from __future__ import annotations

import time
import uuid

import pytest

from extproc.core.quota import BUCKET_MS, CredentialCharge
from extproc.store.quota_store import QuotaStore
from tests.store.test_quota_scripts import cred

pytestmark = pytest.mark.redis


async def test_the_next_try_goes_to_the_next_credential_once_each(quota: QuotaStore) -> None:
    pool = [cred("a"), cred("b"), cred("c"), cred("fb", primary=False)]
    rid, now = uuid.uuid4().hex, int(time.time() * 1000)
    # "b" failed: the primaries after it come first, round robin, then the fallback.
    picks = [await quota.pick_retry(rid, pool, 1, 10, now)]
    picks.append(await quota.pick_retry(rid, pool, picks[-1], 10, now))
    picks.append(await quota.pick_retry(rid, pool, picks[-1], 10, now))
    assert [pool[i].name for i in picks] == ["c", "a", "fb"]
    assert await quota.pick_retry(rid, pool, picks[-1], 10, now) == -1  # all tried
    # Another request starts afresh.
    assert await quota.pick_retry(uuid.uuid4().hex, pool, 0, 10, now) == 1


async def test_resting_and_full_credentials_are_passed_over(quota: QuotaStore) -> None:
    pool = [cred("a"), cred("b"), cred("c", rpm=1), cred("d", tpm=100)]
    now = int(time.time() * 1000)
    await quota.cool_down(pool[1], 30_000, 60_000, 0)  # "b" rests
    assert await quota.pick_retry(uuid.uuid4().hex, pool, 1, 0, now) == 2  # c, now full
    assert pool[await quota.pick_retry(uuid.uuid4().hex, pool, 0, 50, now)].name == "d"
    # d's tokens window was charged the estimate, as the reserve charges the first try.
    tokens = quota.keys.credential_window("pool", "d", "tokens")
    assert int(await quota.redis.hget(tokens, str(now // BUCKET_MS))) == 50
    # Every untried one resting or full: the first untried one still goes (the provider's
    # answer, not a gateway-made one, is what the client then gets).
    assert pool[await quota.pick_retry(uuid.uuid4().hex, pool, 0, 100, now)].name == "b"


async def test_a_cooldown_is_per_model(quota: QuotaStore) -> None:
    pool = [cred("a"), cred("b")]
    await quota.cool_down(pool[1], 30_000, 60_000, 0)
    other = [CredentialCharge("pool", c.name, c.secret_ref, "gpt-4o-mini", True, None, None)
             for c in pool]
    now = int(time.time() * 1000)
    assert await quota.pick_retry(uuid.uuid4().hex, other, 0, 0, now) == 1
