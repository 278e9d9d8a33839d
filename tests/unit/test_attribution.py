"""Bounds and rules for what a client may claim (user, tags, limit ids, address)."""

from __future__ import annotations

import pytest

from extproc.core.attribution import (
    MAX_USER_CHARS,
    client_user,
    effective_user,
    header_list,
    host_of,
    limit_tags,
)
from extproc.core.decisions import Deny

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], ()),
        (["a"], ("a",)),
        ([" a , b ,, "], ("a", "b")),
        (["a,b", "b,c"], ("a", "b", "c")),  # both header spellings, de-duplicated
        (["x" * 8], ("x" * 8,)),
        ([",".join("abcd")], tuple("abcd")),
        ([" , "], ()),
    ],
)
def test_header_list_within_bounds(values: list[str], expected: tuple[str, ...]) -> None:
    assert header_list(values, "x-tollgate-tags", 4, 8) == expected


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        (["x" * 9], "at most 8 characters"),
        (["a,b,c,d,e"], "at most 4 entries"),
        (["a,b", "c,d,e"], "at most 4 entries"),
    ],
)
def test_header_list_beyond_bounds_is_400(values: list[str], fragment: str) -> None:
    result = header_list(values, "x-tollgate-tags", 4, 8)
    assert isinstance(result, Deny)
    assert result.status == 400 and fragment in result.message
    assert result.message.startswith("x-tollgate-tags:")


def test_header_list_duplicates_do_not_count_twice() -> None:
    assert header_list(["a,a,a,a,a,a"], "t", 1, 8) == ("a",)


@pytest.mark.parametrize(
    ("length", "ok"), [(0, True), (MAX_USER_CHARS, True), (MAX_USER_CHARS + 1, False)]
)
def test_client_user_length(length: int, ok: bool) -> None:
    result = client_user("u" * length, "Header 'x-tollgate-user'")
    assert (result == "u" * length) if ok else isinstance(result, Deny)


@pytest.mark.parametrize(
    ("key_user", "allowed", "header", "body", "expected"),
    [
        ("alice", False, "", "mallory", "alice"),
        ("alice", False, "mallory", None, "alice"),
        ("", False, "", "mallory", ""),
        ("svc", True, "", "end-1", "end-1"),
        ("svc", True, "end-2", "end-1", "end-2"),
        ("svc", True, "", None, "svc"),
        ("", True, "", "", ""),
    ],
)
def test_effective_user(key_user: str, allowed: bool, header: str, body: str | None,
                        expected: str) -> None:
    assert effective_user(key_user, allowed, header, body) == expected


@pytest.mark.parametrize(
    ("key_tags", "allowed", "request_tags", "expected"),
    [
        ((), (), ("victim",), ()),
        (("team-a",), (), ("victim", "team-a"), ("team-a",)),
        ((), ("team-*",), ("team-b", "victim"), ("team-b",)),
        (("ci",), ("*",), ("x", "ci"), ("ci", "x")),
        ((), ("Team-*",), ("team-b",), ()),  # case matters, like selectors
    ],
)
def test_limit_tags_only_those_the_key_may_use(
    key_tags: tuple[str, ...], allowed: tuple[str, ...], request_tags: tuple[str, ...],
    expected: tuple[str, ...],
) -> None:
    assert limit_tags(key_tags, allowed, request_tags) == expected


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.2:51234", "127.0.0.2"),
        ("[::1]:8080", "::1"),
        ("[2001:db8::1]:1", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("10.0.0.1", "10.0.0.1"),
        ("", ""),
    ],
)
def test_host_of(address: str, host: str) -> None:
    assert host_of(address) == host
