"""Reserve / settle / sweep as a state machine against a real Redis (hypothesis).

Hypothesis drives random sequences of: admissions against a strict Block limit, an Allow limit
and a concurrency limit; settlements at any cost up to the estimate; repeated settlements
(journal replays); time passing with the sweeper running; reserves whose client timed out,
reaching Redis before or after the request's cancel or its offline settlement. After every
step the Redis state must equal a plain model:

* `held` equals the sum of the estimates of the open holds (per limit), leases and the holds
  index have one entry per open hold;
* settling twice changes nothing;
* spend equals the sum of what was settled, and stays <= max for the Block limit (whose
  settled costs stay within their estimates).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from extproc.core.quota import (
    LimitSpec,
    RateLimitSpec,
    ReservationPlan,
    Selector,
    Subject,
    plan_reservation,
)
from extproc.server.settlement import Settler
from extproc.store.keyschema import KeySchema
from extproc.store.quota_store import QuotaStore, SettleCall
from extproc.store.redis_store import connect
from tests.store.conftest import reserve

pytestmark = pytest.mark.redis

MAX = 1_000_000
BLOCK = LimitSpec("block", True, MAX, MAX, "none", "UTC", True, False, Selector())
ALLOW = LimitSpec("allow", False, MAX // 2, MAX // 4, "none", "UTC", True, False, Selector())
CONC = RateLimitSpec("conc", "key", Selector(), None, None, 3)
SUBJECT = Subject("k", "", "", (), "m", "")
START = 1_800_000_000.0

estimates = st.integers(min_value=0, max_value=400_000)


class QuotaMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client = connect(self.url, 5.0)
        self.quota = QuotaStore(self.client, KeySchema("sm-" + uuid.uuid4().hex[:10]), 100_000)
        self.journal_dir = tempfile.mkdtemp(prefix="tollgate-sm-")
        self.settler = Settler(self.quota, self.journal_dir)
        self.now = START
        self.open: dict[str, ReservationPlan] = {}
        self.settled: list[SettleCall] = []
        self.spent = {"block": 0, "allow": 0}
        self.ids = 0  # request ids are drawn in order: a replayed example sees the same ones

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()
        shutil.rmtree(self.journal_dir, ignore_errors=True)

    def plan(self, estimate: int, limits: list[LimitSpec], hold_s: int = 60) -> ReservationPlan:
        self.ids += 1
        return plan_reservation(request_id=f"{self.ids:032x}", now=self.now, limits=limits,
                                rate_limits=[CONC], subject=SUBJECT, estimate_nanos=estimate,
                                estimate_tokens=1, hold_seconds=hold_s)

    def reserve(self, plan: ReservationPlan) -> bool:
        return bool(self.run(reserve(self.quota, plan, b"event")).denial is None)

    def held(self, name: str) -> int:
        return sum(p.estimate_nanos for p in self.open.values()
                   if any(c.limit.name == name for c in p.limits))

    # -- rules ---------------------------------------------------------------------------

    @rule(estimate=estimates, hold_s=st.integers(min_value=1, max_value=120))
    def admit(self, estimate: int, hold_s: int) -> None:
        plan = self.plan(estimate, [BLOCK, ALLOW], hold_s)
        fits = self.spent["block"] + self.held("block") + estimate <= MAX and len(self.open) < 3
        assert self.reserve(plan) == fits
        if fits:
            self.open[plan.request_id] = plan

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        plan = self.open.pop(rid)
        cost = data.draw(st.integers(min_value=0, max_value=plan.estimate_nanos))
        call = self.quota.settle_call(plan, cost, 1, b"event", confirmed=True,
                                      now_ms=int(self.now * 1000))
        assert self.run(self.quota.settle(SettleCall.from_json(call.to_json())))[0] == 1
        for charge in plan.limits:
            self.spent[charge.limit.name] += cost
        self.settled.append(call)

    @precondition(lambda self: self.settled)
    @rule(data=st.data())
    def settle_again(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from(self.settled))
        assert self.run(self.quota.settle(call))[0] == 0

    @rule(seconds=st.integers(min_value=1, max_value=90))
    def time_passes_and_the_sweeper_runs(self, seconds: int) -> None:
        self.now += seconds
        now_ms = int(self.now * 1000)
        self.run(self.settler.sweep_once(now_ms))
        for rid, plan in list(self.open.items()):
            if plan.hold_deadline_ms <= now_ms:  # settled at its estimate
                del self.open[rid]
                for charge in plan.limits:
                    self.spent[charge.limit.name] += plan.estimate_nanos

    @rule(estimate=estimates, reserve_lands_first=st.booleans(), replays=st.integers(0, 2))
    def refused_after_a_timeout(self, estimate: int, reserve_lands_first: bool,
                                replays: int) -> None:
        """The reserve's client timed out, the request was answered 503 and cancelled; the
        reserve itself reaches Redis before or after the cancel."""
        plan = self.plan(estimate, [BLOCK, ALLOW])
        call = self.quota.settle_call(plan, 0, 0, b"", confirmed=False, cancel=True,
                                      now_ms=plan.now_ms)
        if reserve_lands_first:
            self.reserve(plan)
        for _ in range(1 + replays):
            self.run(self.quota.settle(call))
        if not reserve_lands_first:
            assert not self.reserve(plan)

    @rule(estimate=estimates, data=st.data(), reserve_lands=st.sampled_from(
        ["never", "before", "after"]))
    def admitted_offline(self, estimate: int, data: st.DataObject, reserve_lands: str) -> None:
        """An Allow-only request admitted while its reserve timed out (fail open), settled
        at its real cost, possibly replayed; its reserve may run late, before or after."""
        plan = self.plan(estimate, [ALLOW])
        cost = data.draw(st.integers(min_value=0, max_value=estimate))
        call = self.quota.settle_call(plan, cost, 1, b"event", confirmed=False,
                                      now_ms=plan.now_ms)
        if reserve_lands == "before":
            self.reserve(plan)
        assert self.run(self.quota.settle(call))[0] == 1
        self.run(self.quota.settle(call))  # a replay
        if reserve_lands == "after":
            assert not self.reserve(plan)
        self.spent["allow"] += cost

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def redis_matches_the_model(self) -> None:
        keys = self.quota.keys
        for name in ("block", "allow"):
            raw = self.run(self.client.hgetall(keys.limit_state(name, "all")))
            state = {k.decode(): int(v) for k, v in raw.items()}
            assert state.get("held", 0) == self.held(name), name
            assert state.get("spent", 0) == self.spent[name], name
        assert self.spent["block"] <= MAX
        leases = self.run(self.client.zrangebyscore(keys.leases("conc", "k"),
                                                    self.now * 1000, "+inf"))
        assert sorted(r.decode() for r in leases) == sorted(self.open)
        holds = self.run(self.client.zrange(keys.holds, 0, -1))
        assert sorted(r.decode() for r in holds) == sorted(self.open)


def test_reserve_settle_sweep_state_machine(redis_url: str) -> None:
    QuotaMachine.url = redis_url
    run_state_machine_as_test(QuotaMachine, settings=settings(
        max_examples=40, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
