"""Live state of limits as people read it (`tollgate get limits`, the operator's CR status).

Built from a limit's spec and the counters the store keeps for one period. Money stays in the
store's integer unit until `usd` formats it, so a change of unit lands in `extproc.core.pricing`
and nowhere here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.core.pricing import format_nanos
from extproc.core.quota import LimitSpec, state_of

REQUEST_STATES = ("ok", "exceeded", "overrun", "blocked")


@dataclass(frozen=True, slots=True)
class LimitReport:
    limit: LimitSpec
    period_id: str
    spent: int  # money, in the store's integer unit
    held: int
    requests: dict[str, int]  # by state, this period

    @property
    def remaining(self) -> int:
        return max(0, self.limit.max_nanos - self.spent - self.held)

    @property
    def state(self) -> str:
        """ok / exceeded / overrun as the request states are defined, and `blocked` for a Block
        limit that refuses every new request now (strict: nothing left of max, not counting
        holds that will be released; reactive: spend past max)."""
        if self.limit.block and (
            self.spent > self.limit.max_nanos
            or (self.limit.strict and self.spent >= self.limit.max_nanos)
        ):
            return "blocked"
        return state_of(self.spent, self.limit)

    def status(self) -> dict[str, object]:
        """The Limit CR's `status` fields (money as USD decimal strings, exact)."""
        return {
            "period": self.period_id,
            "max": usd(self.limit.max_nanos),
            "spent": usd(self.spent),
            "held": usd(self.held),
            "remaining": usd(self.remaining),
            "state": self.state,
            "requests": dict(self.requests),
        }


def limit_report(limit: LimitSpec, period_id: str, counters: Mapping[str, int]) -> LimitReport:
    """`counters` is the limit's state hash for the period (missing fields are zero)."""
    return LimitReport(
        limit=limit,
        period_id=period_id,
        spent=int(counters.get("spent", 0)),
        held=int(counters.get("held", 0)),
        requests={state: int(counters.get(state, 0)) for state in REQUEST_STATES},
    )


def usd(amount: int) -> str:
    return format_nanos(amount)
