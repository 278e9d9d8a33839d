"""Virtual keys: their format, where clients present them, and whether one may be used."""

from __future__ import annotations

import base64
import re
from dataclasses import replace

import pytest

from extproc.core.keys import (
    KEY_PREFIX,
    check_key,
    find_key,
    generate_key,
    hash_key,
    model_allowed,
)
from extproc.core.resources import KeyRecord, Resource, ResourceError, validate_document

pytestmark = pytest.mark.unit

_URLSAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def test_generated_key_format() -> None:
    key = generate_key()
    assert key.startswith("tg-")
    assert KEY_PREFIX == "tg-"
    # 32 random bytes in unpadded URL-safe base64 are 43 characters
    body = key[len("tg-") :]
    assert len(key) == 3 + 43
    assert _URLSAFE.match(body)
    assert len(base64.urlsafe_b64decode(body + "=")) == 32


def test_generated_keys_are_unique() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000


def test_hash_key_is_hex_sha256() -> None:
    # the FIPS 180-2 test vector for "abc"
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    digest = hash_key(generate_key())
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert hash_key("tg-a") != hash_key("tg-b")


def test_a_key_resource_takes_the_hash_never_the_key() -> None:
    def key_resource(key_sha256: str) -> Resource:
        return validate_document({
            "apiVersion": "tollgate.io/v1alpha1", "kind": "VirtualKey", "metadata": {"name": "k"},
            "spec": {"keySha256": key_sha256},
        })

    key = generate_key()
    assert key_resource(hash_key(key).upper()).spec["keySha256"] == hash_key(key)
    with pytest.raises(ResourceError, match=r"keySha256.*64 hex digits"):
        key_resource(key)  # the key itself, pasted by mistake, is refused


# ---- find_key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"content-type": "application/json"}, None),
        ({"authorization": "Bearer tg-a"}, ("tg-a", "authorization")),
        ({"authorization": "bearer tg-a"}, ("tg-a", "authorization")),
        ({"authorization": "BEARER tg-a"}, ("tg-a", "authorization")),
        ({"authorization": "  Bearer   tg-a  "}, ("tg-a", "authorization")),
        ({"x-api-key": "tg-b"}, ("tg-b", "x-api-key")),
        ({"x-api-key": "  tg-b \t"}, ("tg-b", "x-api-key")),
        ({"api-key": "tg-d"}, ("tg-d", "api-key")),  # the Azure OpenAI SDK's header
        ({"x-api-key": "tg-b", "api-key": "tg-d"}, ("tg-b", "x-api-key")),
        ({"xproxy-api-key": "tg-c"}, ("tg-c", "xproxy-api-key")),
        ({"xproxy-api-key": " tg-c "}, ("tg-c", "xproxy-api-key")),
        # precedence: xproxy-api-key > Authorization: Bearer > x-api-key
        (
            {"xproxy-api-key": "tg-c", "authorization": "Bearer sk-own", "x-api-key": "sk-ant"},
            ("tg-c", "xproxy-api-key"),
        ),
        ({"authorization": "Bearer tg-a", "x-api-key": "tg-b"}, ("tg-a", "authorization")),
        # a non-Bearer Authorization is not a key
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "tg-b"}, ("tg-b", "x-api-key")),
        ({"authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"authorization": "tg-a"}, None),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer    "}, None),
        ({"authorization": ""}, None),
        # blank headers are absent, not empty keys
        ({"x-api-key": "   "}, None),
        ({"xproxy-api-key": "   "}, None),
        ({"xproxy-api-key": "", "authorization": "Bearer tg-a"}, ("tg-a", "authorization")),
        ({"xproxy-api-key": "  ", "x-api-key": "tg-b"}, ("tg-b", "x-api-key")),
    ],
)
def test_find_key(headers: dict[str, str], expected: tuple[str, str] | None) -> None:
    presented = find_key(headers)
    if expected is None:
        assert presented is None
        return
    assert presented is not None
    assert (presented.value, presented.header) == expected
    # only xproxy-api-key means bring-your-own-key
    assert presented.bring_your_own_key is (expected[1] == "xproxy-api-key")


# ---- check_key -------------------------------------------------------------------------------

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
VALID = KeyRecord(
    name="k",
    key_sha256=hash_key("tg-k"),
    group="",
    user="",
    models=(),
    tags=(),
    expires_at=None,
    revoked=False,
)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (None, "Incorrect API key provided."),  # OpenAI's own wording, which SDKs surface
        (replace(VALID, revoked=True), "This API key has been revoked."),
        # at the expiry instant it is expired
        (replace(VALID, expires_at=NOW), "This API key has expired."),
        (replace(VALID, expires_at=NOW - 1), "This API key has expired."),
        (replace(VALID, expires_at=NOW - 1, revoked=True), "This API key has been revoked."),
    ],
)
def test_check_key_refuses(record: KeyRecord | None, message: str) -> None:
    deny = check_key(record, NOW)
    assert deny is not None
    assert (deny.status, deny.code, deny.message) == (401, "invalid_api_key", message)


@pytest.mark.parametrize(
    "record", [VALID, replace(VALID, expires_at=NOW + 1), replace(VALID, expires_at=NOW + 0.001)]
)
def test_check_key_accepts(record: KeyRecord) -> None:
    assert check_key(record, NOW) is None


# ---- model_allowed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "model", "allowed"),
    [
        ((), "gpt-4o", True),
        ((), "anything-at-all", True),
        (("gpt-4o",), "gpt-4o", True),
        (("gpt-4o",), "gpt-4o-mini", False),  # a plain name is exact, not a prefix
        (("gpt-4o",), "xgpt-4o", False),
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4", False),
        (("gpt-4o*", "claude-*"), "claude-sonnet-4-5", True),
        (("gpt-4o*", "claude-*"), "gpt-4o-2024-08-06", True),
        (("gpt-4o*", "claude-*"), "o1", False),
        (("gpt-?o",), "gpt-4o", True),
        (("gpt-?o",), "gpt-40o", False),
        (("gpt-4.1",), "gpt-4x1", False),  # '.' is literal, not a regex wildcard
        (("ft:gpt-4o:acme:*",), "ft:gpt-4o:acme:abc", True),
        (("ft:gpt-4o:acme:*",), "ft:gpt-4o:other:abc", False),
        (("gpt-4o",), "GPT-4O", False),  # model names are case-sensitive
    ],
)
def test_model_allowed(patterns: tuple[str, ...], model: str, allowed: bool) -> None:
    assert model_allowed(replace(VALID, models=patterns), model) is allowed
