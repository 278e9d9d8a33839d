"""The resource schema: valid documents normalise with defaults, invalid ones say where and why."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from extproc.core.pricing import ModelPrice
from extproc.core.quota import LimitSpec, RateLimitSpec, Selector, window_buckets
from extproc.core.resources import (
    DEFAULT_COOLDOWN_STATUSES,
    Resource,
    ResourceError,
    key_record,
    limit_spec,
    model_prices,
    rate_limit_spec,
    upstream_spec,
    validate_document,
    validate_documents,
)

pytestmark = pytest.mark.unit

API = "tollgate.io/v1alpha1"
SHA = "ab" * 32
COOLDOWN = {"seconds": 30, "maxSeconds": 600, "statuses": [401, 403, 429, 500, 502, 503, 504]}


def doc(kind: str, spec: Any, name: str = "r1", **top: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec, **top}


# ---- valid documents -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "spec", "normalised"),
    [
        (
            "VirtualKey",
            {"keySha256": SHA},
            {
                "keySha256": SHA, "group": "", "user": "", "models": [], "tags": [],
                "expiresAt": None, "revoked": False, "description": "",
                "allowRequestLimits": False, "allowClientUser": False, "allowedRequestTags": [],
                "allowedUseCases": [], "allowedAccounts": [], "allowedUpstreams": [],
                "secretName": "",
            },
        ),
        (
            "VirtualKey",
            {
                "keySha256": SHA.upper(), "group": "team-a", "user": "alice",
                "models": ["gpt-4o*"], "tags": ["ci"], "expiresAt": "2026-01-01T02:00:00+02:00",
                "revoked": True, "description": "CI key",
            },
            {
                "keySha256": SHA, "group": "team-a", "user": "alice", "models": ["gpt-4o*"],
                "tags": ["ci"], "expiresAt": "2026-01-01T00:00:00Z", "revoked": True,
                "description": "CI key", "allowRequestLimits": False, "allowClientUser": False,
                "allowedRequestTags": [], "allowedUseCases": [], "allowedAccounts": [],
                "allowedUpstreams": [],
                "secretName": "",
            },
        ),
        (
            "PriceTable",
            {"models": {"m": {"input": 1, "output": 2.5}}},
            {"currency": "USD", "models": {"m": {"input": 1, "output": 2.5}}},
        ),
        (
            "PriceTable",
            {"currency": "USD", "models": {
                "m": {"input": 3, "output": 15, "cachedInput": 0.3, "cacheWrite": 3.75,
                      "reasoning": 20},
            }},
            {"currency": "USD", "models": {
                "m": {"input": 3, "output": 15, "cachedInput": 0.3, "cacheWrite": 3.75,
                      "reasoning": 20},
            }},
        ),
        (
            "Upstream",
            {"provider": "openai", "cluster": "openai"},
            {
                "provider": "openai", "cluster": "openai", "models": ["*"], "priority": 100,
                "aliases": {}, "azure": None, "anthropicVersion": "2023-06-01", "translate": False,
                "allowedGroups": [],
                "unpriced": "default",
                "credentials": [], "cooldown": COOLDOWN,
            },
        ),
        (
            "Upstream",
            {
                "provider": "azure-openai", "cluster": "azure-openai", "models": ["gpt-4o"],
                "priority": 5, "aliases": {"fast": "gpt-4o-mini"}, "azure": {},
                "credentials": [{"name": "a", "secretRef": "AZURE_KEY"},
                                {"name": "b", "secretRef": "AZURE_KEY_2", "rpm": 60,
                                 "tpm": 0, "isFallback": True}],
            },
            {
                "provider": "azure-openai", "cluster": "azure-openai", "models": ["gpt-4o"],
                "priority": 5, "aliases": {"fast": "gpt-4o-mini"},
                "azure": {"apiVersion": "2024-10-21", "deployments": {}},
                "anthropicVersion": "2023-06-01", "translate": False,
                "allowedGroups": [],
                "unpriced": "default",
                "credentials": [
                    {"name": "a", "secretRef": "AZURE_KEY", "rpm": None, "tpm": None,
                     "isFallback": False, "baseUrl": None},
                    {"name": "b", "secretRef": "AZURE_KEY_2", "rpm": 60, "tpm": 0,
                     "isFallback": True, "baseUrl": None},
                ],
                "cooldown": COOLDOWN,
            },
        ),
        (
            "Upstream",
            {"provider": "openai", "cluster": "openai", "cooldown": {}},
            {
                "provider": "openai", "cluster": "openai", "models": ["*"], "priority": 100,
                "aliases": {}, "azure": None, "anthropicVersion": "2023-06-01", "translate": False,
                "allowedGroups": [],
                "unpriced": "default",
                "credentials": [], "cooldown": COOLDOWN,
            },
        ),
        (
            "Upstream",
            {"provider": "anthropic", "cluster": "anthropic",
             "cooldown": {"seconds": 5, "maxSeconds": 120, "statuses": [429, 529]}},
            {
                "provider": "anthropic", "cluster": "anthropic", "models": ["*"],
                "priority": 100, "aliases": {}, "azure": None,
                "anthropicVersion": "2023-06-01", "translate": False,
                "allowedGroups": [], "unpriced": "default",
                "credentials": [],
                "cooldown": {"seconds": 5, "maxSeconds": 120, "statuses": [429, 529]},
            },
        ),
        (
            "Upstream",
            {"provider": "openai", "cluster": "openai", "cooldown": {"seconds": 0}},
            {
                "provider": "openai", "cluster": "openai", "models": ["*"], "priority": 100,
                "aliases": {}, "azure": None, "anthropicVersion": "2023-06-01", "translate": False,
                "allowedGroups": [],
                "unpriced": "default",
                "credentials": [],
                "cooldown": {**COOLDOWN, "seconds": 0},
            },
        ),
        (
            "VirtualKey",
            {"keySha256": SHA, "allowRequestLimits": True, "allowClientUser": True,
             "allowedRequestTags": ["team-*"]},
            {
                "keySha256": SHA, "group": "", "user": "", "models": [], "tags": [],
                "expiresAt": None, "revoked": False, "description": "",
                "allowRequestLimits": True, "allowClientUser": True,
                "allowedRequestTags": ["team-*"], "allowedUseCases": [], "allowedAccounts": [],
                "allowedUpstreams": [],
                "secretName": "",
            },
        ),
        (
            "Limit",
            {"type": "Block", "max": 100},
            {
                "type": "Block", "max": 100, "threshold": 1.0, "period": "none",
                "timeZone": "UTC", "enforcement": "strict", "failOpen": False,
                "onInsufficient": "refuse", "minOutputTokens": 16,
                "selector": {"keys": [], "groups": [], "users": [], "tags": [], "models": [],
                             "useCases": [], "accounts": [],
                             "namespaces": []},
            },
        ),
        (
            "Limit",
            {"type": "Allow", "max": 0, "selector": {}},
            {
                "type": "Allow", "max": 0, "threshold": 1.0, "period": "none",
                "timeZone": "UTC", "enforcement": "strict", "failOpen": False,
                "onInsufficient": "refuse", "minOutputTokens": 16,
                "selector": {"keys": [], "groups": [], "users": [], "tags": [], "models": [],
                             "useCases": [], "accounts": [],
                             "namespaces": []},
            },
        ),
        (
            "Limit",
            {
                "type": "Allow", "max": 12.5, "threshold": 0.5, "period": "week",
                "timeZone": "Europe/Berlin", "enforcement": "reactive", "failOpen": True,
                "selector": {"groups": ["team-a"], "models": ["gpt-4o*"]},
            },
            {
                "type": "Allow", "max": 12.5, "threshold": 0.5, "period": "week",
                "timeZone": "Europe/Berlin", "enforcement": "reactive", "failOpen": True,
                "onInsufficient": "refuse", "minOutputTokens": 16,
                "selector": {"keys": [], "groups": ["team-a"], "users": [], "tags": [],
                             "models": ["gpt-4o*"], "useCases": [], "accounts": [],
                             "namespaces": []},
            },
        ),
        (
            "RateLimit",
            {"per": "key", "requestsPerMinute": 60},
            {
                "per": "key",
                "selector": {"keys": [], "groups": [], "users": [], "tags": [], "models": [],
                             "useCases": [], "accounts": [],
                             "namespaces": []},
                "window": "1m", "requests": None, "tokens": None,
                "requestsPerMinute": 60, "tokensPerMinute": None, "concurrent": None,
            },
        ),
        (
            "RateLimit",
            {
                "per": "global", "selector": {"keys": ["a"], "tags": ["ci"]},
                "requestsPerMinute": 1, "tokensPerMinute": 200_000, "concurrent": 20,
            },
            {
                "per": "global",
                "selector": {"keys": ["a"], "groups": [], "users": [], "tags": ["ci"],
                             "models": [], "useCases": [], "accounts": [], "namespaces": []},
                "window": "1m", "requests": None, "tokens": None,
                "requestsPerMinute": 1, "tokensPerMinute": 200_000, "concurrent": 20,
            },
        ),
    ],
)
def test_valid_document_normalises(
    kind: str, spec: dict[str, Any], normalised: dict[str, Any]
) -> None:
    resource = validate_document(doc(kind, spec))
    assert resource == Resource(kind, "r1", normalised)
    # what is stored (the normalised document) validates again to the same thing
    assert validate_document(resource.document()) == resource


def test_kubernetes_bookkeeping_is_accepted() -> None:
    document = doc("VirtualKey", {"keySha256": SHA}, name="team-a.ci-key")
    document["metadata"].update(namespace="tollgate", labels={"a": "b"}, uid="123")
    document["status"] = {"observedGeneration": 3}
    assert validate_document(document).name == "team-a.ci-key"


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T00:00:00", "2026-01-01T00:00:00Z"),  # no zone: UTC
        ("2026-01-01T01:30:00+01:30", "2026-01-01T00:00:00Z"),
        (datetime(2026, 1, 1, tzinfo=UTC), "2026-01-01T00:00:00Z"),  # YAML-parsed timestamp
        (datetime(2025, 12, 31, 19, tzinfo=timezone(timedelta(hours=-5))), "2026-01-01T00:00:00Z"),
    ],
)
def test_expires_at_is_normalised_to_utc(value: Any, normalised: str) -> None:
    resource = validate_document(doc("VirtualKey", {"keySha256": SHA, "expiresAt": value}))
    assert resource.spec["expiresAt"] == normalised
    assert key_record(resource).expires_at == 1_767_225_600.0  # 2026-01-01T00:00:00Z


def test_typed_views() -> None:
    key = key_record(validate_document(doc("VirtualKey", {"keySha256": SHA, "models": ["a*"]})))
    assert (key.name, key.key_sha256, key.models, key.expires_at, key.revoked) == (
        "r1", SHA, ("a*",), None, False
    )
    table = validate_document(doc("PriceTable", {"models": {
        "m": {"input": 2.5, "output": 10, "cachedInput": 1.25},
    }}))
    # $2.50, $10, $1.25 per 1M -> nano-dollars per 1M
    assert model_prices(table) == {
        "m": ModelPrice(input=2_500_000_000, output=10_000_000_000, cached_input=1_250_000_000)
    }
    upstream = upstream_spec(validate_document(doc("Upstream", {
        "provider": "anthropic", "cluster": "anthropic",
        "credentials": [{"name": "d", "secretRef": "ANTHROPIC_API_KEY"}],
    })))
    assert (upstream.provider, upstream.models, upstream.priority) == ("anthropic", ("*",), 100)
    assert upstream.anthropic_version == "2023-06-01"
    assert [c.secret_ref for c in upstream.credentials] == ["ANTHROPIC_API_KEY"]


def test_upstream_spec_cooldown() -> None:
    default = upstream_spec(validate_document(doc("Upstream", UP)))
    assert (default.cooldown_ms, default.cooldown_max_ms) == (30_000, 600_000)
    assert default.cooldown_statuses == (401, 403, 429, 500, 502, 503, 504)
    assert default.cooldown_statuses == DEFAULT_COOLDOWN_STATUSES
    custom = upstream_spec(validate_document(doc("Upstream", _with(UP, cooldown={
        "seconds": 5, "maxSeconds": 90, "statuses": [429, 503],
    }))))
    assert (custom.cooldown_ms, custom.cooldown_max_ms) == (5_000, 90_000)
    assert custom.cooldown_statuses == (429, 503)
    assert isinstance(custom.cooldown_statuses, tuple)
    # partly set: the rest keeps its default
    partial = upstream_spec(validate_document(doc("Upstream", _with(UP, cooldown={
        "maxSeconds": 0,
    }))))
    assert (partial.cooldown_ms, partial.cooldown_max_ms) == (30_000, 0)
    assert partial.cooldown_statuses == DEFAULT_COOLDOWN_STATUSES
    # an empty list is accepted: no status puts a credential in cooldown
    none = upstream_spec(validate_document(doc("Upstream", _with(UP, cooldown={
        "statuses": [],
    }))))
    assert none.cooldown_statuses == ()


# ---- errors ----------------------------------------------------------------------------------

KEY = {"keySha256": SHA}
UP = {"provider": "openai", "cluster": "openai"}
CRED = {"name": "default", "secretRef": "OPENAI_API_KEY"}


def _with(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**base, **fields}


@pytest.mark.parametrize(
    ("document", "where", "field", "message"),
    [
        ([], "document", "", "must be a mapping"),
        ("kind: VirtualKey", "document", "", "must be a mapping"),
        (_with(doc("VirtualKey", KEY), apiVersion="v1"), "document", "apiVersion",
         "must be tollgate.io/v1alpha1"),
        ({"kind": "VirtualKey", "metadata": {"name": "a"}, "spec": KEY}, "document",
         "apiVersion", "is required"),
        (doc("Budget", {}), "document", "kind", "unknown kind 'Budget'"),
        (_with(doc("VirtualKey", KEY), kind=None), "document", "kind", "is required"),
        ({"apiVersion": API, "kind": "VirtualKey", "spec": KEY}, "document", "metadata",
         "is required"),
        (_with(doc("VirtualKey", KEY), metadata={}), "document", "metadata.name", "is required"),
        (_with(doc("VirtualKey", KEY), metadata="k"), "document", "metadata", "must be a mapping"),
        (doc("VirtualKey", KEY, name="My_Key"), "document", "metadata.name", "lower-case"),
        (doc("VirtualKey", KEY, name="-key"), "document", "metadata.name", "lower-case"),
        (doc("VirtualKey", KEY, name=5), "document", "metadata.name", "must be a string"),
        (_with(doc("VirtualKey", KEY), metadata={"name": "k", "nmae": "x"}), "document",
         "metadata.nmae", "unknown field"),
        (_with(doc("VirtualKey", KEY), specs=KEY), "document", "specs", "unknown field"),
        (_with(doc("VirtualKey", KEY), spec=None), "document (VirtualKey/r1)", "spec",
         "is required"),
        (doc("VirtualKey", ["x"]), "document", "spec", "must be a mapping"),
        # typos in spec fields are errors, not silently ignored
        (doc("VirtualKey", _with(KEY, modles=["gpt-4o"])), "document (VirtualKey/r1)",
         "spec.modles", "unknown field"),
        (doc("Upstream", _with(UP, priorty=1)), "document (Upstream/r1)", "spec.priorty",
         "unknown field"),
        # wrong types
        (doc("VirtualKey", _with(KEY, models="gpt-4o")), "document (VirtualKey/r1)",
         "spec.models", "must be a list of strings"),
        (doc("VirtualKey", _with(KEY, tags=[1])), "document (VirtualKey/r1)", "spec.tags",
         "must be a list of strings"),
        (doc("VirtualKey", _with(KEY, revoked="yes")), "document (VirtualKey/r1)",
         "spec.revoked", "true or false"),
        (doc("VirtualKey", _with(KEY, group=5)), "document (VirtualKey/r1)", "spec.group",
         "must be a string, got int"),
        (doc("Upstream", _with(UP, priority=-1)), "document (Upstream/r1)", "spec.priority",
         "integer >= 0"),
        (doc("Upstream", _with(UP, priority=True)), "document (Upstream/r1)", "spec.priority",
         "integer >= 0"),
        (doc("Upstream", _with(UP, priority="1")), "document (Upstream/r1)", "spec.priority",
         "integer >= 0"),
        (doc("Upstream", _with(UP, credentials={"name": "a"})), "document (Upstream/r1)",
         "spec.credentials", "must be a list"),
        (doc("Upstream", _with(UP, credentials=["OPENAI_API_KEY"])), "document (Upstream/r1)",
         "spec.credentials[0]", "must be a mapping"),
        (doc("Upstream", _with(UP, credentials=[_with(CRED, rpm="60")])),
         "document (Upstream/r1)", "spec.credentials[0].rpm", "integer >= 0"),
        (doc("Upstream", _with(UP, credentials=[_with(CRED, secret="x")])),
         "document (Upstream/r1)", "spec.credentials[0].secret", "unknown field"),
        (doc("Upstream", _with(UP, credentials=[_with(CRED, secretRef="my key")])),
         "document (Upstream/r1)", "spec.credentials[0].secretRef", "environment variable"),
        (doc("Upstream", _with(UP, credentials=[{"secretRef": "K"}])),
         "document (Upstream/r1)", "spec.credentials[0].name", "is required"),
        (doc("Upstream", _with(UP, aliases={"fast": 4})), "document (Upstream/r1)",
         "spec.aliases.fast", "must be a string"),
        (doc("Upstream", _with(UP, azure={"deployment": {}})), "document (Upstream/r1)",
         "spec.azure.deployment", "unknown field"),
        # cooldown
        (doc("Upstream", _with(UP, cooldown={"statuses": [200]})), "document (Upstream/r1)",
         "spec.cooldown.statuses", "must be a list of HTTP status codes 400-599"),
        (doc("Upstream", _with(UP, cooldown={"statuses": [429, 600]})),
         "document (Upstream/r1)", "spec.cooldown.statuses", "HTTP status codes 400-599"),
        (doc("Upstream", _with(UP, cooldown={"statuses": "429"})), "document (Upstream/r1)",
         "spec.cooldown.statuses", "must be a list of HTTP status codes 400-599"),
        (doc("Upstream", _with(UP, cooldown={"statuses": [True]})), "document (Upstream/r1)",
         "spec.cooldown.statuses", "must be a list of HTTP status codes 400-599"),
        (doc("Upstream", _with(UP, cooldown={"statuses": ["429"]})), "document (Upstream/r1)",
         "spec.cooldown.statuses", "must be a list of HTTP status codes 400-599"),
        (doc("Upstream", _with(UP, cooldown={"seconds": -1})), "document (Upstream/r1)",
         "spec.cooldown.seconds", "must be an integer >= 0"),
        (doc("Upstream", _with(UP, cooldown={"seconds": 1.5})), "document (Upstream/r1)",
         "spec.cooldown.seconds", "must be an integer >= 0"),
        (doc("Upstream", _with(UP, cooldown={"maxSeconds": -600})), "document (Upstream/r1)",
         "spec.cooldown.maxSeconds", "must be an integer >= 0"),
        (doc("Upstream", _with(UP, cooldown={"maxSeconds": "600"})), "document (Upstream/r1)",
         "spec.cooldown.maxSeconds", "must be an integer >= 0"),
        (doc("Upstream", _with(UP, cooldown={"seconds": 30, "max": 60})),
         "document (Upstream/r1)", "spec.cooldown.max", "unknown field"),
        (doc("Upstream", _with(UP, cooldown=30)), "document (Upstream/r1)", "spec.cooldown",
         "must be a mapping"),
        # keySha256
        (doc("VirtualKey", {}), "document (VirtualKey/r1)", "spec.keySha256", "is required"),
        (doc("VirtualKey", {"keySha256": "abc"}), "document (VirtualKey/r1)", "spec.keySha256",
         "64 hex digits"),
        (doc("VirtualKey", {"keySha256": "g" * 64}), "document (VirtualKey/r1)",
         "spec.keySha256", "64 hex digits"),
        (doc("VirtualKey", {"keySha256": SHA + "a"}), "document (VirtualKey/r1)",
         "spec.keySha256", "64 hex digits"),
        # provider, cluster, credentials
        (doc("Upstream", _with(UP, provider="vertex")), "document (Upstream/r1)", "spec.provider",
         "must be one of openai, azure-openai, anthropic, openai-compatible, gemini"),
        (doc("Upstream", {"cluster": "c"}), "document (Upstream/r1)", "spec.provider",
         "is required"),
        (doc("Upstream", {"provider": "openai"}), "document (Upstream/r1)", "spec.cluster",
         "is required"),
        (doc("Upstream", _with(UP, credentials=[CRED, _with(CRED, secretRef="OTHER")])),
         "document (Upstream/r1)", "spec.credentials", "unique"),
        # expiresAt
        (doc("VirtualKey", _with(KEY, expiresAt="next tuesday")), "document (VirtualKey/r1)",
         "spec.expiresAt", "RFC 3339"),
        (doc("VirtualKey", _with(KEY, expiresAt=1767225600)), "document (VirtualKey/r1)",
         "spec.expiresAt", "RFC 3339"),
        # price tables
        (doc("PriceTable", {}), "document (PriceTable/r1)", "spec.models", "is required"),
        (doc("PriceTable", {"models": ["gpt-4o"]}), "document (PriceTable/r1)", "spec.models",
         "must be a mapping"),
        (doc("PriceTable", {"models": {"gpt-4o": {"output": 10}}}), "document (PriceTable/r1)",
         "spec.models.gpt-4o.input", "is required"),
        (doc("PriceTable", {"models": {"gpt-4o": {"input": 2.5}}}), "document (PriceTable/r1)",
         "spec.models.gpt-4o.output", "is required"),
        (doc("PriceTable", {"models": {"gpt-4o": {"input": -1, "output": 10}}}),
         "document (PriceTable/r1)", "spec.models.gpt-4o.input", "must be a number >= 0"),
        (doc("PriceTable", {"models": {"gpt-4o": {"input": 1, "output": 1, "cacheWrite": -0.5}}}),
         "document (PriceTable/r1)", "spec.models.gpt-4o.cacheWrite", "must be a number >= 0"),
        (doc("PriceTable", {"models": {"gpt-4o": {"input": "2.50", "output": 10}}}),
         "document (PriceTable/r1)", "spec.models.gpt-4o.input", "must be a number >= 0"),
        (doc("PriceTable", {"models": {"gpt-4o": {"input": True, "output": 10}}}),
         "document (PriceTable/r1)", "spec.models.gpt-4o.input", "must be a number >= 0"),
        (doc("PriceTable", {"models": {"gpt-4o": {"input": 1, "output": 1, "cached": 0.5}}}),
         "document (PriceTable/r1)", "spec.models.gpt-4o.cached", "unknown field"),
        (doc("PriceTable", {"models": {"gpt-4o": None}}), "document (PriceTable/r1)",
         "spec.models.gpt-4o", "must be a mapping"),
        (doc("PriceTable", {"models": {"gpt-4o": 2.5}}), "document (PriceTable/r1)",
         "spec.models.gpt-4o", "must be a mapping"),
        (doc("PriceTable", {"currency": "EUR", "models": {}}), "document (PriceTable/r1)",
         "spec.currency", "only USD"),
    ],
)
def test_invalid_document_names_document_and_field(
    document: Any, where: str, field: str, message: str
) -> None:
    with pytest.raises(ResourceError) as caught:
        validate_document(document)
    error = caught.value
    assert error.where == where
    assert error.field == field
    assert message in error.message
    text = str(error)
    assert text.startswith(where)
    if field:
        assert f"field '{field}'" in text
    assert message in text


# ---- Limit and RateLimit ---------------------------------------------------------------------

LIMIT = {"type": "Block", "max": 100}
RATE = {"per": "key", "requestsPerMinute": 60}


@pytest.mark.parametrize(("field", "value"), [
    ("type", "Allow"),
    ("max", 0),
    ("max", 0.01),
    ("threshold", 1),
    ("threshold", 0.000001),
    *[("period", p) for p in ("none", "hour", "day", "week", "month")],
    ("timeZone", "America/New_York"),
    ("timeZone", "Etc/GMT+5"),
    ("enforcement", "reactive"),
    ("failOpen", True),
])
def test_limit_accepts(field: str, value: Any) -> None:
    spec = validate_document(doc("Limit", _with(LIMIT, **{field: value}))).spec
    assert spec[field] == value


@pytest.mark.parametrize("per", ["key", "user", "group", "model", "ip", "global"])
@pytest.mark.parametrize("rate", ["requestsPerMinute", "tokensPerMinute", "concurrent"])
def test_rate_limit_accepts_any_one_rate(per: str, rate: str) -> None:
    spec = validate_document(doc("RateLimit", {"per": per, rate: 1})).spec
    assert (spec["per"], spec[rate]) == (per, 1)
    others = {"requestsPerMinute", "tokensPerMinute", "concurrent"} - {rate}
    assert all(spec[name] is None for name in others)


@pytest.mark.parametrize(("window", "ms", "buckets"), [
    ("1m", 60_000, (5_000, 12)), ("60s", 60_000, (5_000, 12)), ("10s", 10_000, (1_000, 10)),
    ("1h", 3_600_000, (300_000, 12)), ("1d", 86_400_000, (7_200_000, 12)),
    ("30d", 30 * 86_400_000, (216_000_000, 12)), ("7s", 7_000, (700, 10)),
])
def test_rate_limit_windows(window: str, ms: int, buckets: tuple[int, int]) -> None:
    spec = rate_limit_spec(validate_document(doc("RateLimit", {
        "per": "key", "window": window, "requests": 5, "tokens": 100})))
    assert (spec.window_ms, spec.requests_per_minute, spec.tokens_per_minute) == (ms, 5, 100)
    assert window_buckets(ms) == buckets
    # the 60 s window keeps its per-minute names; "60s" is that window too
    minute = validate_document(doc("RateLimit", {"per": "key", "window": "60s",
                                                 "requestsPerMinute": 3}))
    assert rate_limit_spec(minute).requests_per_minute == 3


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://h", "http:// or https://"), ("http://", "with a host"),
    ("https://u:p@h.example", "user"), ("http://h:1/v1?x=1", "query"),
    ("http://h:99999", "http:// or https://"), ("h.example:8000", "http:// or https://"),
])
def test_credential_base_url_is_refused_when_not_a_plain_url(url: str, problem: str) -> None:
    with pytest.raises(ResourceError, match=r"credentials\[0\]\.baseUrl.*" + re.escape(problem)):
        validate_document(doc("Upstream", {"provider": "openai-compatible", "cluster": "openai",
                                           "credentials": [{"name": "a", "secretRef": "K",
                                                            "baseUrl": url}]}))


def test_an_upstream_may_not_name_a_forward_proxy_cluster() -> None:
    with pytest.raises(ResourceError, match=r"spec\.cluster.*forward proxy"):
        validate_document(doc("Upstream", {"provider": "openai", "cluster": "tollgate_dfp_http"}))


def test_credential_base_url_is_kept() -> None:
    spec = upstream_spec(validate_document(doc("Upstream", {
        "provider": "openai", "cluster": "openai",
        "credentials": [{"name": "a", "secretRef": "K", "baseUrl": "http://127.0.0.1:9/v1"}]})))
    assert spec.credentials[0].base_url == "http://127.0.0.1:9/v1"


LIMIT_WHERE = "document (Limit/r1)"
RATE_WHERE = "document (RateLimit/r1)"


@pytest.mark.parametrize(
    ("kind", "spec", "field", "message"),
    [
        # Limit: type and max are required
        ("Limit", {"max": 1}, "spec.type", "is required"),
        ("Limit", {"type": "Block"}, "spec.max", "is required"),
        ("Limit", _with(LIMIT, type="Deny"), "spec.type", "must be Block or Allow"),
        ("Limit", _with(LIMIT, type="block"), "spec.type", "must be Block or Allow"),
        ("Limit", _with(LIMIT, type=1), "spec.type", "must be a string"),
        ("Limit", _with(LIMIT, max=-1), "spec.max", "must be a number >= 0"),
        ("Limit", _with(LIMIT, max=-0.01), "spec.max", "must be a number >= 0"),
        ("Limit", _with(LIMIT, max="100"), "spec.max", "must be a number >= 0"),
        ("Limit", _with(LIMIT, max=True), "spec.max", "must be a number >= 0"),
        ("Limit", _with(LIMIT, threshold=0), "spec.threshold", "in (0, 1]"),
        ("Limit", _with(LIMIT, threshold=0.0), "spec.threshold", "in (0, 1]"),
        ("Limit", _with(LIMIT, threshold=1.5), "spec.threshold", "in (0, 1]"),
        ("Limit", _with(LIMIT, threshold=-0.5), "spec.threshold", "must be a number >= 0"),
        ("Limit", _with(LIMIT, threshold="0.8"), "spec.threshold", "must be a number >= 0"),
        ("Limit", _with(LIMIT, period="year"), "spec.period",
         "must be one of none, hour, day, week, month"),
        ("Limit", _with(LIMIT, period="monthly"), "spec.period", "must be one of"),
        ("Limit", _with(LIMIT, timeZone="Mars/Olympus"), "spec.timeZone",
         "unknown time zone 'Mars/Olympus'"),
        ("Limit", _with(LIMIT, timeZone=""), "spec.timeZone", "unknown time zone"),
        ("Limit", _with(LIMIT, timeZone="../etc/passwd"), "spec.timeZone", "unknown time zone"),
        ("Limit", _with(LIMIT, enforcement="lazy"), "spec.enforcement",
         "must be strict or reactive"),
        ("Limit", _with(LIMIT, failOpen="yes"), "spec.failOpen", "true or false"),
        ("Limit", _with(LIMIT, selector={"key": ["a"]}), "spec.selector.key", "unknown field"),
        ("Limit", _with(LIMIT, selector={"keys": ["a"], "ips": []}), "spec.selector.ips",
         "unknown field"),
        ("Limit", _with(LIMIT, selector={"keys": "a"}), "spec.selector.keys",
         "must be a list of strings"),
        ("Limit", _with(LIMIT, selector=["a"]), "spec.selector", "must be a mapping"),
        ("Limit", _with(LIMIT, per="key"), "spec.per", "unknown field"),
        # RateLimit
        ("RateLimit", {"per": "key"}, "spec.requests",
         "set at least one of requests, tokens (per window), concurrent"),
        ("RateLimit", {"per": "key", "selector": {"keys": ["a"]}}, "spec.requests",
         "set at least one of"),
        ("RateLimit", _with(RATE, window="1w"), "spec.window", "must be a duration"),
        ("RateLimit", _with(RATE, window="31d"), "spec.window", "1s to 30d"),
        ("RateLimit", _with(RATE, window="0s"), "spec.window", "must be a duration"),
        ("RateLimit", _with(RATE, window=60), "spec.window", "must be a string"),
        ("RateLimit", _with(RATE, window="1h"), "spec.requestsPerMinute",
         "counts per minute; with window 1h set requests"),
        ("RateLimit", _with(RATE, requests=5), "spec.requestsPerMinute",
         "set requests or requestsPerMinute, not both"),
        ("RateLimit", {"requestsPerMinute": 1}, "spec.per", "is required"),
        ("RateLimit", _with(RATE, per="tenant"), "spec.per",
         "must be one of key, user, group, model, ip, global"),
        ("RateLimit", _with(RATE, per="Key"), "spec.per", "must be one of"),
        ("RateLimit", _with(RATE, requestsPerMinute=0), "spec.requestsPerMinute",
         "must be an integer >= 1"),
        ("RateLimit", _with(RATE, tokensPerMinute=0), "spec.tokensPerMinute",
         "must be an integer >= 1"),
        ("RateLimit", _with(RATE, concurrent=0), "spec.concurrent", "must be an integer >= 1"),
        ("RateLimit", _with(RATE, concurrent=-3), "spec.concurrent", "must be an integer >= 1"),
        ("RateLimit", _with(RATE, concurrent=2.5), "spec.concurrent", "must be an integer >= 1"),
        ("RateLimit", _with(RATE, requestsPerMinute="60"), "spec.requestsPerMinute",
         "must be an integer >= 1"),
        ("RateLimit", _with(RATE, requestsPerMinute=True), "spec.requestsPerMinute",
         "must be an integer >= 1"),
        ("RateLimit", _with(RATE, selector={"model": ["m"]}), "spec.selector.model",
         "unknown field"),
        ("RateLimit", _with(RATE, rpm=60), "spec.rpm", "unknown field"),
    ],
)
def test_invalid_limits_name_the_field(
    kind: str, spec: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ResourceError) as caught:
        validate_document(doc(kind, spec))
    error = caught.value
    assert error.where == {"Limit": LIMIT_WHERE, "RateLimit": RATE_WHERE}[kind]
    assert error.field == field
    assert message in error.message
    assert str(error) == f"{error.where}: field '{field}': {error.message}"


@pytest.mark.parametrize(
    ("max_usd", "threshold", "max_nanos", "threshold_nanos"),
    [
        (100.00, 0.8, 100_000_000_000, 80_000_000_000),
        (100, None, 100_000_000_000, 100_000_000_000),  # no threshold: the whole of max
        (100, 1, 100_000_000_000, 100_000_000_000),
        (0.1, 0.7, 100_000_000, 70_000_000),  # no float error: 0.1 * 0.7 is 0.06999... in binary
        (1, 0.3333333, 1_000_000_000, 333_333_300),
        (1, 0.3333333333, 1_000_000_000, 333_333_333),  # rounded down to the nano-dollar
        (0.000000001, 0.5, 1, 0),
        (0, 0.8, 0, 0),
        (12.345678901, 0.9, 12_345_678_901, 11_111_111_010),  # floor(11_111_111_010.9)
    ],
)
def test_limit_spec_threshold_nanos(
    max_usd: float, threshold: float | None, max_nanos: int, threshold_nanos: int
) -> None:
    spec: dict[str, Any] = {"type": "Block", "max": max_usd}
    if threshold is not None:
        spec["threshold"] = threshold
    limit = limit_spec(validate_document(doc("Limit", spec)))
    assert (limit.max_nanos, limit.threshold_nanos) == (max_nanos, threshold_nanos)


def test_limit_spec_maps_fields() -> None:
    resource = validate_document(doc("Limit", {
        "type": "Block", "max": 100.00, "threshold": 0.8, "period": "month", "timeZone": "UTC",
        "selector": {"keys": ["team-a-ci"], "groups": [], "users": [], "tags": [], "models": []},
    }, name="team-a-monthly"))
    assert limit_spec(resource) == LimitSpec(
        name="team-a-monthly", block=True, max_nanos=100_000_000_000,
        threshold_nanos=80_000_000_000,
        period="month", time_zone="UTC", strict=True, fail_open=False,
        selector=Selector(keys=("team-a-ci",), namespaces=("default",)),
    )
    allow = limit_spec(validate_document(doc("Limit", {
        "type": "Allow", "max": 5, "period": "day", "timeZone": "Asia/Tokyo",
        "enforcement": "reactive", "failOpen": True,
        "selector": {"groups": ["g"], "users": ["u"], "tags": ["t"], "models": ["m*"]},
    })))
    assert allow == LimitSpec(
        name="r1", block=False, max_nanos=5_000_000_000, threshold_nanos=5_000_000_000,
        period="day", time_zone="Asia/Tokyo", strict=False, fail_open=True,
        selector=Selector(groups=("g",), users=("u",), tags=("t",), models=("m*",),
                          namespaces=("default",)),
    )


def test_rate_limit_spec_maps_fields() -> None:
    resource = validate_document(doc("RateLimit", {
        "per": "key", "selector": {"keys": ["team-a-ci"]},
        "requestsPerMinute": 600, "tokensPerMinute": 200_000, "concurrent": 20,
    }, name="per-key"))
    assert rate_limit_spec(resource) == RateLimitSpec(
        name="per-key", per="key",
        selector=Selector(keys=("team-a-ci",), namespaces=("default",)),
        requests_per_minute=600, tokens_per_minute=200_000, concurrent=20,
    )
    only_tokens = rate_limit_spec(validate_document(doc("RateLimit", {
        "per": "model", "tokensPerMinute": 1000,
    })))
    assert only_tokens == RateLimitSpec(
        name="r1", per="model", selector=Selector(namespaces=("default",)),
        requests_per_minute=None,
        tokens_per_minute=1000, concurrent=None,
    )


def test_key_record_allow_request_limits() -> None:
    default = key_record(validate_document(doc("VirtualKey", {"keySha256": SHA})))
    assert default.allow_request_limits is False
    allowed = key_record(validate_document(doc("VirtualKey", {
        "keySha256": SHA, "allowRequestLimits": True,
    })))
    assert allowed.allow_request_limits is True
    with pytest.raises(ResourceError, match=r"spec\.allowRequestLimits"):
        validate_document(doc("VirtualKey", {"keySha256": SHA, "allowRequestLimits": "yes"}))


# ---- validate_documents ----------------------------------------------------------------------

STREAM = f"""
---
apiVersion: {API}
kind: VirtualKey
metadata: {{name: ok}}
spec:
  keySha256: {SHA}
  expiresAt: 2026-01-01T00:00:00Z
---
---
apiVersion: {API}
kind: Upstream
metadata: {{name: up}}
spec: {{provider: openai, cluster: openai}}
"""


def test_validate_documents_skips_empty_documents() -> None:
    resources = validate_documents(yaml.safe_load_all(STREAM), "keys.yaml")
    assert [(r.kind, r.name) for r in resources] == [("VirtualKey", "ok"), ("Upstream", "up")]
    # an unquoted YAML timestamp arrives as a datetime and is normalised like a string
    assert resources[0].spec["expiresAt"] == "2026-01-01T00:00:00Z"


def test_validate_documents_names_the_document_number() -> None:
    bad = STREAM + f"""---
apiVersion: {API}
kind: VirtualKey
metadata: {{name: broken}}
spec: {{keySha256: nope}}
"""
    # the empty document between the others still counts: the broken one is the 4th
    with pytest.raises(ResourceError) as caught:
        validate_documents(yaml.safe_load_all(bad), "keys.yaml")
    assert str(caught.value).startswith("keys.yaml: document 4 (VirtualKey/broken): ")
    assert "'spec.keySha256'" in str(caught.value)


def test_validate_documents_default_source_and_top_level_error() -> None:
    with pytest.raises(ResourceError) as caught:
        validate_documents([None, doc("VirtualKey", KEY), {"kind": "VirtualKey"}])
    assert str(caught.value) == "input: document 3: field 'apiVersion': is required"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # the scripts compare amounts exactly up to 2**53 nano-dollars (~$9,007,199)
        ({"type": "Block", "max": 10_000_000}, "must be at most 9007199 USD"),
        ({"type": "Block", "max": float("inf")}, "must be a number >= 0"),
        ({"type": "Block", "max": float("nan")}, "must be a number >= 0"),
    ],
)
def test_limit_max_is_a_finite_amount_the_scripts_hold_exactly(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ResourceError, match=message):
        validate_document(doc("Limit", spec))


def test_price_infinity_is_refused() -> None:
    with pytest.raises(ResourceError, match="must be a number >= 0"):
        validate_document(doc("PriceTable", {"models": {"m": {"input": float("inf"),
                                                              "output": 1}}}))


def test_largest_limit_max_is_accepted() -> None:
    limit = limit_spec(validate_document(doc("Limit", {"type": "Block", "max": 9_007_199})))
    assert limit.max_nanos == 9_007_199_000_000_000
