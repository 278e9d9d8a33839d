"""State written by the micro-dollar version keeps its meaning after the move to nano-dollars.

The old data is written by the old scripts themselves (`tests/data/money_layout_1/`, copied
unchanged from the last micro-dollar release), against a real Redis: a settled request, an
open hold, a refused request. Then `migrate_money` (what `tollgate migrate` and every starting
replica run) folds it into the nano-dollar layout, the old hold is swept and an old journal
line is replayed by the new code, and the new scripts enforce the limit with the old spend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.core.quota import LimitSpec, Selector, Subject, plan_reservation
from extproc.store.quota_store import QuotaStore, SettleCall
from tests.store.conftest import reserve

pytestmark = pytest.mark.redis

LEGACY = Path(__file__).parent.parent / "data" / "money_layout_1"
NOW_MS = 1_795_435_200_000
TTL_MS = 5_000_000
MAX_MICROS = 1_000_000  # $1


class Legacy:
    """The micro-dollar scripts with the argument layout the old QuotaStore sent them."""

    def __init__(self, quota: QuotaStore) -> None:
        self.keys = quota.keys
        self.redis = quota.redis
        self.reserve_script = quota.redis.register_script((LEGACY / "reserve.lua").read_text())
        self.settle_script = quota.redis.register_script((LEGACY / "settle.lua").read_text())
        self.limit_key = self.keys.legacy_limit_state("budget", "all")

    def settle_call(self, rid: str, actual: int, estimate: int) -> dict[str, Any]:
        keys = [f"{self.keys.prefix}done:{rid}", self.keys.hold(rid), self.keys.holds,
                self.keys.usage_stream, self.limit_key]
        args = [rid, NOW_MS, actual, 10, {"b": "AA=="}, 1000, 1, 0, 0, estimate,
                10 if estimate else 0, 0, MAX_MICROS, MAX_MICROS, TTL_MS]
        return {"v": 2, "keys": keys, "args": args}

    async def reserve(self, rid: str, estimate: int, deadline_ms: int) -> int:
        payload = orjson.dumps(self.settle_call(rid, estimate, estimate))
        args = [rid, NOW_MS, deadline_ms, 1, 0, 0, estimate, 0, 1, MAX_MICROS, TTL_MS, 0,
                0, 0, 5000, 12, 10]
        reply = await self.reserve_script(keys=[self.keys.hold(rid), self.keys.holds,
                                                self.limit_key],
                                          args=[orjson.dumps(args), payload])
        return int(reply[0])

    async def settle(self, rid: str, actual: int, estimate: int) -> None:
        doc = self.settle_call(rid, actual, estimate)
        args = list(doc["args"])
        args[4] = 0
        await self.settle_script(keys=doc["keys"], args=[orjson.dumps(args), b"\x00"])


BUDGET = LimitSpec("budget", True, MAX_MICROS * 1000, MAX_MICROS * 1000, "none", "UTC", True,
                   False, Selector())


def new_plan(rid: str, estimate_nanos: int):  # type: ignore[no-untyped-def]
    return plan_reservation(request_id=rid, now=NOW_MS / 1000 + 1, limits=[BUDGET],
                            rate_limits=[], subject=Subject("k", "", "", (), "m", ""),
                            estimate_nanos=estimate_nanos, estimate_tokens=1, hold_seconds=60)


async def test_micro_dollar_state_keeps_its_meaning(quota: QuotaStore) -> None:
    legacy = Legacy(quota)
    # Written by the old version: A cost 250 micro-dollars; B holds 100; C (2 dollars) refused.
    assert await legacy.reserve("a" * 32, 100, NOW_MS + 60_000) == 1
    await legacy.settle("a" * 32, 250, 100)
    assert await legacy.reserve("b" * 32, 100, NOW_MS + 1_000) == 1
    assert await legacy.reserve("c" * 32, 2_000_000, NOW_MS + 1_000) == 0
    old = await quota.redis.hgetall(legacy.limit_key)
    assert {k.decode(): int(v) for k, v in old.items()} == {
        "spent": 250, "held": 100, "ok": 1, "blocked": 1}

    assert await quota.migrate_money() == 1
    new_key = quota.keys.limit_state("budget", "all")
    state = {k.decode(): int(v) for k, v in (await quota.redis.hgetall(new_key)).items()}
    assert state == {"spent": 250_000, "held": 100_000, "ok": 1, "blocked": 1}
    assert await quota.redis.exists(legacy.limit_key) == 0
    assert 0 < await quota.redis.pttl(new_key) <= TTL_MS  # the old lifetime carried over
    assert await quota.migrate_money() == 0  # a second run finds nothing

    # The new scripts count the old spend and hold in nano-dollars: $1 - 350 micro-dollars fit,
    # one nano-dollar more does not.
    room = MAX_MICROS * 1000 - 350_000
    refused = new_plan("d" * 32, room + 1)
    assert (await reserve(quota, refused)).denial is not None
    fits = new_plan("e" * 32, room)
    assert (await reserve(quota, fits)).denial is None
    await quota.settle(quota.settle_call(fits, 0, 0, b"", confirmed=True))

    # The old hold (a layout-2 hold record) is swept by the new code: charged its estimate,
    # 100 micro-dollars, in nano-dollars, and released.
    calls = await quota.expired_holds(NOW_MS + 2_000)
    assert [c.request_id for c in calls] == ["b" * 32]
    assert (await quota.settle(calls[0]))[0] == 1
    # An old journal line (an offline settlement of 500 micro-dollars) is replayed once.
    line = orjson.dumps(legacy.settle_call("f" * 32, 500, 0))
    assert (await quota.settle(SettleCall.from_json(line)))[0] == 1
    assert (await quota.settle(SettleCall.from_json(line)))[0] == 0
    state = {k.decode(): int(v) for k, v in (await quota.redis.hgetall(new_key)).items()}
    assert state["spent"] == 250_000 + 100_000 + 500_000
    assert state["held"] == 0


async def test_migration_adds_to_state_a_new_replica_already_wrote(quota: QuotaStore) -> None:
    """Mixed versions during an upgrade: both layouts have spend; neither is lost."""
    legacy = Legacy(quota)
    assert await legacy.reserve("a" * 32, 40, NOW_MS + 60_000) == 1
    await legacy.settle("a" * 32, 40, 40)
    p = new_plan("b" * 32, 7_000)
    assert (await reserve(quota, p)).denial is None
    await quota.settle(quota.settle_call(p, 6_500, 1, b"", confirmed=True))
    assert await quota.migrate_money() == 1
    state = {k.decode(): int(v) for k, v in
             (await quota.redis.hgetall(quota.keys.limit_state("budget", "all"))).items()}
    assert state == {"spent": 40_000 + 6_500, "held": 0, "ok": 2}
