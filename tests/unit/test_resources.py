"""The resource schema: valid documents normalise with defaults, invalid ones say where and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from extproc.core.pricing import ModelPrice
from extproc.core.resources import (
    Resource,
    ResourceError,
    key_record,
    model_prices,
    upstream_spec,
    validate_document,
    validate_documents,
)

pytestmark = pytest.mark.unit

API = "tollgate.io/v1alpha1"
SHA = "ab" * 32


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
                "description": "CI key",
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
                "aliases": {}, "azure": None, "anthropicVersion": "2023-06-01",
                "credentials": [],
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
                "anthropicVersion": "2023-06-01",
                "credentials": [
                    {"name": "a", "secretRef": "AZURE_KEY", "rpm": None, "tpm": None,
                     "isFallback": False},
                    {"name": "b", "secretRef": "AZURE_KEY_2", "rpm": 60, "tpm": 0,
                     "isFallback": True},
                ],
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
    # $2.50, $10, $1.25 per 1M -> micro-dollars per 1M
    assert model_prices(table) == {
        "m": ModelPrice(input=2_500_000, output=10_000_000, cached_input=1_250_000)
    }
    upstream = upstream_spec(validate_document(doc("Upstream", {
        "provider": "anthropic", "cluster": "anthropic",
        "credentials": [{"name": "d", "secretRef": "ANTHROPIC_API_KEY"}],
    })))
    assert (upstream.provider, upstream.models, upstream.priority) == ("anthropic", ("*",), 100)
    assert upstream.anthropic_version == "2023-06-01"
    assert [c.secret_ref for c in upstream.credentials] == ["ANTHROPIC_API_KEY"]


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
        # keySha256
        (doc("VirtualKey", {}), "document (VirtualKey/r1)", "spec.keySha256", "is required"),
        (doc("VirtualKey", {"keySha256": "abc"}), "document (VirtualKey/r1)", "spec.keySha256",
         "64 hex digits"),
        (doc("VirtualKey", {"keySha256": "g" * 64}), "document (VirtualKey/r1)",
         "spec.keySha256", "64 hex digits"),
        (doc("VirtualKey", {"keySha256": SHA + "a"}), "document (VirtualKey/r1)",
         "spec.keySha256", "64 hex digits"),
        # provider, cluster, credentials
        (doc("Upstream", _with(UP, provider="gemini")), "document (Upstream/r1)",
         "spec.provider", "must be one of openai, azure-openai, anthropic, openai-compatible"),
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
