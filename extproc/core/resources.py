"""The resource schema: one definition for `tollgate apply` and the Kubernetes custom resources.

Every document is `{apiVersion: tollgate.io/v1alpha1, kind, metadata: {name}, spec}`.
`validate_document` checks a parsed document strictly (unknown fields are errors, so a typo never
silently does nothing) and returns a `Resource` whose `spec` is normalised: defaults filled in,
plain JSON types only. That normalised spec is what gets stored in Redis; the typed views below
(`KeyRecord`, `UpstreamSpec`, price maps) are built from it when a snapshot is loaded.
Errors name the document, the resource and the field path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from extproc.core.periods import PERIODS
from extproc.core.pricing import (
    MAX_AMOUNT_NANOS,
    ModelPrice,
    rate_from_usd_per_mtok,
    usd_to_nanos,
)
from extproc.core.quota import LimitSpec, RateLimitSpec, Selector

API_VERSION = "tollgate.io/v1alpha1"
GROUP = "tollgate.io"
PROVIDERS = ("openai", "azure-openai", "anthropic", "openai-compatible")
# A credential answering one of these is put in cooldown (rate limited, refused, or failing).
DEFAULT_COOLDOWN_STATUSES = (401, 403, 429, 500, 502, 503, 504)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class ResourceError(ValueError):
    """A document that cannot be applied. `str()` names the document, resource and field."""

    def __init__(self, where: str, field: str, message: str) -> None:
        self.where = where
        self.field = field
        self.message = message
        super().__init__(f"{where}: field '{field}': {message}" if field else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    name: str
    spec: dict[str, Any]

    def document(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": {"name": self.name},
            "spec": self.spec,
        }


class _Fields:
    """Reads one mapping field by field and reports what was not read as unknown."""

    def __init__(self, where: str, path: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ResourceError(where, path, "must be a mapping")
        self.where, self.path, self.value = where, path, value
        self.seen: set[str] = set()

    def _field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ResourceError:
        return ResourceError(self.where, self._field(name), message)

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.value.get(name)

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.get(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return default if default is not None else ""
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {type(value).__name__}")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def integer(self, name: str, default: int | None = None, minimum: int = 0) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, f"must be an integer >= {minimum}")
        return value

    def number(self, name: str, *, required: bool = False) -> float | int | None:
        value = self.get(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return None
        if (isinstance(value, bool) or not isinstance(value, int | float) or value < 0
                or value != value or value == float("inf")):  # NaN, .inf: no amount of money
            raise self.error(name, "must be a number >= 0")
        return value

    def strings(self, name: str) -> list[str]:
        value = self.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "must be a list of strings")
        return list(value)

    def mapping(self, name: str) -> _Fields | None:
        value = self.get(name)
        if value is None:
            return None
        return _Fields(self.where, self._field(name), value)

    def done(self) -> None:
        unknown = sorted(set(self.value) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown field")


def _timestamp(fields: _Fields, name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, datetime):  # YAML parses unquoted timestamps itself
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise fields.error(name, "must be an RFC 3339 timestamp") from None
    else:
        raise fields.error(name, "must be an RFC 3339 timestamp")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _virtual_key(f: _Fields) -> dict[str, Any]:
    key_hash = f.string("keySha256", required=True).lower()
    if not _SHA256.match(key_hash):
        raise f.error("keySha256", "must be 64 hex digits (SHA-256 of the key)")
    spec = {
        "keySha256": key_hash,
        "group": f.string("group"),
        "user": f.string("user"),
        "models": f.strings("models"),
        "tags": f.strings("tags"),
        "expiresAt": _timestamp(f, "expiresAt"),
        "revoked": f.boolean("revoked"),
        "description": f.string("description"),
        # May requests with this key name extra limits in `x-tollgate-limit-ids`?
        "allowRequestLimits": f.boolean("allowRequestLimits"),
    }
    return spec


_PRICE_FIELDS = ("input", "output", "cachedInput", "cacheWrite", "reasoning")


def _price_table(f: _Fields) -> dict[str, Any]:
    currency = f.string("currency", "USD")
    if currency != "USD":
        raise f.error("currency", "only USD is supported")
    models = f.mapping("models")
    if models is None:
        raise f.error("models", "is required")
    out: dict[str, dict[str, float | int]] = {}
    for model in models.value:
        entry = models.mapping(str(model))
        if entry is None:
            raise models.error(str(model), "must be a mapping with input and output prices")
        price: dict[str, float | int] = {}
        for name in _PRICE_FIELDS:
            value = entry.number(name, required=name in ("input", "output"))
            if value is not None:
                price[name] = value
        entry.done()
        out[str(model)] = price
    return {"currency": currency, "models": out}


def _credential(where: str, path: str, value: Any) -> dict[str, Any]:
    f = _Fields(where, path, value)
    name = f.string("name", required=True)
    secret = f.string("secretRef", required=True)
    if not _ENV_NAME.match(secret):
        raise f.error("secretRef", "must be an environment variable or secret file name")
    spec = {
        "name": name,
        "secretRef": secret,
        "rpm": f.integer("rpm"),
        "tpm": f.integer("tpm"),
        "isFallback": f.boolean("isFallback"),
    }
    f.done()
    return spec


def _upstream(f: _Fields) -> dict[str, Any]:
    provider = f.string("provider", required=True)
    if provider not in PROVIDERS:
        raise f.error("provider", f"must be one of {', '.join(PROVIDERS)}")
    credentials = f.get("credentials")
    if credentials is None:
        credentials = []
    if not isinstance(credentials, list):
        raise f.error("credentials", "must be a list")
    creds = [
        _credential(f.where, f"{f.path}.credentials[{i}]", c) for i, c in enumerate(credentials)
    ]
    names = [c["name"] for c in creds]
    if len(set(names)) != len(names):
        raise f.error("credentials", "credential names must be unique")
    aliases = f.mapping("aliases")
    alias_map: dict[str, str] = {}
    if aliases is not None:
        for alias in aliases.value:
            alias_map[str(alias)] = aliases.string(str(alias), required=True)
        aliases.done()
    azure = f.mapping("azure")
    azure_spec: dict[str, Any] | None = None
    if azure is not None:
        deployments = azure.mapping("deployments")
        dep_map: dict[str, str] = {}
        if deployments is not None:
            for model in deployments.value:
                dep_map[str(model)] = deployments.string(str(model), required=True)
            deployments.done()
        azure_spec = {
            "apiVersion": azure.string("apiVersion", "2024-10-21"),
            "deployments": dep_map,
        }
        azure.done()
    cooldown = f.mapping("cooldown")
    cooldown_spec: dict[str, Any] = {"seconds": 30, "maxSeconds": 600,
                                     "statuses": list(DEFAULT_COOLDOWN_STATUSES)}
    if cooldown is not None:
        cooldown_spec["seconds"] = cooldown.integer("seconds", 30)
        cooldown_spec["maxSeconds"] = cooldown.integer("maxSeconds", 600)
        statuses = cooldown.get("statuses")
        if statuses is not None:
            if not isinstance(statuses, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 400 <= x <= 599
                for x in statuses
            ):
                raise cooldown.error("statuses", "must be a list of HTTP status codes 400-599")
            cooldown_spec["statuses"] = statuses
        cooldown.done()
    return {
        "provider": provider,
        "cluster": f.string("cluster", required=True),
        "models": f.strings("models") or ["*"],
        "priority": f.integer("priority", 100),
        "aliases": alias_map,
        "azure": azure_spec,
        "anthropicVersion": f.string("anthropicVersion", "2023-06-01"),
        "credentials": creds,
        "cooldown": cooldown_spec,
    }


_SELECTOR_FIELDS = ("keys", "groups", "users", "tags", "models")


def _selector(f: _Fields) -> dict[str, list[str]]:
    selector = f.mapping("selector")
    if selector is None:
        return {name: [] for name in _SELECTOR_FIELDS}
    out = {name: selector.strings(name) for name in _SELECTOR_FIELDS}
    selector.done()
    return out


def _limit(f: _Fields) -> dict[str, Any]:
    kind = f.string("type", required=True)
    if kind not in ("Block", "Allow"):
        raise f.error("type", "must be Block or Allow")
    maximum = f.number("max", required=True)
    if maximum is not None and usd_to_nanos(maximum) > MAX_AMOUNT_NANOS:
        # Spend is compared in the Lua scripts, whose numbers are doubles: exact to 2**53 n$.
        raise f.error("max", f"must be at most {MAX_AMOUNT_NANOS // 10**9} USD")
    threshold = f.number("threshold")
    if threshold is not None and not 0 < threshold <= 1:
        raise f.error("threshold", "must be a fraction of max, in (0, 1]")
    period = f.string("period", "none")
    if period not in PERIODS:
        raise f.error("period", f"must be one of {', '.join(PERIODS)}")
    zone = f.string("timeZone", "UTC")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise f.error("timeZone", f"unknown time zone {zone!r}") from None
    enforcement = f.string("enforcement", "strict")
    if enforcement not in ("strict", "reactive"):
        raise f.error("enforcement", "must be strict or reactive")
    return {
        "type": kind,
        "max": maximum,
        "threshold": 1.0 if threshold is None else threshold,
        "period": period,
        "timeZone": zone,
        "enforcement": enforcement,
        "failOpen": f.boolean("failOpen"),
        "selector": _selector(f),
    }


RATE_SCOPES = ("key", "user", "group", "model", "ip", "global")


def _rate_limit(f: _Fields) -> dict[str, Any]:
    per = f.string("per", required=True)
    if per not in RATE_SCOPES:
        raise f.error("per", f"must be one of {', '.join(RATE_SCOPES)}")
    spec = {
        "per": per,
        "selector": _selector(f),
        "requestsPerMinute": f.integer("requestsPerMinute", minimum=1),
        "tokensPerMinute": f.integer("tokensPerMinute", minimum=1),
        "concurrent": f.integer("concurrent", minimum=1),
    }
    if all(spec[k] is None for k in ("requestsPerMinute", "tokensPerMinute", "concurrent")):
        raise f.error("requestsPerMinute",
                      "set at least one of requestsPerMinute, tokensPerMinute, concurrent")
    return spec


SPEC_READERS: dict[str, Callable[[_Fields], dict[str, Any]]] = {
    "VirtualKey": _virtual_key,
    "PriceTable": _price_table,
    "Upstream": _upstream,
    "Limit": _limit,
    "RateLimit": _rate_limit,
}
KINDS = tuple(SPEC_READERS)


def validate_document(doc: Any, where: str = "document") -> Resource:
    if not isinstance(doc, dict):
        raise ResourceError(where, "", "a resource must be a mapping")
    top = _Fields(where, "", doc)
    api_version = top.string("apiVersion", required=True)
    if api_version != API_VERSION:
        raise top.error("apiVersion", f"must be {API_VERSION}")
    kind = top.string("kind", required=True)
    reader = SPEC_READERS.get(kind)
    if reader is None:
        raise top.error("kind", f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    meta = top.mapping("metadata")
    if meta is None:
        raise top.error("metadata", "is required")
    name = meta.string("name", required=True)
    if not _NAME.match(name):
        raise meta.error(
            "name", "must be lower-case letters, digits, '-' or '.', starting and ending with "
            "a letter or digit"
        )
    for ignored in ("namespace", "labels", "annotations", "uid", "resourceVersion",
                    "generation", "creationTimestamp", "managedFields"):
        meta.get(ignored)  # Kubernetes bookkeeping: accepted, not used
    meta.done()
    top.get("status")  # written by the operator; never read as configuration
    where = f"{where} ({kind}/{name})"
    spec = top.mapping("spec")
    if spec is None:
        raise ResourceError(where, "spec", "is required")
    spec.where = where
    normalised = reader(spec)
    spec.done()
    top.done()
    return Resource(kind, name, normalised)


def validate_documents(docs: Iterable[Any], source: str = "input") -> list[Resource]:
    """Validate every document, failing on the first error; empty documents are skipped."""
    out = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        out.append(validate_document(doc, f"{source}: document {i}"))
    return out


# ---- typed views, built when a snapshot is loaded -------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    key_sha256: str
    group: str
    user: str
    models: tuple[str, ...]
    tags: tuple[str, ...]
    expires_at: float | None  # unix seconds
    revoked: bool
    allow_request_limits: bool = False


def key_record(resource: Resource) -> KeyRecord:
    s = resource.spec
    expires = s.get("expiresAt")
    return KeyRecord(
        name=resource.name,
        key_sha256=s["keySha256"],
        group=s.get("group", ""),
        user=s.get("user", ""),
        models=tuple(s.get("models", ())),
        tags=tuple(s.get("tags", ())),
        expires_at=datetime.fromisoformat(expires).timestamp() if expires else None,
        revoked=bool(s.get("revoked", False)),
        allow_request_limits=bool(s.get("allowRequestLimits", False)),
    )


def model_prices(resource: Resource) -> dict[str, ModelPrice]:
    out = {}
    for model, p in resource.spec["models"].items():
        optional = {
            field: rate_from_usd_per_mtok(p[key]) if key in p else None
            for field, key in (
                ("cached_input", "cachedInput"),
                ("cache_write", "cacheWrite"),
                ("reasoning", "reasoning"),
            )
        }
        out[model] = ModelPrice(
            input=rate_from_usd_per_mtok(p["input"]),
            output=rate_from_usd_per_mtok(p["output"]),
            **optional,
        )
    return out


@dataclass(frozen=True, slots=True)
class CredentialSpec:
    name: str
    secret_ref: str
    rpm: int | None
    tpm: int | None
    is_fallback: bool


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    provider: str
    cluster: str
    models: tuple[str, ...]
    priority: int
    aliases: dict[str, str]
    azure_api_version: str | None
    azure_deployments: dict[str, str]
    anthropic_version: str
    credentials: tuple[CredentialSpec, ...]
    cooldown_ms: int = 30_000
    cooldown_max_ms: int = 600_000
    cooldown_statuses: tuple[int, ...] = DEFAULT_COOLDOWN_STATUSES


def upstream_spec(resource: Resource) -> UpstreamSpec:
    s = resource.spec
    azure = s.get("azure") or {}
    return UpstreamSpec(
        name=resource.name,
        provider=s["provider"],
        cluster=s["cluster"],
        models=tuple(s.get("models") or ("*",)),
        priority=int(s.get("priority", 100)),
        aliases=dict(s.get("aliases") or {}),
        azure_api_version=azure.get("apiVersion"),
        azure_deployments=dict(azure.get("deployments") or {}),
        anthropic_version=s.get("anthropicVersion", "2023-06-01"),
        credentials=tuple(
            CredentialSpec(c["name"], c["secretRef"], c.get("rpm"), c.get("tpm"),
                           bool(c.get("isFallback")))
            for c in s.get("credentials", ())
        ),
        cooldown_ms=int((s.get("cooldown") or {}).get("seconds", 30)) * 1000,
        cooldown_max_ms=int((s.get("cooldown") or {}).get("maxSeconds", 600)) * 1000,
        cooldown_statuses=tuple((s.get("cooldown") or {}).get(
            "statuses", DEFAULT_COOLDOWN_STATUSES)),
    )


def _selector_of(spec: dict[str, Any]) -> Selector:
    sel = spec.get("selector") or {}
    return Selector(*(tuple(sel.get(name) or ()) for name in _SELECTOR_FIELDS))


def limit_spec(resource: Resource) -> LimitSpec:
    s = resource.spec
    max_nanos = usd_to_nanos(s["max"])
    # threshold * max, rounded down to the nano-dollar: "exceeded" starts no later than asked.
    threshold_nanos = int(max_nanos * Decimal(str(s.get("threshold", 1.0))))
    return LimitSpec(
        name=resource.name,
        block=s["type"] == "Block",
        max_nanos=max_nanos,
        threshold_nanos=threshold_nanos,
        period=s.get("period", "none"),
        time_zone=s.get("timeZone", "UTC"),
        strict=s.get("enforcement", "strict") == "strict",
        fail_open=bool(s.get("failOpen", False)),
        selector=_selector_of(s),
    )


def rate_limit_spec(resource: Resource) -> RateLimitSpec:
    s = resource.spec
    return RateLimitSpec(
        name=resource.name,
        per=s["per"],
        selector=_selector_of(s),
        requests_per_minute=s.get("requestsPerMinute"),
        tokens_per_minute=s.get("tokensPerMinute"),
        concurrent=s.get("concurrent"),
    )
