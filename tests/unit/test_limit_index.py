"""Which limits cover a request does not depend on how many others are stored: the snapshot's
limits are indexed by the key names their selectors list. Same answers as a full scan."""

from __future__ import annotations

import pytest

from extproc.core.quota import Selector, Subject, applicable
from tests.unit.test_quota import limit

pytestmark = pytest.mark.unit


def subject(key: str) -> Subject:
    return Subject(key=key, group="g", user="", tags=("t",), model="gpt-4o", ip="")


def names(found: tuple[list, list[str]]) -> tuple[list[str], list[str]]:
    return [lim.name for lim in found[0]], found[1]


def test_key_selected_and_general_limits_and_named_ones() -> None:
    stored = tuple(
        [limit(f"other{i}", selector=Selector(keys=(f"k{i}",))) for i in range(1000)]
        + [limit("mine", selector=Selector(keys=("app", "app2"))),
           limit("by-group", selector=Selector(groups=("g",))),
           limit("wrong-group", selector=Selector(groups=("h",))),
           limit("everyone"),
           limit("mine-but-other-model", selector=Selector(keys=("app",), models=("claude*",)))])
    assert names(applicable(stored, subject("app"), ())) == (["by-group", "everyone", "mine"], [])
    assert names(applicable(stored, subject("app2"), ())) == (
        ["by-group", "everyone", "mine"], [])
    assert names(applicable(stored, subject("k7"), ("other9", "gone"))) == (
        ["by-group", "everyone", "other7", "other9"], ["gone"])
    # The same call again (served from the cached index) gives the same answer.
    assert names(applicable(stored, subject("k7"), ())) == (["by-group", "everyone", "other7"],
                                                            [])


def test_a_new_snapshot_gets_its_own_index() -> None:
    before = (limit("a", selector=Selector(keys=("app",))),)
    after = (limit("b", selector=Selector(keys=("app",))),)
    assert names(applicable(before, subject("app"), ())) == (["a"], [])
    assert names(applicable(after, subject("app"), ())) == (["b"], [])
    assert names(applicable(before, subject("app"), ())) == (["a"], [])
    # A list (could still change) is never cached.
    mutable = [limit("c", selector=Selector(keys=("app",)))]
    assert names(applicable(mutable, subject("app"), ())) == (["c"], [])
    mutable[0] = limit("d", selector=Selector(keys=("app",)))
    assert names(applicable(mutable, subject("app"), ())) == (["d"], [])
