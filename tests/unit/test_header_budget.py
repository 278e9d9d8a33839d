"""Predicting Envoy's verdict on Tollgate's header edits (count and size limits)."""

from __future__ import annotations

import pytest

from extproc.core.decisions import HeaderEdit
from extproc.core.header_budget import HeaderTally, check_fits

pytestmark = pytest.mark.unit


def headers(n: int) -> list[tuple[str, str]]:
    base = [(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "h"),
            (":scheme", "http"), ("authorization", "Bearer tg-key")]
    return base + [(f"x-f-{i}", "y") for i in range(n - len(base))]


@pytest.mark.parametrize(
    ("count", "edit", "body", "fits"),
    [
        (98, HeaderEdit(set=(("x-tollgate-cluster", "openai"),)), False, True),  # 99
        (99, HeaderEdit(set=(("x-tollgate-cluster", "openai"),)), False, True),  # 100
        (100, HeaderEdit(set=(("x-tollgate-cluster", "openai"),)), False, False),  # 101
        # overwriting a header that is there adds no entry
        (100, HeaderEdit(set=(("authorization", "Bearer sk-upstream"),)), False, True),
        # a removal makes room for a new one
        (100, HeaderEdit(set=(("x-tollgate-cluster", "o"),), remove=("x-f-7",)), False, True),
        # removing a header that is absent makes no room
        (100, HeaderEdit(set=(("x-tollgate-cluster", "o"),), remove=("nope",)), False, False),
        # a replaced body brings content-length when the request had none (chunked)
        (99, HeaderEdit(set=(("x-tollgate-cluster", "o"),)), True, False),
        # already past the limit (Envoy added its own headers): even a removal fails
        (103, HeaderEdit(remove=("x-f-7",)), False, False),
    ],
)
def test_count(count: int, edit: HeaderEdit, body: bool, fits: bool) -> None:
    deny = check_fits(HeaderTally(headers(count)), edit, body)
    assert (deny is None) == fits
    if deny is not None:
        assert (deny.status, deny.code) == (431, "request_header_fields_too_large")


def test_duplicates_count_as_entries_and_a_set_collapses_them() -> None:
    tally = HeaderTally([*headers(97), ("x-dup", "a"), ("x-dup", "b"), ("x-dup", "c")])
    assert tally.entries == 100
    assert check_fits(tally, HeaderEdit(set=(("x-new", "1"),)), False) is not None
    assert check_fits(tally, HeaderEdit(set=(("x-dup", "1"), ("x-new", "1"))), False) is None


def test_size() -> None:
    big = [*headers(10), ("x-big", "v" * (60 * 1024 - 200))]
    tally = HeaderTally(big)
    assert check_fits(tally, HeaderEdit(set=(("x-tollgate-cluster", "openai"),)), False) is None
    assert check_fits(tally, HeaderEdit(set=(("authorization", "k" * 300),)), False) is not None
