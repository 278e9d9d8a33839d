"""deploy/k8s stays in step with the code.

The CRDs must describe exactly what `extproc.core.resources.validate_document` accepts and emits
(fields, types, enums, required fields, defaults), the example resources must be accepted by
`tollgate apply -f`. (The rendered kustomize tree, the sidecar overlay's ports and probes are
checked in tests/k8s/.)

Field sets are derived by running `validate_document` on small documents, never written down
here, so neither the CRDs nor this test can drift from the code unnoticed. The CRD schemas are
checked with a small validator covering the OpenAPI subset the CRDs use (no cluster is needed).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.core.keys import hash_key
from extproc.core.periods import PERIODS
from extproc.core.resources import (
    API_VERSION,
    DEFAULT_COOLDOWN_STATUSES,
    GROUP,
    KINDS,
    PLURALS,
    PROVIDERS,
    RATE_SCOPES,
    ResourceError,
    validate_document,
    validate_documents,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS_YAML = K8S / "crds.yaml"
EXAMPLES_YAML = K8S / "examples" / "resources.yaml"
BUILTIN_YAML = ROOT / "extproc" / "data" / "builtin.yaml"
# Kubernetes objects only: not kustomization files, not the generated Envoy bootstraps.
YAML_FILES = sorted(
    path
    for path in {*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")}
    if path.name != "kustomization.yaml" and path.parent.name != "envoy"
)

# The smallest spec of each kind the code accepts: its required fields (for RateLimit, plus one
# of the rates, which the CRD requires with `anyOf`).
MINIMAL: dict[str, dict[str, Any]] = {
    "VirtualKey": {"keySha256": "0" * 64},
    "PriceTable": {"models": {}},
    "Upstream": {"provider": "openai", "cluster": "openai"},
    "Limit": {"type": "Block", "max": 10},
    "RateLimit": {"per": "key", "requestsPerMinute": 60},
    "Policy": {},
}
# Fields of which at least one must be set (the CRD's `anyOf` of `required` lists).
ONE_OF: dict[str, tuple[str, ...]] = {
    "RateLimit": ("requests", "tokens", "requestsPerMinute", "tokensPerMinute", "concurrent"),
}
# The fields every spec must have: MINIMAL without the `anyOf` ones.
REQUIRED: dict[str, set[str]] = {
    kind: set(spec) - set(ONE_OF.get(kind, ())) for kind, spec in MINIMAL.items()
}
SELECTOR = {"keys": ["k"], "groups": ["g"], "users": ["u"], "tags": ["t"], "models": ["gpt-*"],
            "namespaces": ["team-a"]}

# Every optional field set, so that nested objects (price entries, azure, credentials) show up in
# the normalised spec with all their fields.
FULL: dict[str, dict[str, Any]] = {
    "VirtualKey": {
        "keySha256": "ab" * 32,
        "group": "g",
        "user": "u",
        "models": ["gpt-*"],
        "tags": ["t"],
        "expiresAt": "2030-01-01T00:00:00Z",
        "revoked": True,
        "description": "d",
        "allowRequestLimits": True,
        "secretName": "app-key",
    },
    "PriceTable": {
        "currency": "USD",
        "models": {
            "m": {"input": 1, "output": 2.5, "cachedInput": 0.1, "cacheWrite": 1.25,
                  "cacheWrite1h": 2, "reasoning": 3, "maxOutputTokens": 1000,
                  "contextWindow": 4000, "imageTokens": 100,
                  "longContext": {"above": 2000, "input": 2, "output": 5, "cachedInput": 0.2,
                                  "cacheWrite": 2.5}},
        },
    },
    "Upstream": {
        "provider": "azure-openai",
        "cluster": "azure-openai",
        "models": ["gpt-4o"],
        "priority": 5,
        "aliases": {"a": "b"},
        "azure": {"apiVersion": "2025-01-01", "deployments": {"gpt-4o": "dep"}},
        "anthropicVersion": "2023-06-01",
        "credentials": [
            {"name": "c1", "secretRef": "KEY_1", "rpm": 1, "tpm": 2, "isFallback": False},
            {"name": "c2", "secretRef": "KEY_2", "rpm": 0, "tpm": 0, "isFallback": True},
        ],
        "cooldown": {"seconds": 10, "maxSeconds": 300, "statuses": [429, 503]},
    },
    "Limit": {
        "type": "Allow",
        "max": 12.5,
        "threshold": 0.75,
        "period": "week",
        "timeZone": "Europe/Berlin",
        "enforcement": "reactive",
        "failOpen": True,
        "selector": SELECTOR,
    },
    "RateLimit": {
        "per": "group",
        "selector": SELECTOR,
        "requestsPerMinute": 600,
        "tokensPerMinute": 200_000,
        "concurrent": 20,
    },
    "Policy": {
        "selector": SELECTOR,
        "wordLists": [
            {"name": "no-swearing", "lists": ["profanity"], "words": ["darn it"],
             "action": "redact", "on": "response"},
        ],
        "redaction": "[x]",
        "requestRules": {"maxTokens": 1000, "maxPromptChars": 20000, "requireUser": True,
                         "disabledModels": ["gpt-3.5*"]},
        "autoReplies": [{"name": "hours", "phrases": ["opening hours"], "reply": "9 to 5"}],
        "reflection": {"action": "redact", "delimiter": "||", "minChars": 5},
        "forwardHeaders": {"allow": ["x-app-*"], "deny": ["cookie"]},
        "logBodies": True,
    },
}


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def document(kind: str, spec: Any, name: str = "r1") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def normalised(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return validate_document(document(kind, copy.deepcopy(spec))).spec


def without_nones(value: Any) -> Any:
    """The normalised spec as Kubernetes would store it: unset optional fields are absent."""
    if isinstance(value, dict):
        return {k: without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nones(v) for v in value]
    return value


# ---- a validator for the OpenAPI subset the CRDs use -----------------------------------------

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def crd_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """What the API server would reject (strict field validation, as kubectl applies it)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return []
    kind = schema["type"]
    if not _TYPES[kind](value):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if schema.get("format") == "date-time" and not _RFC3339.match(value):
        errors.append(f"{path}: {value!r} is not an RFC 3339 date-time")
    if "minimum" in schema:
        if schema.get("exclusiveMinimum") and value <= schema["minimum"]:
            errors.append(f"{path}: {value} <= {schema['minimum']}")
        elif value < schema["minimum"]:
            errors.append(f"{path}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} > {schema['maximum']}")
    if kind == "object" and path == ".metadata":
        return errors  # ObjectMeta: validated by the API server itself, not by the CRD schema
    if kind == "object":
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{path}.{name}: required")
        if "anyOf" in schema and not any(
            all(name in value for name in branch["required"]) for branch in schema["anyOf"]
        ):
            errors.append(f"{path}: none of {[b['required'] for b in schema['anyOf']]} is set")
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if props is not None and name in props:
                errors += crd_errors(props[name], item, f"{path}.{name}")
            elif isinstance(extra, dict):
                errors += crd_errors(extra, item, f"{path}.{name}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{name}: unknown field")
    if kind == "array":
        for i, item in enumerate(value):
            errors += crd_errors(schema["items"], item, f"{path}[{i}]")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [
                tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"])
                for item in value
                if isinstance(item, dict)
            ]
            if len(set(keys)) != len(keys):
                errors.append(f"{path}: duplicate list-map keys")
    return errors


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: absent fields get their `default`."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for name in list(value):
            if name in props:
                value[name] = apply_defaults(props[name], value[name])
            elif isinstance(extra, dict):
                value[name] = apply_defaults(extra, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        nodes += walk(schema["items"], f"{path}[]")
    return nodes


# ---- every file --------------------------------------------------------------------------------


def test_expected_files_exist() -> None:
    for path in (CRDS_YAML, EXAMPLES_YAML, K8S / "README.md"):
        assert path.is_file(), path


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} has no documents"
    for doc in docs:
        assert isinstance(doc, dict)
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc


# ---- CRDs --------------------------------------------------------------------------------------


def crds() -> dict[str, dict[str, Any]]:
    return {doc["spec"]["names"]["kind"]: doc for doc in load_all(CRDS_YAML)}


def crd_schema(kind: str) -> dict[str, Any]:
    (version,) = crds()[kind]["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def spec_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = crd_schema(kind)["properties"]["spec"]
    return schema


def test_one_crd_per_kind_and_nothing_else() -> None:
    docs = load_all(CRDS_YAML)
    assert all(d["apiVersion"] == "apiextensions.k8s.io/v1" for d in docs)
    assert all(d["kind"] == "CustomResourceDefinition" for d in docs)
    assert sorted(d["spec"]["names"]["kind"] for d in docs) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_crd_identity(kind: str) -> None:
    crd = crds()[kind]
    spec = crd["spec"]
    assert spec["group"] == GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == PLURALS[kind]
    assert spec["names"]["singular"] == kind.lower()
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{GROUP}"
    (version,) = spec["versions"]
    assert f"{GROUP}/{version['name']}" == API_VERSION
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", KINDS)
def test_crd_spec_fields_equal_normalised_spec(kind: str) -> None:
    assert set(spec_schema(kind)["properties"]) == set(normalised(kind, MINIMAL[kind]))
    assert set(spec_schema(kind)["properties"]) == set(normalised(kind, FULL[kind]))


def test_crd_nested_fields_equal_normalised_spec() -> None:
    for kind in ("Limit", "RateLimit", "Policy"):
        selector = spec_schema(kind)["properties"]["selector"]
        assert set(selector["properties"]) == set(normalised(kind, FULL[kind])["selector"])

    price = spec_schema("PriceTable")["properties"]["models"]["additionalProperties"]
    (entry,) = normalised("PriceTable", FULL["PriceTable"])["models"].values()
    assert set(price["properties"]) == set(entry)

    upstream = spec_schema("Upstream")["properties"]
    full = normalised("Upstream", FULL["Upstream"])
    assert set(upstream["azure"]["properties"]) == set(full["azure"])
    assert set(upstream["cooldown"]["properties"]) == set(full["cooldown"])
    for credential in full["credentials"]:
        assert set(upstream["credentials"]["items"]["properties"]) == set(credential)


# Required by the code but not by the CRD: the operator fills it in (the SHA-256 of the key it
# generates into a Secret) before validating.
FILLED_BY_OPERATOR: dict[str, set[str]] = {"VirtualKey": {"keySha256"}}


@pytest.mark.parametrize("kind", KINDS)
def test_crd_required_fields_equal_code(kind: str) -> None:
    filled = FILLED_BY_OPERATOR.get(kind, set())
    assert set(spec_schema(kind).get("required", ())) == REQUIRED[kind] - filled
    assert crd_schema(kind)["required"] == ["spec"]
    for field in REQUIRED[kind]:
        spec = {k: v for k, v in MINIMAL[kind].items() if k != field}
        with pytest.raises(ResourceError, match=field):
            normalised(kind, spec)


@pytest.mark.parametrize("kind", KINDS)
def test_crd_any_of_equals_code(kind: str) -> None:
    schema = spec_schema(kind)
    fields = ONE_OF.get(kind, ())
    assert [b["required"] for b in schema.get("anyOf", [])] == [[f] for f in fields]
    for branch in schema.get("anyOf", []):
        assert set(branch) == {"required"}  # structural: no types or defaults inside anyOf
    base = {k: v for k, v in MINIMAL[kind].items() if k not in fields}
    if fields:
        assert crd_errors(schema, base) != []
        with pytest.raises(ResourceError, match="set at least one of"):
            normalised(kind, base)
    for field in fields:
        spec = {**base, field: 1}
        assert crd_errors(schema, spec) == []
        normalised(kind, spec)


def test_crd_nested_required_fields_equal_code() -> None:
    price = spec_schema("PriceTable")["properties"]["models"]["additionalProperties"]
    assert set(price["required"]) == {"input", "output"}
    credential = spec_schema("Upstream")["properties"]["credentials"]["items"]
    assert set(credential["required"]) == {"name", "secretRef"}
    for field in price["required"]:
        entry = {"input": 1, "output": 1}
        del entry[field]
        with pytest.raises(ResourceError, match=field):
            normalised("PriceTable", {"models": {"m": entry}})
    for field in credential["required"]:
        cred = {"name": "c", "secretRef": "K"}
        del cred[field]
        with pytest.raises(ResourceError, match=field):
            normalised("Upstream", {**MINIMAL["Upstream"], "credentials": [cred]})


@pytest.mark.parametrize("kind", KINDS)
def test_crd_defaulting_equals_code_normalisation(kind: str) -> None:
    for spec in (MINIMAL[kind], FULL[kind]):
        defaulted = apply_defaults(spec_schema(kind), spec)
        assert defaulted == without_nones(normalised(kind, spec))


def test_crd_nested_defaults_equal_code() -> None:
    # `azure: {}`, `cooldown: {}` and a bare credential: the nested defaults must match as well.
    spec = {**MINIMAL["Upstream"], "azure": {}, "cooldown": {},
            "credentials": [{"name": "c", "secretRef": "K"}]}
    defaulted = apply_defaults(spec_schema("Upstream"), spec)
    assert defaulted == without_nones(normalised("Upstream", spec))
    # a partly set cooldown keeps the defaults of the fields left out
    partial: list[dict[str, Any]] = [
        {"seconds": 0}, {"maxSeconds": 60}, {"statuses": [429]}, {"statuses": []},
    ]
    for cooldown in partial:
        spec = {**MINIMAL["Upstream"], "cooldown": cooldown}
        defaulted = apply_defaults(spec_schema("Upstream"), spec)
        assert defaulted == without_nones(normalised("Upstream", spec)), cooldown


def test_crd_cooldown_equals_code() -> None:
    cooldown = spec_schema("Upstream")["properties"]["cooldown"]
    props = cooldown["properties"]
    assert cooldown["type"] == "object" and cooldown["default"] == {}
    defaults = normalised("Upstream", MINIMAL["Upstream"])["cooldown"]
    assert {name: sub["default"] for name, sub in props.items()} == defaults
    assert props["statuses"]["default"] == list(DEFAULT_COOLDOWN_STATUSES)
    for name in ("seconds", "maxSeconds"):
        assert (props[name]["type"], props[name]["minimum"]) == ("integer", 0)
        assert "maximum" not in props[name]
    assert props["statuses"]["type"] == "array"
    assert props["statuses"]["items"] == {"type": "integer", "minimum": 400, "maximum": 599}
    # the bounds of a status code, at and just past each edge
    for status, valid in ((399, False), (400, True), (599, True), (600, False)):
        spec = {**MINIMAL["Upstream"], "cooldown": {"statuses": [status]}}
        assert (crd_errors(spec_schema("Upstream"), spec) == []) is valid, status
        if valid:
            normalised("Upstream", spec)
        else:
            with pytest.raises(ResourceError, match=r"spec\.cooldown\.statuses"):
                normalised("Upstream", spec)


def test_crd_provider_enum_is_providers() -> None:
    assert tuple(spec_schema("Upstream")["properties"]["provider"]["enum"]) == PROVIDERS


@pytest.mark.parametrize(
    ("kind", "field", "values"),
    [
        ("Upstream", "provider", PROVIDERS),
        ("Limit", "type", ("Block", "Allow")),
        ("Limit", "period", PERIODS),
        ("Limit", "enforcement", ("strict", "reactive")),
        ("RateLimit", "per", RATE_SCOPES),
    ],
)
def test_crd_enums_equal_code(kind: str, field: str, values: tuple[str, ...]) -> None:
    assert tuple(spec_schema(kind)["properties"][field]["enum"]) == values
    for value in values:
        normalised(kind, {**MINIMAL[kind], field: value})
    with pytest.raises(ResourceError, match=field):
        normalised(kind, {**MINIMAL[kind], field: "nope"})


@pytest.mark.parametrize("kind", ["Limit", "RateLimit", "Policy"])
def test_crd_selector_equals_code(kind: str) -> None:
    selector = spec_schema(kind)["properties"]["selector"]
    assert set(selector["properties"]) == set(normalised(kind, MINIMAL[kind])["selector"])
    # partial selectors default like the code
    spec = {**MINIMAL[kind], "selector": {"keys": ["a"]}}
    assert apply_defaults(spec_schema(kind), spec) == without_nones(normalised(kind, spec))


@pytest.mark.parametrize("kind", KINDS)
def test_crd_schema_is_structural(kind: str) -> None:
    for path, node in walk(crd_schema(kind)):
        assert "type" in node, f"{kind}{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{kind}{path}"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            # Only the status, which the operator will own, is a free-form map.
            assert path == ".status", f"{kind}{path}: preserve-unknown-fields"
        if "default" in node:
            assert crd_errors(node, node["default"]) == [], f"{kind}{path}: invalid default"


@pytest.mark.parametrize("kind", KINDS)
def test_crd_printer_columns_point_at_fields(kind: str) -> None:
    (version,) = crds()[kind]["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert columns
    props = spec_schema(kind)["properties"]
    for column in columns:
        path = column["jsonPath"]
        assert path == ".metadata.creationTimestamp" or (
            path.startswith(".spec.") and path.removeprefix(".spec.") in props
        ) or path.removeprefix(".status.") in operator_status_fields(kind), path


def operator_status_fields(kind: str) -> set[str]:
    """The `status` fields the operator writes for a kind (see extproc/operator/handlers.py)."""
    from extproc.core.reports import limit_report
    from extproc.core.resources import limit_spec

    if kind == "Limit":
        report = limit_report(limit_spec(validate_document(document(kind, MINIMAL[kind]))),
                              "none", {})
        return set(report.status()) | {"lastSynced", "conditions", "id"}
    return {
        "VirtualKey": {"state", "expiresAt", "secretName"},
        "RateLimit": {"identities", "busiest", "window", "requestsInWindow", "tokensInWindow",
                      "requestsLastMinute", "tokensLastMinute", "inFlight"},
        "Policy": {"blocked", "redacted", "audited", "rules"},
    }.get(kind, set()) | {"lastSynced", "conditions", "id"}


def test_limit_printer_columns_show_live_spend() -> None:
    (version,) = crds()["Limit"]["spec"]["versions"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Spent"] == ".status.spent"
    assert columns["Remaining"] == ".status.remaining"
    assert columns["State"] == ".status.state"
    status = crd_schema("Limit")["properties"]["status"]["properties"]
    assert set(status) == operator_status_fields("Limit")
    assert tuple(status["state"]["enum"]) == ("ok", "exceeded", "overrun", "blocked")


def test_crds_name_no_machine_paths() -> None:
    assert "/work/" not in CRDS_YAML.read_text()


# Each spec is accepted (or rejected) by both the code and the CRD.
AGREE: list[tuple[str, dict[str, Any], bool]] = [
    ("VirtualKey", {"keySha256": "AB" * 32}, True),
    ("VirtualKey", {"keySha256": "0" * 64, "expiresAt": "2030-01-01T00:00:00+02:00"}, True),
    ("VirtualKey", {"keySha256": "abc"}, False),
    ("VirtualKey", {"keySha256": "0" * 64, "revoked": "yes"}, False),
    ("VirtualKey", {"keySha256": "0" * 64, "models": "gpt-4o"}, False),
    ("VirtualKey", {"keySha256": "0" * 64, "modles": ["gpt-4o"]}, False),
    ("VirtualKey", {"keySha256": "0" * 64, "expiresAt": "next tuesday"}, False),
    ("PriceTable", {"models": {"m": {"input": 1, "output": 0}}}, True),
    ("PriceTable", {"currency": "EUR", "models": {}}, False),
    ("PriceTable", {"models": {"m": {"input": 1}}}, False),
    ("PriceTable", {"models": {"m": {"input": -1, "output": 1}}}, False),
    ("PriceTable", {"models": {"m": {"input": "1", "output": 1}}}, False),
    ("PriceTable", {"models": {"m": {"input": 1, "output": 1, "cached": 1}}}, False),
    ("PriceTable", {"models": {"m": 1.5}}, False),
    ("Upstream", {"provider": "openai-compatible", "cluster": "x", "priority": 0}, True),
    ("Upstream", {"provider": "bedrock", "cluster": "x"}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "priority": -1}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "priority": "high"}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "aliases": {"a": 1}}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "azure": {"version": "1"}}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "azure": {"deployments": {"m": 1}}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x",
                  "credentials": [{"name": "c", "secretRef": "has space"}]}, False),
    ("Upstream", {"provider": "openai", "cluster": "x",
                  "credentials": [{"name": "c", "secretRef": "K", "rpm": -1}]}, False),
    ("Upstream", {"provider": "openai", "cluster": "x",
                  "credentials": [{"name": "c", "secretRef": "A"},
                                  {"name": "c", "secretRef": "B"}]}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {}}, True),
    ("Upstream", {"provider": "openai", "cluster": "x",
                  "cooldown": {"seconds": 0, "maxSeconds": 0, "statuses": []}}, True),
    ("Upstream", {"provider": "openai", "cluster": "x",
                  "cooldown": {"seconds": 5, "maxSeconds": 3600, "statuses": [400, 429, 599]}},
     True),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"statuses": [200]}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"statuses": [600]}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"statuses": "429"}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"statuses": [True]}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"statuses": ["429"]}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"statuses": [429.5]}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"seconds": -1}}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"seconds": 1.5}}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"maxSeconds": -1}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"maxSeconds": "600"}},
     False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": {"max": 60}}, False),
    ("Upstream", {"provider": "openai", "cluster": "x", "cooldown": 30}, False),
    ("VirtualKey", {"keySha256": "0" * 64, "allowRequestLimits": True}, True),
    ("VirtualKey", {"keySha256": "0" * 64, "allowRequestLimits": "yes"}, False),
    ("Limit", {"type": "Allow", "max": 0}, True),
    ("Limit", {"type": "Block", "max": 100.0, "threshold": 1}, True),
    ("Limit", {"type": "Block", "max": 1, "threshold": 0.001, "period": "hour",
               "timeZone": "America/New_York", "enforcement": "reactive", "failOpen": True,
               "selector": {"groups": ["g"], "models": ["gpt-*"]}}, True),
    ("Limit", {"max": 1}, False),
    ("Limit", {"type": "Block"}, False),
    ("Limit", {"type": "block", "max": 1}, False),
    ("Limit", {"type": "Block", "max": -1}, False),
    ("Limit", {"type": "Block", "max": "100"}, False),
    ("Limit", {"type": "Block", "max": 1, "threshold": 0}, False),
    ("Limit", {"type": "Block", "max": 1, "threshold": 1.5}, False),
    ("Limit", {"type": "Block", "max": 1, "threshold": -0.5}, False),
    ("Limit", {"type": "Block", "max": 1, "period": "year"}, False),
    ("Limit", {"type": "Block", "max": 1, "enforcement": "lazy"}, False),
    ("Limit", {"type": "Block", "max": 1, "failOpen": "no"}, False),
    ("Limit", {"type": "Block", "max": 1, "selector": {"key": ["a"]}}, False),
    ("Limit", {"type": "Block", "max": 1, "selector": {"keys": "a"}}, False),
    ("Limit", {"type": "Block", "max": 1, "selector": ["a"]}, False),
    ("Limit", {"type": "Block", "max": 1, "maximum": 2}, False),
    ("RateLimit", {"per": "global", "concurrent": 1}, True),
    ("RateLimit", {"per": "ip", "tokensPerMinute": 1000, "selector": {"tags": ["t"]}}, True),
    ("RateLimit", {"per": "key"}, False),
    ("Policy", {"wordLists": [{"name": "j", "lists": ["jailbreak"], "action": "block"}]}, True),
    ("Policy", {"wordLists": [{"name": "w", "words": ["x"], "action": "audit", "on": "request"}],
                "requestRules": {"requireUser": True}}, True),
    ("Policy", {"wordLists": [{"lists": ["jailbreak"], "action": "block"}]}, False),
    ("Policy", {"wordLists": [{"name": "s", "lists": ["slurs"], "action": "block"}]}, False),
    ("Policy", {"wordLists": [{"name": "w", "words": ["x"], "action": "drop"}]}, False),
    ("Policy", {"wordLists": [{"name": "w", "words": ["x"]}]}, False),
    ("Policy", {"wordLists": [{"name": "w", "words": ["x"], "action": "audit",
                               "on": "replies"}]}, False),
    ("Policy", {"requestRules": {"maxTokens": 0}}, False),
    ("Policy", {"requestRules": {"maxTokens": 10, "maxWords": 3}}, False),
    ("Policy", {"redaction": 5}, False),
    ("Policy", {"autoReplies": [{"name": "a", "phrases": ["hi"], "reply": "hello"}]}, True),
    ("Policy", {"autoReplies": [{"name": "a", "phrases": ["hi"]}]}, False),
    ("Policy", {"reflection": {"action": "block"}}, True),
    ("Policy", {"reflection": {"action": "echo"}}, False),
    ("Policy", {"reflection": {"action": "audit", "minChars": 0}}, False),
    ("Policy", {"autoReplies": [{"phrases": ["hi"], "reply": "x"}]}, False),
    ("RateLimit", {"requestsPerMinute": 1}, False),
    ("RateLimit", {"per": "tenant", "requestsPerMinute": 1}, False),
    ("RateLimit", {"per": "key", "requestsPerMinute": 0}, False),
    ("RateLimit", {"per": "key", "tokensPerMinute": -5}, False),
    ("RateLimit", {"per": "key", "concurrent": 1.5}, False),
    ("RateLimit", {"per": "key", "concurrent": True}, False),
    ("RateLimit", {"per": "key", "rpm": 60}, False),
    ("RateLimit", {"per": "key", "window": "1h", "requests": 1000}, True),
    ("RateLimit", {"per": "key", "window": "10s", "tokens": 5}, True),
    ("RateLimit", {"per": "key", "window": "1w", "requests": 5}, False),
    ("RateLimit", {"per": "key", "window": "0s", "requests": 5}, False),
    ("RateLimit", {"per": "key", "window": 60, "requests": 5}, False),
]


@pytest.mark.parametrize(("kind", "spec", "valid"), AGREE)
def test_crd_and_code_agree(kind: str, spec: dict[str, Any], valid: bool) -> None:
    doc = document(kind, spec)
    crd_valid = crd_errors(crd_schema(kind), doc) == []
    try:
        validate_document(copy.deepcopy(doc))
        code_valid = True
    except ResourceError:
        code_valid = False
    assert (code_valid, crd_valid) == (valid, valid)


# ---- example resources -------------------------------------------------------------------------


def test_examples_are_accepted_by_tollgate_apply() -> None:
    docs = load_all(EXAMPLES_YAML)
    resources = validate_documents(docs, str(EXAMPLES_YAML))
    assert len(resources) == len(docs)
    assert len({(r.kind, r.name) for r in resources}) == len(resources)
    assert {r.kind for r in resources} == set(KINDS)


def test_examples_are_accepted_by_the_crds_and_default_like_the_code() -> None:
    for doc in load_all(EXAMPLES_YAML):
        schema = crd_schema(doc["kind"])
        assert crd_errors(schema, doc) == [], doc["metadata"]["name"]
        resource = validate_document(copy.deepcopy(doc))
        defaulted = apply_defaults(schema["properties"]["spec"], doc["spec"])
        assert defaulted == without_nones(resource.spec), resource.name


def test_example_contents() -> None:
    resources = validate_documents(load_all(EXAMPLES_YAML))
    (key,) = [r for r in resources if r.kind == "VirtualKey"]
    assert key.spec["keySha256"] == hash_key("example-key")
    upstreams = {r.spec["provider"]: r.spec for r in resources if r.kind == "Upstream"}
    azure = upstreams["azure-openai"]["azure"]
    assert azure["deployments"] and azure["apiVersion"]
    credentials = upstreams["openai-compatible"]["credentials"]
    assert len(credentials) == 2
    assert [c["isFallback"] for c in credentials].count(True) == 1
    # the local model is kept for the example key's group
    assert upstreams["openai-compatible"]["allowedGroups"] == [key.spec["group"]]
    # the Limit and the RateLimit select the example key by name
    (limit,) = [r for r in resources if r.kind == "Limit"]
    (rate,) = [r for r in resources if r.kind == "RateLimit"]
    assert limit.spec["selector"]["keys"] == rate.spec["selector"]["keys"] == [key.name]
    assert (limit.spec["type"], limit.spec["period"], limit.spec["max"]) == ("Block", "month", 100)
    assert rate.spec["per"] == "key"


def test_operator_rbac_covers_every_kind_and_its_status() -> None:
    """The operator watches every kind (extproc/operator/app.py); without the RBAC rule a real
    API server refuses the watch."""
    docs = load_all(K8S / "operator" / "rbac.yaml")
    granted = {resource for doc in docs if doc.get("kind") == "ClusterRole"
               for rule in doc["rules"] if GROUP in rule.get("apiGroups", ())
               for resource in rule["resources"]}
    for kind in KINDS:
        assert PLURALS[kind] in granted, kind
        assert f"{PLURALS[kind]}/status" in granted, kind
